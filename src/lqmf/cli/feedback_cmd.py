"""`lqmf feedback`: ratings and corrections of answers a `lqmf serve --record` server kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, info, print_json, print_json_rows, print_table
from lqmf.core import learning
from lqmf.core.errors import InputError, NotFoundError

app = App(help="Rate and correct recorded answers (lqmf serve --record); list, show, export (TRL files), purge.")

AdapterArgument = typer.Argument(None, help="An adapter (its whole family of learned versions); default: all.")


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else " / ".join(m.get("content", "") for m in value or [])
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("add")
def add(
    ctx: typer.Context,
    ident: str | None = typer.Argument(None, metavar="ID", help="The id of a recorded answer (the response's id)."),
    up: bool = typer.Option(False, "--up", help="Thumbs up: the answer was good."),
    down: bool = typer.Option(False, "--down", help="Thumbs down: the answer was bad."),
    correction: str | None = typer.Option(None, "--correction", help="The right answer (classification: the "
                                          "right label)."),
    file: Path | None = typer.Option(None, "--file", "-f", help="A JSONL file of {\"id\", \"rating\", "
                                     "\"correction\"} lines, all checked before any is kept."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Rate or correct one recorded answer (ID --up|--down|--correction TEXT), or many from --file."""
    ws = workspace(ctx, workspace_dir)
    if up and down:
        raise InputError("give --up or --down, not both")
    if file is not None:
        if ident or up or down or correction is not None:
            raise InputError("--file takes the feedback from the file; give no ID, --up, --down or --correction")
        kept = learning.add_feedback(ws, learning.read_feedback_file(ws.resolve_path(file)), source=str(file))
    else:
        if not ident:
            raise InputError("give the ID of a recorded answer (or --file FILE)")
        item: dict[str, Any] = {"id": ident}
        if up or down:
            item["rating"] = "up" if up else "down"
        if correction is not None:
            item["correction"] = correction
        kept = learning.add_feedback(ws, [item])
    if json_output:
        print_json({"kept": kept})
        return
    for entry in kept:
        what = ", ".join(f"{k} {entry[k]!r}" if k == "correction" else entry[k] for k in ("rating", "correction")
                         if k in entry)
        typer.echo(f"{entry['id']} ({entry['adapter']}): {what}")


@app.command("list")
def list_feedback(ctx: typer.Context, adapter: str | None = AdapterArgument, json_output: bool = JsonOption,
                  workspace_dir: str | None = WorkspaceOption) -> None:
    """The feedback given, newest last, with the pending count of each adapter family."""
    rows = learning.feedback_rows(workspace(ctx, workspace_dir), adapter)
    if json_output:
        print_json_rows(rows)
        return
    if not rows:
        info("no feedback" + (f" on {adapter}" if adapter else "") + " (rate answers with lqmf feedback add ID "
             "--up|--down|--correction TEXT)")
        return
    print_table([[r["id"], r.get("adapter"), r.get("rating", ""), _short(r.get("correction") or "", 24),
                  _short(r.get("prompt"), 32), _short(r.get("answer") or "", 24)] for r in rows],
                ["id", "adapter", "rating", "correction", "prompt", "answer"])


@app.command("show")
def show(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID", help="A recorded answer's id."),
         json_output: bool = JsonOption, workspace_dir: str | None = WorkspaceOption) -> None:
    """One recorded answer and its feedback."""
    ws = workspace(ctx, workspace_dir)
    record = next((r for r in learning.completions_log(ws).read() if r["id"] == ident), None)
    if record is None:
        raise NotFoundError(f"no recorded answer has id '{ident}'")
    row = {**record, **(learning.latest_feedback(ws).get(ident) or {}), "time": record.get("time")}
    if json_output:
        print_json(row)
        return
    for key in ("id", "adapter", "task", "time", "prompt", "answer", "rating", "correction"):
        if row.get(key) is not None:
            typer.echo(f"{key:<11} {_short(row[key], 200)}")


@app.command("export")
def export(ctx: typer.Context, adapter: str | None = AdapterArgument,
           output: Path = typer.Option(Path("feedback-export"), "--output", "-o", help="Folder for sft.jsonl and "
                                       "kto.jsonl."),
           json_output: bool = JsonOption, workspace_dir: str | None = WorkspaceOption) -> None:
    """TRL-style files: sft.jsonl (corrections as messages, or text/label) and kto.jsonl (prompt, completion,
    label from ratings)."""
    ws = workspace(ctx, workspace_dir)
    result = learning.export_feedback(ws, ws.resolve_path(output), adapter)
    if json_output:
        print_json(result)
        return
    typer.echo(f"{result['sft']['path']}: {result['sft']['rows']} SFT rows (corrections)")
    typer.echo(f"{result['kto']['path']}: {result['kto']['rows']} KTO rows (ratings)")


@app.command("purge")
def purge(ctx: typer.Context, adapter: str | None = AdapterArgument,
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
          json_output: bool = JsonOption, workspace_dir: str | None = WorkspaceOption) -> None:
    """Delete the recorded answers and feedback of an adapter's family (or all of them)."""
    if not yes:
        if not typer.get_text_stream("stdin").isatty():
            raise InputError("purge deletes recorded answers and feedback; add --yes to confirm")
        typer.confirm(f"delete the recorded answers and feedback of {adapter or 'every adapter'}?", abort=True)
    counts = learning.purge_feedback(workspace(ctx, workspace_dir), adapter)
    if json_output:
        print_json({"purged": counts, "adapter": adapter})
        return
    typer.echo(f"purged {counts['completions']} recorded answers and {counts['feedback']} feedback items"
               + (f" of {adapter}" if adapter else ""))
