"""Fine-tune a LoRA/QLoRA adapter into adapters/NAME: lqmf train MODEL DATASET TASK, plus options."""

from __future__ import annotations

import sys
from typing import Any

import typer

from lqmf import RANK_ENTRY
from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import human_duration, human_size, info, print_json
from lqmf.cli.phases import importing, show_phases
from lqmf.cli.plan_cmd import memory_lines
from lqmf.core import config as cfg
from lqmf.core.errors import InputError
from lqmf.core.metrics import no_improvement_warning
from lqmf.core.models import ModelCatalogue, require_downloadable


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
             f"examples ({plan['micro_batch']} x {plan['gradient_accumulation']}"
             f"{' x ' + str(plan['processes']) + ' processes' if plan.get('processes', 1) > 1 else ''}), "
             f"optimizer {plan['optimizer']}")
        memory = plan["memory"]
        if memory["estimate"]:
            budget = (f" (budget {human_size(memory['budget_gb'] * 2**30)}, {memory['budget_source']})"
                      if memory["budget_gb"] else "")
            info(f"estimated peak memory {human_size(memory['estimate']['total_gb'] * 2**30)}{budget}")
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=plan["total_steps"], initial=plan["resumed_at_step"], unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

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
    return {**{k: v for k, v in values.items() if v is not None}, **cfg.parse_set_options(sets)}


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
    gpus: str | None = typer.Option(None, "--gpus", help="gpus: train on N GPUs (or all), one process each; "
                                    "default one device"),
    strategy: str | None = typer.Option(None, "--strategy", help="strategy with --gpus: ddp | fsdp | auto"),
    resume: str | None = typer.Option(None, "--resume", help="Resume the unfinished run of this adapter name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; train nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter (or unfinished run) of this name."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Fine-tune a LoRA/QLoRA adapter and register it under adapters/NAME."""
    from lqmf.engine.train import run as service

    ws = workspace(ctx, workspace_dir)
    show_phases(ctx, not (quiet or json_output))
    options = {"num_train_epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
               "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
               "max_seq_length": max_seq_length, "lora_r": rank, "use_4bit_quantization": four_bit,
               "use_gradient_checkpointing": checkpointing, "device": device, "seed": seed,
               "max_memory": max_memory, "gpus": gpus, "strategy": strategy}
    if resume and (model or dataset or task or name or config_name):
        raise InputError("--resume continues a run with its saved model, dataset, task and config; "
                         "only options like --max-steps or --set may change")
    config = service.resolve_config(ws, _overrides(model, dataset, task, name, options, sets), resume=resume,
                                    config_name=config_name)
    require_downloadable(ModelCatalogue(ws).resolve(config.base_model))  # offline: one line now, not retries
    importing()
    printer = ProgressPrinter(quiet or json_output and not sys.stderr.isatty())
    try:
        result = service.train(config, ws, resume=bool(resume), force=force, dry_run=dry_run, events=printer,
                               rank_entry=RANK_ENTRY)
    finally:
        printer.close()  # a bar left open (Ctrl-C in lqmf shell) would be redrawn by the next line's bars
    if result.path is None:  # a dry run, or a rank other than 0 of a run launched from outside LQMF
        if dry_run and json_output:
            print_json(result.plan)
        elif dry_run:
            _print_plan(result.adapter, result.plan)
        return
    warning = no_improvement_warning(result.adapter, result.learning)
    if json_output:
        if warning:
            info(warning)
        print_json(result.to_dict())
        return
    for line in _summary_lines(result.adapter, result.metrics):
        info(line)
    info(f"saved {result.path}")
    if warning:
        info(warning)
    typer.echo(result.adapter)


def _print_plan(adapter: str, plan: dict[str, Any]) -> None:
    typer.echo(f"plan for adapter '{adapter}' (dry run: nothing trained)")
    typer.echo(f"  model:       {plan['base_model']} -> {plan['model_source']}")
    typer.echo(f"  task:        {plan['task']}   dataset: {plan['dataset']}")
    typer.echo(f"  examples:    {plan['train_examples']} train, {plan['validation_examples']} validation")
    if plan.get("label_counts"):
        typer.echo("  labels:      " + ", ".join(f"{k} ({v})" for k, v in plan["label_counts"].items()))
    typer.echo(f"  tokens:      {plan['train_tokens_per_epoch']:,} per epoch, longest example "
               f"{plan['longest_example_tokens']}")
    processes = f" x {plan['processes']} processes" if plan.get("processes", 1) > 1 else ""
    typer.echo(f"  batches:     {plan['micro_batch']} x {plan['gradient_accumulation']} accumulation{processes} = "
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
