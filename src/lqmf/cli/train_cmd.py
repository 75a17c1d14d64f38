"""Fine-tune a LoRA/QLoRA adapter into adapters/NAME: lqmf train MODEL DATASET TASK, plus options."""

from __future__ import annotations

import shutil
import sys
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import human_duration, human_size, info, print_json
from lqmf.cli.phases import importing, show_phases
from lqmf.cli.plan_cmd import memory_lines
from lqmf.core import config as cfg
from lqmf.core.datasets import load_task_dataset
from lqmf.core.errors import ConflictError, InputError, NotFoundError
from lqmf.core.fsutil import atomic_write_text
from lqmf.core.manifest import build_manifest, default_adapter_name
from lqmf.core.metrics import no_improvement_warning
from lqmf.core.models import ModelCatalogue
from lqmf.core.registry import Registry
from lqmf.core.timing import estimate_train_seconds

STAGED_CONFIG = "config.yaml"


class ProgressPrinter:
    """Training events on stderr: a live bar on a terminal, one line per log step otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Any = None
        self.tty = sys.stderr.isatty()

    def on_plan(self, plan: dict[str, Any]) -> None:
        if self.quiet:
            return
        quant = "4-bit NF4" if plan["quantized_4bit"] else plan["dtype"]
        info(f"training on {plan['device']} ({quant}), {plan['trainable_params']:,} trainable of "
             f"{plan['total_params']:,} parameters, {plan['total_steps']} steps of {plan['effective_batch']} "
             f"examples ({plan['micro_batch']} x {plan['gradient_accumulation']}), optimizer {plan['optimizer']}")
        memory = plan["memory"]
        if memory["estimate"]:
            budget = (f" (budget {human_size(memory['budget_gb'] * 2**30)}, {memory['budget_source']})"
                      if memory["budget_gb"] else "")
            info(f"estimated peak memory {human_size(memory['estimate']['total_gb'] * 2**30)}{budget}")
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=plan["total_steps"], initial=plan["resumed_at_step"], unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def on_note(self, message: str) -> None:
        if not self.quiet:
            info(f"note: {message}")

    def on_step(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 mem=f"{record['memory_gb']:.2f}GB", refresh=False)
            self.bar.refresh()
            if record["step"] >= record["total_steps"]:
                self.bar.close()
            return
        info(f"step {record['step']}/{record['total_steps']} epoch {record['epoch']:.2f} "
             f"loss {record['loss']:.4f} lr {record['lr']:.2e} mem {record['memory_gb']:.2f}GB "
             f"{record['tokens_per_s']:.0f} tok/s elapsed {human_duration(record['elapsed_s'])} "
             f"eta {human_duration(record['eta_s'])}")

    def on_eval(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        parts = [f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval_")]
        line = f"eval @ step {record['step']}: " + ", ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            info(line)


def _overrides(model, dataset, task, name, options: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    values = {"base_model": model, "dataset_path": dataset, "task_type": task, "job_name": name, **options}
    checked = {k: cfg.coerce_value(k, v, f"option for {k}") for k, v in values.items() if v is not None}
    return {**checked, **cfg.parse_set_options(sets)}


def _summary_lines(name: str, metrics: dict[str, Any]) -> list[str]:
    lines = []
    if metrics.get("first_train_loss") is not None:
        lines.append(f"train loss {metrics['first_train_loss']:.4f} -> {metrics['train_loss']:.4f} "
                     f"({metrics['steps']} steps, {human_duration(metrics['train_seconds'])})")
    initial = metrics.get("initial", {})
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity"):
        if key in metrics:
            before = f"{initial[key]:.4f} -> " if key in initial else ""
            lines.append(f"held-out {key[5:]}: {before}{metrics[key]:.4f}")
    return lines


def train(
    ctx: typer.Context,
    model: str | None = typer.Argument(None, help="Base model: alias (lqmf models list), hub id or folder."),
    dataset: str | None = typer.Argument(None, help="Training data: .csv, .jsonl or .json in the task's format."),
    task: str | None = typer.Argument(None, help="chat | instruction_following | classification | summarization"),
    name: str | None = typer.Option(None, "--name", "-n",
                                    help="Adapter name (default <model>-<task>-<dataset hash>; -2, -3... if taken)."),
    config_name: str | None = typer.Option(None, "--config", "-c", help="Saved config name or YAML path."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override any config key: --set lora_r=32 (repeatable)."),
    epochs: float | None = typer.Option(None, "--epochs", help="num_train_epochs"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="max_steps (overrides epochs)"),
    learning_rate: float | None = typer.Option(None, "--lr", help="learning_rate"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="per_device_train_batch_size"),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="gradient_accumulation_steps"),
    max_seq_length: int | None = typer.Option(None, "--max-seq-length", help="max_seq_length"),
    rank: int | None = typer.Option(None, "--rank", "-r", help="lora_r"),
    four_bit: bool | None = typer.Option(None, "--4bit/--no-4bit", help="use_4bit_quantization"),
    checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                              help="use_gradient_checkpointing"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | mps"),
    max_memory: str | None = typer.Option(None, "--max-memory",
                                          help="max_memory: budget for the micro-batch, e.g. 7.5GB"),
    seed: int | None = typer.Option(None, "--seed", help="seed"),
    resume: str | None = typer.Option(None, "--resume", help="Resume the unfinished run of this adapter name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; train nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter (or unfinished run) of this name."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Fine-tune a LoRA/QLoRA adapter and register it under adapters/NAME."""
    ws = workspace(ctx, workspace_dir)
    show_phases(ctx, not (quiet or json_output))
    registry = Registry(ws)
    options = {"num_train_epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
               "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
               "max_seq_length": max_seq_length, "lora_r": rank, "use_4bit_quantization": four_bit,
               "use_gradient_checkpointing": checkpointing, "device": device, "seed": seed,
               "max_memory": max_memory}
    if resume:
        if model or dataset or task or name or config_name:
            raise InputError("--resume continues a run with its saved model, dataset, task and config; "
                             "only options like --max-steps or --set may change")
        staging = registry.staging_path(resume)
        if not (staging / STAGED_CONFIG).is_file():
            raise NotFoundError(f"no unfinished run named '{resume}' in {ws.adapters_dir}")
        file_values = cfg.read_config_file(staging / STAGED_CONFIG)
    else:
        file_values = cfg.read_config_file(cfg.config_path(ws.configs_dir, config_name)) if config_name else {}
    config = cfg.resolve_config(file_values, _overrides(model, dataset, task, name, options, sets))
    cfg.check_complete(config)
    resolved = ModelCatalogue(ws).resolve(config.base_model)
    data = load_task_dataset(ws.resolve_path(config.dataset_path), config.task_type)
    config.dataset_path = str(data.path)
    adapter = config.job_name or default_adapter_name(
        resolved, data.task, data.sha256, lambda n: registry.exists(n) or registry.staging_path(n).exists())
    config.job_name = adapter
    staging = registry.staging_path(adapter)
    if not resume:
        if registry.exists(adapter) and not force:
            raise ConflictError(f"adapter '{adapter}' already exists; use --force to replace it or --name")
        if staging.exists() and not force and not dry_run:
            raise ConflictError(f"an unfinished run of '{adapter}' exists; use --resume {adapter} or --force")

    importing()
    from lqmf.engine import train as engine

    prepared = engine.prepare(config, resolved, data)
    memory = engine.plan_memory(config, resolved, prepared)  # may shrink the micro-batch to fit
    plan = prepared.plan()
    estimate = estimate_train_seconds(resolved.config, prepared.train_tokens * prepared.total_steps
                                      / prepared.steps_per_epoch, config.use_gradient_checkpointing)
    if dry_run:
        result = {"adapter": adapter, "dry_run": True, "task": data.task, "base_model": resolved.reference,
                  "model_source": resolved.source, "dataset": str(data.path), **plan,
                  "label_counts": data.label_counts or None, "estimated_seconds": estimate,
                  "memory": memory.to_dict(), "config": config.to_dict()}
        if json_output:
            print_json(result)
            return
        _print_plan(adapter, result)
        return

    # While the run lock is held, `adapters list` shows the run as training and `remove` leaves it.
    with registry.training_run(adapter, wait=5.0):
        if not resume and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_text(staging / STAGED_CONFIG, cfg.dump_config(config))
        printer = ProgressPrinter(quiet or json_output and not sys.stderr.isatty())
        outcome = engine.train(config, resolved, data, staging, events=printer, prepared=prepared,
                               resume=bool(resume), memory=memory)
        manifest = build_manifest(adapter, config, resolved, data, plan, outcome.metrics, outcome.runtime)
        target = registry.finalize(adapter, staging, manifest, force=force or bool(resume))
    warning = no_improvement_warning(adapter, manifest["learning"])
    if json_output:
        if warning:
            info(warning)
        print_json({"adapter": adapter, "path": str(target), "task": data.task, "metrics": outcome.metrics,
                    "learning": manifest["learning"], "runtime": manifest["runtime"]})
        return
    for line in _summary_lines(adapter, outcome.metrics):
        info(line)
    info(f"saved {target}")
    if warning:
        info(warning)
    typer.echo(adapter)


