"""Search training settings with Optuna: lqmf tune MODEL DATASET TASK --name NAME [--trials N] [--keep-best]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import human_duration, info, print_json, print_table
from lqmf.core import config as cfg
from lqmf.core import tune as spec
from lqmf.core.datasets import load_task_dataset
from lqmf.core.errors import InputError, LqmfError, require
from lqmf.core.manifest import default_adapter_name
from lqmf.core.models import ModelCatalogue, require_downloadable


def _param_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trial_line(row: dict[str, Any]) -> str:
    if row["same_as"] is not None:
        return f"trial {row['number']}: the parameters of trial {row['same_as']}: not run again"
    if row["state"] == "complete":
        outcome = f"{row['metric']} {row['value']:.4f}" + (" (lqmf train's values)" if row["defaults"] else "")
    elif row["state"] == "pruned":
        outcome = f"pruned at step {row['pruned_at_step']}"
    else:
        outcome = row["state"]
    return f"trial {row['number']}: {outcome} ({human_duration(row['seconds'])})  {_param_text(row['params'])}"


def tune(
    ctx: typer.Context,
    model: str | None = typer.Argument(None, help="Base model: alias (lqmf models list), hub id or folder."),
    dataset: str | None = typer.Argument(None, help="Training data: .csv, .jsonl or .json in the task's format."),
    task: str | None = typer.Argument(None, help="chat | instruction_following | classification | summarization"),
    name: str | None = typer.Option(None, "--name", "-n", help="Study name (and the adapter name with --keep-best)."),
    space_file: Path | None = typer.Option(None, "--space", help="Search space YAML (space, fixed, first_trials, "
                                           "pruner); default: a space for the task."),
    config_name: str | None = typer.Option(None, "--config", "-c", help="Saved config name or YAML path: the "
                                           "settings every trial starts from."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Config key for every trial: --set max_steps=200."),
    trials: int | None = typer.Option(10, "--trials", min=1, help="Trials to run in this invocation."),
    timeout: float | None = typer.Option(None, "--timeout", min=1, help="Stop starting trials after this many "
                                         "seconds."),
    metric: str | None = typer.Option(None, "--metric", help="Validation metric to optimise: loss | perplexity "
                                      "(minimised), accuracy | macro_f1 (classification, maximised); default "
                                      "accuracy for classification, else loss."),
    resume: str | None = typer.Option(None, "--resume", help="Continue the study of this name (its stored model, "
                                      "dataset, space; several processes may share one)."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Register the best trial's adapter as NAME."),
    min_metric: float | None = typer.Option(None, "--min-metric", help="With --keep-best (classification): do "
                                            "not register a best trial whose validation accuracy is below this."),
    max_loss: float | None = typer.Option(None, "--max-loss", help="With --keep-best: do not register a best "
                                          "trial whose validation loss is above this."),
    force: bool = typer.Option(False, "--force", help="Start a study of this name over; replace adapter NAME."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Tune learning rate, rank, alpha, dropout, target modules and epochs with Optuna (TPE, pruning weak trials
    early on the validation metric). The first trial is what `lqmf train` would do (its defaults and small-data
    schedule) and the default space is centred on it; a parameter set already tried is not run again;
    --keep-best keeps the defaults' adapter unless a trial beats it on held-out data. The study lives in
    tune/NAME/study.db; the best config is saved as configs/NAME-best.yaml (lqmf train --config NAME-best)."""
    from lqmf.core.derived import Gate
    from lqmf.engine.train.tune import TuneRequest
    from lqmf.engine.train.tune import tune as run_tune

    require("optuna", "optuna", "tune")
    ws = workspace(ctx, workspace_dir)
    gate = Gate(min_metric, max_loss)
    if (min_metric is not None or max_loss is not None) and not keep_best:
        raise InputError("--min-metric and --max-loss gate --keep-best; add --keep-best")
    request = None
    if resume:
        if model or dataset or task or space_file or config_name or sets or name or metric:
            raise InputError("--resume continues a study with its stored model, dataset, space, metric and config; "
                             "only --trials, --timeout, --keep-best may change")
        name = resume
    else:
        if not (model and dataset and task):
            raise InputError("give MODEL DATASET TASK (or --resume NAME)")
        file_values = cfg.read_config_file(cfg.config_path(ws.configs_dir, config_name)) if config_name else {}
        resolved = ModelCatalogue(ws).resolve(model)
        require_downloadable(resolved)
        data = load_task_dataset(ws.resolve_path(dataset), task)
        name = name or default_adapter_name(resolved, data.task)
        overrides = {"base_model": model, "dataset_path": str(data.path), "task_type": data.task, "job_name": name}
        config = cfg.resolve_config(file_values, {**overrides, **cfg.parse_set_options(sets)})
        space = spec.load_space(ws.resolve_path(space_file) if space_file else None, data.task)
        metric = metric or spec.default_metric(data.task)
        spec.check_metric(metric, data.task)
        request = TuneRequest(name, {k: v for k, v in config.to_dict().items() if v is not None}, space, metric)
    result = run_tune(ws, request, name, trials=trials, timeout=timeout, resume=bool(resume), force=force,
                      keep_best=keep_best, gate=gate,
                      on_trial=(lambda row: None) if json_output else (lambda row: info(_trial_line(row))))
    if json_output:
        print_json(result)
    else:
        _print_summary(result)
    if result["refused"]:
        raise LqmfError(result["refused"])


def _print_summary(result: dict[str, Any]) -> None:
    rows = [[r["number"], r["state"], f"{r['value']:.4f}" if r["value"] is not None else "",
             human_duration(r["seconds"]), _param_text(r["params"])] for r in result["trials"]]
    best = result["best"]
    typer.echo(f"study {result['study']}: {len(rows)} trials, {result['direction']} {result['metric']}")
    print_table(rows, ["trial", "state", result["metric"], "time", "params"])
    typer.echo(f"\nbest: trial {best['number']}, {result['metric']} {best['value']:.4f}")
    if result["kept_defaults"]:
        typer.echo("no trial beat lqmf train's values on held-out data: keeping them (trial "
                   f"{best['number']})")
    typer.echo(f"best config: {result['best_config']}")
    if result["adapter"]:
        typer.echo(f"registered: {result['adapter']}")
