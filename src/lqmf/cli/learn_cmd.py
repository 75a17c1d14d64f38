"""`lqmf learn ADAPTER`: a new version of an adapter from its users' corrections (cron-safe)."""

from __future__ import annotations

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import info, print_json
from lqmf.cli.phases import show_phases
from lqmf.cli.train_cmd import ProgressPrinter
from lqmf.core.errors import LqmfError


def learn(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="The adapter (or any of its learned versions) to improve."),
    method: str = typer.Option("auto", "--method", help="sft: the corrections as examples; kto: the ratings "
                               "(corrections as good answers) through the KTO loss; auto: sft with --min-new "
                               "corrections, else kto."),
    min_new: int = typer.Option(1, "--min-new", min=1, help="Do nothing (exit 0) below this many new corrections "
                                "(kto: rated or corrected answers)."),
    promote: bool = typer.Option(False, "--promote", help="Make the new version active and hot-swap it into a "
                                 "running server."),
    epochs: float = typer.Option(3.0, "--epochs", min=0.01, help="Passes over the corrections and replayed data."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "--lr", help="Default: the parent's."),
    replay: float = typer.Option(1.0, "--replay", min=0.0, help="Original training examples replayed per "
                                 "correction, so the new version does not forget."),
    max_drop: float = typer.Option(0.02, "--max-drop", min=0.0, help="The quality gate: how much worse than the "
                                   "parent the held-out score may be (accuracy points; relative loss)."),
    hold_out: float = typer.Option(0.2, "--hold-out", min=0.0, max=0.9, help="Fraction of the corrections kept "
                                   "out of training to score old and new (from 5 corrections)."),
    beta: float = typer.Option(0.1, "--beta", min=0.0, help="KTO's beta (--method kto): how far the ratings may "
                               "pull the new version from its parent."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Train ADAPTER-vN from ADAPTER's current version on its new feedback, with replay of the original
    data; register it only if the quality gate passes (--promote: make it active). Nothing new: exit 0."""
    from lqmf.engine.train.learn import LearnSettings
    from lqmf.engine.train.learn import learn as run_learn  # torch loads only once there is something to learn

    show_phases(ctx, not json_output)
    settings = LearnSettings(method=method, min_new=min_new, promote=promote, epochs=epochs,
                             learning_rate=learning_rate, replay=replay, max_drop=max_drop, hold_out=hold_out,
                             beta=beta)
    result = run_learn(workspace(ctx, workspace_dir), adapter, settings,
                       progress=(lambda message: None) if json_output else info,
                       events=ProgressPrinter(json_output))
    if json_output:
        print_json(result)
    else:
        _print(result)
    if not result["learned"] and result.get("evaluation"):
        raise LqmfError(result["reason"])  # the gate refused: say so by the exit status too


def _print(result: dict) -> None:
    if not result["learned"]:
        typer.echo(f"{result['adapter']}: nothing learned: {result['reason']}")
        return
    typer.echo(f"registered {result['version']} (from {result['parent']}, {result['method']}: "
               f"{result['trained_on']['feedback']} answers with feedback, {result['trained_on']['replayed']} replayed "
               "examples)")
    for key in ("original", "feedback"):
        old, new = result["evaluation"]["old"].get(key), result["evaluation"]["new"].get(key)
        if old:
            parts = ", ".join(f"{k} {old[k]:.4f} -> {new[k]:.4f}" for k in old)
            typer.echo(f"  {'original held-out' if key == 'original' else 'held-out feedback'}: {parts}")
    promoted = result.get("promoted")
    if promoted:
        server = promoted.get("server")
        typer.echo(f"{promoted['adapter']} is now active" + (f"; server {server['server']}: {server['method']} in "
                                                              f"{server['swap_ms']:.1f} ms" if server else ""))