def _print_plan(adapter: str, plan: dict[str, Any]) -> None:
    typer.echo(f"plan for adapter '{adapter}' (dry run: nothing trained)")
    typer.echo(f"  model:       {plan['base_model']} -> {plan['model_source']}")
    typer.echo(f"  task:        {plan['task']}   dataset: {plan['dataset']}")
    typer.echo(f"  examples:    {plan['train_examples']} train, {plan['validation_examples']} validation")
    if plan.get("label_counts"):
        typer.echo("  labels:      " + ", ".join(f"{k} ({v})" for k, v in plan["label_counts"].items()))
    typer.echo(f"  tokens:      {plan['train_tokens_per_epoch']:,} per epoch, longest example "
               f"{plan['longest_example_tokens']}")
    typer.echo(f"  batches:     {plan['micro_batch']} x {plan['gradient_accumulation']} accumulation = "
               f"{plan['effective_batch']} examples per step")
    config = plan["config"]
    typer.echo(f"  steps:       {plan['total_steps']} ({plan['steps_per_epoch']} per epoch, "
               f"{config['num_train_epochs']:g} epochs)")
    head = f" (classifier head {config['head_learning_rate']:g})" if config["head_learning_rate"] else ""
    typer.echo(f"  learn rate:  {config['learning_rate']:g}{head}")
    est = plan["estimated_seconds"]
    typer.echo("  est. time:   " + ", ".join(f"{k} ~{human_duration(v)}" for k, v in est.items()) if est
               else "  est. time:   unknown (model config not available locally)")
    for line in memory_lines(plan["memory"]):
        typer.echo(f"  {line}")
    for note in plan["notes"]:
        typer.echo(f"  note:        {note}")
