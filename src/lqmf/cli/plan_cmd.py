"""Will a LoRA/QLoRA run fit in memory? Estimated from config.json alone: lqmf plan MODEL, plus options."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import human_size, print_json, print_table
from lqmf.core import config as cfg
from lqmf.core.distributed import check_batch_split
from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.memory_plan import (
    DEFAULT_BUDGET,
    LOSS_CHUNK_TOKENS,
    Alternative,
    GiB,
    ModelShape,
    TrainSettings,
    adapter_tables_held,
    budget_choices,
    choose_strategy,
    estimate,
    fit_strategies,
    largest_micro_batch,
    largest_seq_len,
    largest_serving_batch,
    parse_size,
    require_shape,
    serving_estimate,
    settings_for,
    what_would_fit,
)
from lqmf.core.models import ModelCatalogue
from lqmf.core.schedule import DEFAULT_ACCUMULATION
from lqmf.core.serving import DEFAULT_MAX_ADAPTERS
from lqmf.core.system import free_gpu_memory

OPTION_NAMES = {"max_seq_length": "seq-len", "per_device_train_batch_size": "batch-size", "lora_r": "rank",
                "target_modules": "targets", "use_4bit_quantization": "4bit", "task_type": "task",
                "use_gradient_checkpointing": "gradient-checkpointing", "max_memory": "max-memory",
                "offload_activations": "offload", "strategy": "strategy", "packing": "packing",
                "tiled_mlp": "tiled-mlp", "kept_layers": "kept-layers", "kept_mlps": "kept-mlps",
                "recompute_lora_dropout": "recompute-lora-dropout"}

COMPONENTS = [("weights", "weights"), ("lora", "LoRA + gradients"), ("optimizer", "optimizer state"),
              ("activations", "activations"), ("logits_loss", "logits and loss"), ("peak_allocated", "peak allocated"),
              ("allocator_slack", "allocator slack"), ("cuda_context", "CUDA context"), ("total", "total")]


ServeAdaptersOption = typer.Option(DEFAULT_MAX_ADAPTERS, "--serve-adapters", min=1,
                                   help="Adapters resident at once for the serving estimate (lqmf serve "
                                   "--max-adapters), each of the plan's rank and modules.")


def component_notes(shape: ModelShape, settings: TrainSettings, details: dict[str, Any]) -> dict[str, str]:
    """What each line of the breakdown holds, for these settings."""
    quantized = details["quantized_params"]
    dtype = "bf16" if settings.device == "cuda" else "fp32"
    rest = (shape.parameters - quantized) / 1e9
    weights = (f"{quantized / 1e9:.2f}B in 4-bit NF4; embeddings, head and norms ({rest:.2f}B) in {dtype}"
               if settings.quantize_4bit else f"{shape.parameters / 1e9:.2f}B in {dtype}")
    activations = (f"{details['saved_activations_gb']:.2f} kept + {details['layer_working_set_gb']:.2f} for one "
                   "block's recompute and backward" if settings.gradient_checkpointing
                   else f"every block's saved tensors ({details['saved_activations_gb']:.2f}) + backward")
    chunk = min(LOSS_CHUNK_TOKENS, settings.micro_batch * max(settings.seq_len - 1, 1))
    return {
        "weights": weights,
        "lora": f"{details['lora_params'] / 1e6:.1f}M fp32 parameters and their gradients",
        "optimizer": "8-bit AdamW states (paged when large)" if settings.device == "cuda" else "fp32 AdamW states",
        "activations": activations,
        "logits_loss": ("classification head: negligible" if settings.task == "classification"
                        else f"{chunk} answer tokens x {shape.vocab} vocabulary at a time, fp32"),
        "peak_allocated": "the larger of the block working set and the logits counts: they never coexist",
        "allocator_slack": "what PyTorch's caching allocator reserves beyond its allocations" if settings.device ==
        "cuda" else "",
        "cuda_context": "driver, kernels, cuBLAS: outside PyTorch's allocator" if settings.device == "cuda" else "",
        "total": "",
    }


def memory_lines(memory: dict[str, Any]) -> list[str]:
    """The dry run's memory lines, from engine.train.MemoryPlan.to_dict()."""
    est = memory["estimate"]
    if est is None:
        return [f"memory:      unknown ({memory['model_shape_from']})"]

    def size(key: str) -> str:
        return human_size(est[f"{key}_gb"] * GiB)

    parts = ", ".join(f"{label} {size(key)}" for key, label in COMPONENTS[:5])
    cuda = memory["device"] == "cuda"
    extra = f"; slack {size('allocator_slack')}, CUDA context {size('cuda_context')}" if cuda else ""
    where = (f"each of {memory['gpus']} GPUs ({memory['strategy']})" if memory.get("gpus", 1) > 1
             else memory["device"])
    if not cuda and est["cuda_context_gb"]:
        extra = f"; this process before the weights load {size('cuda_context')}"
    lines = [f"memory:      ~{size('total')} peak on {where} ({parts}{extra})"]
    if memory["budget_gb"]:
        lines.append(f"budget:      {human_size(memory['budget_gb'] * GiB)} ({memory['budget_source']})")
    if memory["micro_batch"] != memory["requested_micro_batch"]:
        lines.append(f"note:        micro-batch {memory['requested_micro_batch']} -> {memory['micro_batch']} to fit "
                     "the budget; gradient accumulation raised to keep the effective batch")
    if memory.get("offload_activations"):
        lines.append("offload:     checkpointed activations wait in pinned CPU memory during each step")
    return lines


