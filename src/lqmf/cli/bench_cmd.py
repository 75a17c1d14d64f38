"""`lqmf bench`: speed, memory and task quality of an adapter (and its base); compare saved results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lqmf.cli.common import DefaultCommandGroup, JsonOption, LocalOption, WorkspaceOption, running_server_for, workspace
from lqmf.cli.output import App, info, print_json, print_table
from lqmf.cli.phases import importing, show_phases
from lqmf.core.bench import comparison_rows, comparison_table, load_results, side_by_side

app = App(
    cls=DefaultCommandGroup,
    subcommand_metavar="ADAPTER [PROMPTS_FILE] [OPTIONS] | COMMAND [ARGS]...",
    help="Benchmark an adapter: `lqmf bench ADAPTER [PROMPTS_FILE] [--base]` (short for `bench run`), "
    "or compare saved results: `lqmf bench compare 'finance*'`. Results are saved under "
    "benchmarks/ADAPTER/TIMESTAMP.json.",
)


@app.command("run")
def run(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="Adapter name (lqmf adapters list)."),
    prompts_file: Path | None = typer.Argument(
        None, help="Text file with one prompt per line (classification: one text per line); "
        "default: a built-in set for the adapter's task."),
    base: bool = typer.Option(False, "--base", help="Benchmark the base model too and show the deltas."),
    eval_file: Path | None = typer.Option(
        None, "--eval-file", help="Score quality on this file (in the task's dataset format) instead of the "
        "adapter's held-out validation split."),
    eval_limit: int = typer.Option(200, "--eval-limit", min=0, help="Score at most N quality examples (0: all)."),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", min=1, help="Tokens per answer: each timed prompt generates exactly this many; "
        "quality answers stop earlier at end of text."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs before the timed prompts."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    report: bool = typer.Option(False, "--report", help="Also write reports/ADAPTER.md and .html with plots."),
    local: bool = LocalOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Measure speed (response times, tokens/s, load time), peak memory and quality of an adapter.

    A running `lqmf serve` of this workspace that holds the adapter answers instead of a new
    process loading it: speed is then measured over HTTP through that server (the result says
    "via": "server"), and peak memory is the server's own report or marked not measured.
    """
    ws = workspace(ctx, workspace_dir)
    from lqmf.core.registry import Registry

    Registry(ws).get(adapter)  # a wrong name fails before a server is asked or a model loads
    served = running_server_for(ws, adapter, local, "benchmarking")
    show_phases(ctx, not json_output)
    importing()
    from lqmf.engine.evaluation import benchmark

    result = benchmark(ws, adapter, prompts_file, base=base, eval_file=eval_file, eval_limit=eval_limit,
                       max_new_tokens=max_new_tokens, warmup=warmup, device=device,
                       progress=None if json_output else info, served=served)
    written = None
    if report:
        from lqmf.core.report import write_adapter_report

        written = write_adapter_report(ws, adapter)
    if json_output:
        print_json({**result, "report": written})
        return
    print_result(result)
    info(f"saved {result['source_file']}")
    if written:
        info(f"report: {written['markdown']} and {written['html']}")


def print_result(result: dict[str, Any]) -> None:
    runtime = result["adapter_run"]["runtime"]
    options = result["options"]
    quant = "4-bit NF4" if runtime.get("quantized_4bit") else runtime.get("dtype")
    typer.echo(f"{result['adapter']} ({result['task']}) on {runtime.get('device')} ({quant}), "
               f"base {result['base_model']}")
    if result.get("via") == "server":
        typer.echo(f"through the running server {result['server']} (figures measured over HTTP)")
    prompts = options["prompts_file"] or "built-in prompts"
    typer.echo(f"speed: {options['prompt_count']} prompts from {prompts}, {options['warmup']} warm-up run(s)"
               + ("" if result["task"] == "classification" else f", {options['max_new_tokens']} tokens each"))
    source = result.get("quality_data")
    if source:
        kind = "held-out validation split of" if source["kind"] == "validation_split" else "eval file"
        typer.echo(f"quality: {source['examples']} examples, {kind} {source['path']}")
    typer.echo("")
    rows, headers = side_by_side(result)
    print_table(rows, headers)
    for key in ("adapter_run", "base_run"):
        quality = (result.get(key) or {}).get("quality") or {}
        if "confusion_matrix" in quality:
            typer.echo(f"\nconfusion matrix, {'base' if key == 'base_run' else result['adapter']} "
                       "(rows: true label, columns: predicted)")
            print_table([[label, *map(str, counts)] for label, counts in
                         zip(quality["labels"], quality["confusion_matrix"], strict=True)],
                        ["", *quality["labels"]])
    for note in result["notes"]:
        info(note if note.startswith("warning:") else f"note: {note}")


@app.command("compare")
def compare(
    ctx: typer.Context,
    patterns: list[str] = typer.Argument(..., help="Adapter names or quoted globs, e.g. 'finance*'."),
    all_runs: bool = typer.Option(False, "--all", help="Every saved run, not only the newest per adapter."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """One table of the key figures of saved results (the newest per adapter)."""
    results = load_results(workspace(ctx, workspace_dir), patterns, all_runs=all_runs)
    if json_output:
        print_json(comparison_rows(results))
        return
    typer.echo(comparison_table(results))