def _budget(option: str | None, config_value: str | None, device: str) -> tuple[int, str, str]:
    """(bytes, where from, its text) for the fit checks."""
    if option:
        return parse_size(option), "--max-memory", option
    if config_value:
        return parse_size(config_value), "max_memory in the config", config_value
    if device == "cuda":
        free, name = free_gpu_memory()
        if free is not None:
            return free, f"free memory of this machine's {name}", f"{free / GiB:.2f}GB"
    return parse_size(DEFAULT_BUDGET), "default: an 8 GB GPU", DEFAULT_BUDGET


def plan(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Base model: alias (lqmf models list), hub id or folder."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per sequence (max_seq_length; default 512)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Micro-batch (default 2)."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="LoRA rank (default 16)."),
    targets: str | None = typer.Option(None, "--targets", help="LoRA target modules, comma-separated "
                                       "(default: the family's; all-linear for every linear layer)."),
    four_bit: bool | None = typer.Option(None, "--4bit/--no-4bit", help="4-bit NF4 base (default on)."),
    checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                              help="Recompute activations in backward (default on)."),
    task: str | None = typer.Option(None, "--task", help="chat (causal LM; default for decoders) or "
                                    "classification (default for encoders)."),
    offload: bool | None = typer.Option(None, "--offload/--no-offload",
                                        help="Count activations as offloaded to CPU memory (offload_activations=on)."),
    packing: bool | None = typer.Option(None, "--packing/--no-packing",
                                        help="Count examples as packed into --seq-len sequences (packing=on)."),
    tiled_mlp: bool | None = typer.Option(None, "--tiled-mlp/--no-tiled-mlp",
                                          help="Count the MLP as run in tiles of 2048 tokens (tiled_mlp=on)."),
    kept_layers: str | None = typer.Option(None, "--kept-layers", help="Count decoder layers kept from "
                                           "recomputation: off, auto or a number (kept_layers; default off)."),
    kept_mlps: str | None = typer.Option(None, "--kept-mlps", help="Count decoder layers whose MLP keeps gate "
                                         "and up for backward: off, auto or a number (kept_mlps; default off)."),
    recompute_dropout: bool | None = typer.Option(
        None, "--recompute-lora-dropout/--keep-lora-dropout", help="Count the LoRA dropout as recomputed in "
        "backward or kept (recompute_lora_dropout; default auto: kept where it fits the budget)."),
    device: str = typer.Option("cuda", "--device", help="cuda (bf16, 8-bit paged AdamW) or cpu (fp32)."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Budget, e.g. 8GB (default: the config's "
                                          "max_memory, else this machine's free GPU memory, else 8GB)."),
    config_name: str | None = typer.Option(None, "--config", "-c", help="Take defaults from this saved config."),
    gpus: int = typer.Option(1, "--gpus", help="Plan per GPU for a run on this many GPUs (lqmf train --gpus)."),
    strategy: str | None = typer.Option(None, "--strategy", help="With --gpus: ddp, fsdp or auto (default: "
                                        "the config's, else auto: ddp when it fits each GPU)."),
    serve_batch: int | None = typer.Option(None, "--serve-batch", min=1,
                                           help="Serving estimate for this many concurrent sequences (default: "
                                           "the most that fit)."),
    serve_seq_len: int = typer.Option(1024, "--serve-seq-len", min=1,
                                      help="Tokens per sequence (prompt + answer) for the serving estimate."),
    serve_adapters: int = ServeAdaptersOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Estimate peak training memory from config.json alone, and the largest batch and sequence that fit.

    Exits 5 (as `lqmf train` would fail) when not even micro-batch 1 fits the budget.
    """
    ws = workspace(ctx, workspace_dir)
    if device not in ("cuda", "cpu"):
        raise InputError(f"--device must be cuda or cpu, got {device!r}")
    if gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {gpus}")
    resolved = ModelCatalogue(ws).resolve(model)
    shape = require_shape(resolved)
    file_values = cfg.read_config_file(cfg.config_path(ws.configs_dir, config_name)) if config_name else {}
    options = {"max_seq_length": seq_len, "per_device_train_batch_size": batch_size, "lora_r": rank,
               "target_modules": targets, "use_4bit_quantization": four_bit,
               "use_gradient_checkpointing": checkpointing, "task_type": task, "max_memory": max_memory,
               "offload_activations": None if offload is None else ("on" if offload else "off"),
               "strategy": strategy, "packing": _switch(packing), "tiled_mlp": _switch(tiled_mlp),
               "kept_layers": kept_layers, "kept_mlps": kept_mlps, "recompute_lora_dropout": _switch(recompute_dropout)}
    overrides = {k: cfg.coerce_value(k, v, f"--{OPTION_NAMES[k]} ({k})") for k, v in options.items() if v is not None}
    config = cfg.resolve_config(file_values, overrides)
    if config.task_type is None:
        config.task_type = "classification" if shape.encoder else "chat"
    settings = settings_for(config, resolved, device=device, gpus=gpus)
    budget, budget_source, budget_text = _budget(max_memory, file_values.get("max_memory"), device)
    strategies = None
    if gpus > 1:
        settings, strategies = _split_over_gpus(shape, settings, config, gpus, budget)
    settings = budget_choices(shape, settings, budget, config)
    report = _plan_report(resolved, shape, settings, config, budget, budget_source)
    if strategies:
        report["gpus"], report["strategies"] = gpus, strategies
    report["serving"] = _serving(shape, settings, budget, serve_batch, serve_seq_len, serve_adapters)
    if json_output:
        print_json(report)
    else:
        _print_report(report, shape, settings, budget_text)
    if not report["largest_micro_batch"]:
        raise typer.Exit(RuntimeFailure.exit_code)


def _split_over_gpus(shape: ModelShape, settings: TrainSettings, config, gpus: int,
                     budget: int) -> tuple[TrainSettings, dict]:
    """The settings per GPU for a run on gpus, and how each strategy fits (--gpus > 1)."""
    effective = config.per_device_train_batch_size * (config.gradient_accumulation_steps or DEFAULT_ACCUMULATION)
    check_batch_split(effective, gpus)
    fits = fit_strategies(shape, settings, effective, budget, offload=config.offload_activations)
    chosen = choose_strategy(fits, config.strategy)
    settings = replace(settings, strategy=chosen or "fsdp", micro_batch=min(settings.micro_batch, effective // gpus))
    return settings, {"chosen": chosen, "effective_batch": effective, "per_gpu_batch": effective // gpus,
                      **{name: fit.to_dict() for name, fit in fits.items()}}


def _plan_report(resolved, shape: ModelShape, settings: TrainSettings, config, budget: int,
                 budget_source: str) -> dict:
    """The training estimate and what fits the budget (the largest micro-batch, sequence, alternatives).
    What fits is counted with the LoRA dropout recomputed unless asked otherwise: training keeps it only
    where it fits at the micro-batch chosen so."""
    result = estimate(shape, settings)
    settings = replace(settings, recompute_lora_dropout=config.recompute_lora_dropout != "off")
    report = {
        "model": resolved.reference, "source": resolved.source,
        "shape_from": "config.json" if resolved.config else "LQMF's table of catalogue models",
        "shape": asdict(shape), "parameters": shape.parameters, "settings": asdict(settings),
        "lora_dropout_kept": result.details["lora_dropout_kept"],
        "estimate": result.to_dict(), "budget_gb": round(budget / GiB, 3), "budget_source": budget_source,
        "fits": result.fits(budget),
        "largest_micro_batch": largest_micro_batch(shape, settings, budget),
        "longest_seq_len": largest_seq_len(shape, settings, budget),
        "longest_seq_len_packed": largest_seq_len(shape, replace(settings, pack_tokens=settings.seq_len), budget),
    }
    if settings.gradient_checkpointing and not settings.tiled and config.tiled_mlp != "off":
        tiled = replace(settings, tiled_mlp=True)
        report["longest_seq_len_tiled_mlp"] = largest_seq_len(shape, tiled, budget)
        report["longest_seq_len_tiled_mlp_packed"] = largest_seq_len(shape, replace(tiled, pack_tokens=1), budget)
    if settings.offloadable and not settings.offloaded:
        report["largest_micro_batch_offloaded"] = largest_micro_batch(
            shape, replace(settings, offload_activations=True), budget)
    report["would_fit_with"] = ([{"changes": alt.changes, "total_gb": round(alt.total / GiB, 3)}
                                 for alt in what_would_fit(shape, settings, budget)]
                                if not report["largest_micro_batch"] else [])
    return report


def _serving(shape: ModelShape, settings: TrainSettings, budget: int, sequences: int | None,
             seq_len: int, adapters: int) -> dict[str, Any]:
    """The serving estimate: weights, the adapter tables for `adapters` resident adapters of the plan's rank
    and projections (as `lqmf serve --max-adapters` holds them), and the KV cache of the sequences."""
    options = {"seq_len": seq_len, "quantize_4bit": settings.quantize_4bit, "device": settings.device,
               "lora_r": settings.lora_r, "target_modules": settings.target_modules,
               "adapters": adapter_tables_held(adapters)}
    largest = largest_serving_batch(shape, budget, **options)
    result = serving_estimate(shape, sequences=sequences or max(largest, 1), **options)
    return {**result.to_dict(), "resident_adapters": adapters, "largest_batch": largest, "fits": result.total <= budget}


def _print_report(report: dict[str, Any], shape: ModelShape, settings: TrainSettings, budget_text: str) -> None:
    targets = ",".join(settings.target_modules) if settings.target_modules else "all-linear"
    per_gpu = f"; per GPU of {report['gpus']}, {settings.strategy}" if report.get("gpus") else ""
    typer.echo(f"memory plan for {report['model']} ({report['parameters'] / 1e9:.2f}B parameters; shape from "
               f"{report['shape_from']}{per_gpu})")
    typer.echo(f"settings: {settings.device}, {'4-bit NF4' if settings.quantize_4bit else 'not quantized'}, "
               f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}"
               f"{', activations offloaded' if settings.offloaded else ''}"
               f"{f', {kept} layers kept' if (kept := report['estimate']['details']['kept_layers']) else ''}"
               f"{f', {mlps} MLPs kept' if (mlps := report['estimate']['details']['kept_mlps']) else ''}"
               f"{', LoRA dropout kept' if report['lora_dropout_kept'] and not settings.sharded else ''}"
               f", LoRA r={settings.lora_r} "
               f"on {targets}, micro-batch {settings.micro_batch} x {settings.seq_len} tokens, {settings.task}"
               f"{', chunked attention' if report['estimate']['details'].get('chunked_attention') else ''}")
    estimate_gb = report["estimate"]
    notes = component_notes(shape, settings, estimate_gb["details"])
    print_table([[label, f"{estimate_gb[f'{key}_gb']:.2f}", notes[key]] for key, label in COMPONENTS],
                ["component", "GB", "what"])
    if report.get("strategies"):
        _print_strategies(report["gpus"], report["strategies"])
    typer.echo(f"budget {report['budget_gb']:.2f} GB ({report['budget_source']}): "
               f"{'fits' if report['fits'] else 'does not fit'}")
    micro, longest = report["largest_micro_batch"], report["longest_seq_len"]
    at_micro = (f" (~{estimate(shape, replace(settings, micro_batch=micro)).total / GiB:.2f} GB)" if micro else "")
    typer.echo(f"largest micro-batch at {settings.seq_len} tokens: {micro or 'none'}{at_micro}")
    if report.get("largest_micro_batch_offloaded", 0) > micro:
        typer.echo(f"with activation offload (offload_activations=on): micro-batch "
                   f"{report['largest_micro_batch_offloaded']}")
    typer.echo(f"longest sequence at micro-batch {settings.micro_batch}: {_tokens(longest)}; packed (several "
               f"examples a sequence, attention inside each): {_tokens(report['longest_seq_len_packed'])}")
    if "longest_seq_len_tiled_mlp" in report:
        typer.echo(f"with the tiled MLP (tiled_mlp=on): {_tokens(report['longest_seq_len_tiled_mlp'])}; packed: "
                   f"{_tokens(report['longest_seq_len_tiled_mlp_packed'])}")
    if not report["fits"] and micro:
        typer.echo(f"fits at micro-batch {micro}: raise gradient accumulation to keep the effective batch")
    if report["would_fit_with"]:
        typer.echo("would fit at micro-batch 1 with: " + "; ".join(
            str(Alternative(alt["changes"], int(alt["total_gb"] * GiB))) for alt in report["would_fit_with"]))
    elif not micro:
        typer.echo(f"no single change makes it fit in {budget_text}: use a smaller model or a larger GPU")
    serving = report["serving"]
    fitting = (f"at most {serving['largest_batch']} sequences fit the budget (lqmf serve --max-batch)"
               if serving["largest_batch"] else f"not even one sequence of {serving['seq_len']} tokens fits "
               f"the budget ({budget_text})")
    typer.echo(f"serving (lqmf serve): {serving['sequences']} sequences x {serving['seq_len']} tokens ~"
               f"{serving['total']:.2f} GB (weights {serving['weights']:.2f}, {serving['resident_adapters']} adapters "
               f"{serving['adapters']:.2f}, "
               f"KV cache {serving['kv_cache']:.2f}, working {serving['working']:.2f}, allocator slack "
               f"{serving['allocator_slack']:.2f}, CUDA context {serving['cuda_context']:.2f}); {fitting}")


def _switch(flag: bool | None) -> str | None:
    return None if flag is None else ("on" if flag else "off")


def _tokens(count: int) -> str:
    return f"{count} tokens" if count else "none"


def _print_strategies(gpus: int, strategies: dict[str, Any]) -> None:
    share = strategies["per_gpu_batch"]
    typer.echo(f"on {gpus} GPUs, {share} of the effective batch of {strategies['effective_batch']} per GPU per step:")
    for name, what in (("ddp", "each GPU holds the whole 4-bit model"), ("fsdp", "weights and optimizer sharded")):
        fit = strategies[name]
        where = (f"fits at micro-batch {fit['micro_batch']} (~{fit['per_gpu_gb']:.2f} GB per GPU"
                 f"{', activations offloaded' if fit['offload_activations'] else ''})" if fit["fits"]
                 else f"does not fit (~{fit['per_gpu_gb']:.2f} GB per GPU at micro-batch 1)")
        typer.echo(f"  {name:5s} {where}; {what}")
    chosen = strategies["chosen"]
    typer.echo(f"strategy: {chosen}" if chosen else "strategy: neither fits; see below")
