"""LoRA / QLoRA training: setup -> run -> save, resumable, interruptible.

The loop is our own (not transformers.Trainer) so that it can change its micro-batch without
losing its place, checkpoint on Ctrl-C, compute the loss only on answer tokens without
materialising full-vocabulary logits, and sync with the device only when it logs.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lqmf.core.config import TrainConfig
from lqmf.core.datasets import TaskDataset
from lqmf.core.distributed import check_batch_split, quant_storage_for
from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.faults import fault_point
from lqmf.core.fsutil import atomic_write_text, fsync_dir, fsync_tree
from lqmf.core.memory_plan import (
    GiB,
    MemoryEstimate,
    TrainSettings,
    asked_kept_layers,
    budget_choices,
    choose_strategy,
    estimate,
    fit_budget,
    fit_strategies,
    gb,
    kept_block_bytes,
    model_shape,
    packing_wanted,
    settings_for,
    what_would_fit,
)
from lqmf.core.metrics import classification_scores
from lqmf.core.models import ResolvedModel
from lqmf.core.schedule import plan_schedule
from lqmf.engine import data as data_mod
from lqmf.engine.compat import keep_4bit_training_layout, repoint
from lqmf.engine.fused import checkpointing
from lqmf.engine.fused.loss import LOSS_CHUNK_TOKENS, linear_cross_entropy
from lqmf.engine.loading import (
    LoadedModel,
    compute_dtype,
    first_line,
    four_bit_support,
    load_model,
    load_tokenizer,
    quiet_libraries,
    select_device,
)
from lqmf.engine.lora.lean import build_lean_layers, use_lean_lora
from lqmf.engine.train.memory import (
    cap_allocator,
    memory_budget,
    process_baseline_bytes,
)
from lqmf.engine.train.offload import ActivationOffload

CHECKPOINT_DIR = "checkpoint"
TRAINING_STATE = "training_state.pt"
# What a run keeps in staging besides the adapter: removed once the finished adapter is in place.
CHECKPOINT_FOLDERS = (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.tmp", f"{CHECKPOINT_DIR}.old")
METRICS_LOG = "metrics.jsonl"


class Events:
    """What the training loop reports; the CLI renders it. Every method is optional."""

    def on_plan(self, plan: dict[str, Any]) -> None: ...
    def on_note(self, message: str) -> None: ...
    def on_step(self, record: dict[str, Any]) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...


@dataclass
class Prepared:
    """The data side of a run, ready before any model weights load."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: list[str]
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    train_tokens: int
    max_tokens: int
    notes: list[str] = field(default_factory=list)
    chat_template: str | None = None
    dropped: int = 0
    tokenizer: Any = None  # the tokenizer that encoded the examples, reused for training
    world_size: int = 1  # processes sharing each step's examples (micro_batch and accumulation are per process)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def plan(self) -> dict[str, Any]:
        return {
            "train_examples": len(self.train), "validation_examples": len(self.validation),
            "labels": self.labels, "micro_batch": self.micro_batch,
            "gradient_accumulation": self.accumulation, "effective_batch": self.effective_batch,
            "processes": self.world_size,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "train_tokens_per_epoch": self.train_tokens, "longest_example_tokens": self.max_tokens,
            "chat_template": self.chat_template, "dropped_examples": self.dropped, "notes": self.notes,
        }


def split_examples(dataset: TaskDataset, fraction: float, seed: int):
    """Seeded train/validation split through `datasets` (stratified for classification)."""
    from datasets import ClassLabel, Dataset

    quiet_libraries()  # no progress bars from `datasets` (compress and bench split here too)
    table = Dataset.from_list(dataset.examples)
    n = len(table)
    n_val = 0 if fraction <= 0 or n < 4 else max(1, round(n * fraction))
    if n_val == 0:
        return list(table), []
    stratify = None
    if dataset.task == "classification":
        table = table.cast_column("label", ClassLabel(names=dataset.labels))
        if min(dataset.label_counts.values()) >= 2 and n_val >= len(dataset.labels):
            stratify = "label"
    parts = table.train_test_split(test_size=n_val, seed=seed, stratify_by_column=stratify)
    names = dataset.labels

    def rows(part):
        if dataset.task != "classification":
            return list(part)
        return [{"text": r["text"], "label": names[r["label"]]} for r in part]

    return rows(parts["train"]), rows(parts["test"])


def prepare(config: TrainConfig, model: ResolvedModel, dataset: TaskDataset, processes: int = 1) -> Prepared:
    """Split, tokenise and count steps; loads the tokenizer only."""
    quiet_libraries()
    tokenizer = load_tokenizer(model)
    task = dataset.task
    template = None if task == "classification" else data_mod.ensure_chat_template(tokenizer)
    train_ex, val_ex = split_examples(dataset, config.validation_split, config.seed)
    label_ids = {label: i for i, label in enumerate(dataset.labels)} if dataset.labels else None
    train = data_mod.encode_examples(tokenizer, train_ex, task, config.max_seq_length, config.overlong,
                                     label_ids, source="training")
    val = data_mod.encode_examples(tokenizer, val_ex, task, config.max_seq_length, config.overlong,
                                   label_ids, source="validation")
    if not train.rows:
        raise RuntimeFailure("no training examples left after applying max_seq_length")
    micro = config.per_device_train_batch_size
    schedule = plan_schedule(len(train.rows), micro, config.gradient_accumulation_steps, config.num_train_epochs,
                             config.max_steps, processes)
    config.gradient_accumulation_steps, config.num_train_epochs = schedule.accumulation, schedule.epochs
    return Prepared(train.rows, val.rows, dataset.labels, micro, schedule.accumulation, schedule.steps_per_epoch,
                    schedule.total_steps, sum(len(r["input_ids"]) for r in train.rows),
                    max(train.max_tokens, val.max_tokens), [*schedule.notes, *train.notes, *val.notes], template,
                    train.dropped + val.dropped, tokenizer)


@dataclass
class MemoryPlan:
    """The estimated peak memory of a run, and the micro-batch that fits its budget."""

    device: str
    requested_micro_batch: int
    micro_batch: int
    estimate: MemoryEstimate | None  # at micro_batch; None when the model's shape is unknown
    shape_source: str
    budget: int | None = None
    budget_source: str | None = None
    offload_activations: bool = False
    gpus: int = 1
    strategy: str = "single"  # single | ddp | fsdp
    strategies: dict[str, Any] | None = None  # with several GPUs: how each strategy fits
    pack_tokens: int = 0  # examples packed into sequences of up to this many tokens (0: no packing)
    tiled_mlp: bool = False
    kept_layers: int = 0  # blocks not recomputed in backward (engine/train/offload.py)
    kept_block_bytes: int = 0  # what one of them holds for backward (the planner's count)
    kept_mlps: int = 0  # blocks whose MLP keeps gate and up for backward (engine/fused/blocks.py: KeptMLP)
    recompute_lora_dropout: bool = True  # LQMF's LoRA forward recomputes its dropout in backward (lora/lean.py)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "gpus": self.gpus, "strategy": self.strategy, "strategies": self.strategies,
            "requested_micro_batch": self.requested_micro_batch,
            "micro_batch": self.micro_batch, "offload_activations": self.offload_activations,
            "pack_tokens": self.pack_tokens, "tiled_mlp": self.tiled_mlp, "kept_layers": self.kept_layers,
            "kept_mlps": self.kept_mlps, "recompute_lora_dropout": self.recompute_lora_dropout,
            "budget_gb": round(self.budget / GiB, 4) if self.budget else None,
            "budget_source": self.budget_source, "model_shape_from": self.shape_source,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


def plan_memory(config: TrainConfig, model: ResolvedModel, prepared: Prepared, gpus: int = 1) -> MemoryPlan:
    """Estimate the run's peak memory (per GPU on several) and pick the largest micro-batch, at most
    the one asked for, that fits the budget (max_memory, or the GPU's free memory) while keeping the
    effective batch. With offload_activations=auto, activations are offloaded, with tiled_mlp=auto the
    MLP runs in tiles, when that fits a larger micro-batch; packing=auto packs short examples unless
    that fits a smaller one. On several GPUs config.strategy (auto: DDP when it fits, else FSDP) decides.

    Sets prepared's world size, micro-batch and accumulation (per process); raises RuntimeFailure,
    saying what would fit, when even micro-batch 1 does not. Loads no weights.
    """
    device = select_device(config.device)
    cap_allocator(config.gpu_memory_cap, device.type)
    quantize = config.use_4bit_quantization and four_bit_support(device) is None
    shape, source = model_shape(model)
    effective = prepared.effective_batch
    if gpus > 1:
        check_batch_split(effective, gpus)
        prepared.world_size = gpus
        prepared.micro_batch = divisor_at_most(effective // gpus, prepared.micro_batch)
        prepared.accumulation = effective // gpus // prepared.micro_batch
    requested = prepared.micro_batch
    strategy = "single" if gpus == 1 else (config.strategy if config.strategy != "auto" else "ddp")
    packed = packing_wanted(config.packing, config.task_type or "", [len(r["input_ids"]) for r in prepared.train],
                            config.max_seq_length)
    pack_tokens = config.max_seq_length if packed else 0
    settings = None
    if shape is not None:
        settings = settings_for(config, model, device=device.type,
                                seq_len=min(config.max_seq_length, prepared.max_tokens), micro_batch=requested,
                                num_labels=max(len(prepared.labels), 2), quantize_4bit=quantize, gpus=gpus,
                                strategy=strategy if gpus > 1 else "ddp")
        settings = replace(settings, pack_tokens=pack_tokens)
    if settings is None:
        offloadable = TrainSettings(device=device.type, gradient_checkpointing=config.use_gradient_checkpointing,
                                    gpus=gpus, strategy=strategy).offloadable
        return MemoryPlan(device.type, requested, requested, None, source,
                          offload_activations=config.offload_activations == "on" and offloadable,
                          gpus=gpus, strategy=strategy, pack_tokens=pack_tokens,
                          tiled_mlp=config.tiled_mlp == "on" and config.use_gradient_checkpointing,
                          kept_layers=asked_kept_layers(config.kept_layers),
                          kept_mlps=asked_kept_layers(config.kept_mlps) if config.tiled_mlp != "on" else 0,
                          recompute_lora_dropout=config.recompute_lora_dropout != "off")
    settings = replace(settings, process_baseline=process_baseline_bytes(device.type))
    budget, budget_source, context_counted = memory_budget(config.max_memory, device.type, config.gpu_memory_cap)
    strategies = None
    if gpus > 1 and budget is not None:
        fits = fit_strategies(shape, settings, effective, budget, context_counted, config.offload_activations,
                              config.tiled_mlp)
        strategies = {name: fit.to_dict() for name, fit in fits.items()}
        strategy = choose_strategy(fits, config.strategy) or "fsdp"
        settings = replace(settings, strategy=strategy)
    micro = requested
    share = effective // gpus
    if budget is not None:
        micro, settings = fit_budget(shape, settings, share, budget, context_counted, config.offload_activations,
                                     config.tiled_mlp)
        if pack_tokens and config.packing == "auto":  # the packed estimate is an upper bound: never fit less
            unpacked = fit_budget(shape, replace(settings, pack_tokens=0), share, budget, context_counted,
                                  config.offload_activations, config.tiled_mlp)
            if unpacked[0] > micro:
                (micro, settings), pack_tokens = unpacked, 0
        if micro == 0:
            _does_not_fit(shape, settings, budget, budget_source, context_counted, quantize, strategy, gpus)
        prepared.micro_batch, prepared.accumulation = micro, share // micro
    settings = budget_choices(shape, replace(settings, micro_batch=micro), budget, config, context_counted)
    final, kept = estimate(shape, settings), settings.kept_layers
    return MemoryPlan(device.type, requested, micro, final, source, budget, budget_source, settings.offloaded, gpus,
                      strategy, strategies, pack_tokens, settings.tiled, kept,
                      kept_block_bytes(shape, settings) if kept else 0, final.details["kept_mlps"],
                      settings.recompute_lora_dropout)


def _does_not_fit(shape, settings: TrainSettings, budget: int, budget_source: str, context_counted: bool,
                  quantize: bool, strategy: str, gpus: int) -> None:
    """Raise RuntimeFailure: even micro-batch 1 does not fit; say what would."""
    needed = estimate(shape, replace(settings, micro_batch=1))
    options = what_would_fit(shape, settings, budget, context_counted)
    fix = (f"it would fit with {' or '.join(str(option) for option in options)}" if options
           else "no single change makes it fit; use a smaller model")
    per_gpu = f" per GPU ({strategy} on {gpus})" if gpus > 1 else ""
    raise RuntimeFailure(
        f"training needs about {gb(needed.total)}{per_gpu} even at micro-batch 1 ({settings.seq_len} tokens, "
        f"r={settings.lora_r}, {'4-bit' if quantize else 'not quantized'}), more than the "
        f"{gb(budget)} of {budget_source}: {fix}"
    )


# ----------------------------------------------------------------------------- model


def load_base(config: TrainConfig, model_ref: ResolvedModel, prepared: Prepared, task: str,
              sharded: bool = False) -> LoadedModel:
    """The base model as training loads it (4-bit if asked and possible), not yet wrapped with LoRA;
    sharded: 4-bit storage in the compute dtype, as FSDP needs."""
    quiet_libraries()
    device = select_device(config.device)
    storage = quant_storage_for(config.bnb_4bit_quant_storage, sharded,
                                str(compute_dtype(device)).replace("torch.", ""))
    loaded = load_model(model_ref, task=task, device_preference=config.device,
                        quantize_4bit=config.use_4bit_quantization, labels=prepared.labels or None, training=True,
                        tokenizer=prepared.tokenizer, quant_storage=storage)
    if loaded.quantized and loaded.device == "cpu":
        keep_4bit_training_layout(loaded.model)  # our per-epoch evaluation would repack the weights
    return loaded


def setup_model(config: TrainConfig, model_ref: ResolvedModel, prepared: Prepared, task: str,
                sharded: bool = False, base: LoadedModel | None = None) -> LoadedModel:
    """Load the base (or take base, already loaded by load_base) and wrap it with a fresh LoRA adapter;
    sharded: set up for FSDP (4-bit storage in the compute dtype, PEFT's own LoRA forward).

    A caller that passes base gets its model back with `result.model.unload()` (LoRA layers removed).
    """
    quiet_libraries()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    loaded = replace(base) if base is not None else load_base(config, model_ref, prepared, task, sharded)
    model = loaded.model
    # Unlike peft's prepare_model_for_kbit_training, frozen layers stay in their load dtype (bf16 on
    # GPUs): upcasting embeddings, norms and lm_head to fp32 costs ~0.5 GB on a 7B model and buys
    # nothing under autocast. Trainable parameters (LoRA, classifier heads) are fp32 below.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.use_gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(checkpointing.OPTIONS))
    model.config.use_cache = False
    targets = config.target_modules or model_ref.target_modules or "all-linear"
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none",
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    if not sharded:
        build_lean_layers(lora)
    try:
        loaded.model = get_peft_model(model, lora)
    except ValueError as err:
        raise RuntimeFailure(f"LoRA setup failed for target_modules={targets}: {err}") from None
    for parameter in loaded.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            repoint(parameter, parameter.data.float())
    if not sharded:
        use_lean_lora(loaded.model)
    return loaded


def autocast(device_type: str):
    """bf16/fp16 autocast on CUDA (fp32 master weights for what trains); nothing elsewhere."""
    import contextlib

    import torch

    if device_type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model reads from a collated batch: ids with their padding mask, or packed ids with the
    position ids that restart at each example (data.collate_packed); transformers then keeps each
    example's attention inside it."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def answer_loss_sum(model, batch) -> Any:
    """Summed cross-entropy over answer tokens, computing logits only where labels are set.

    A frozen plain linear head takes engine/fused/loss.py's linear cross-entropy (no logits kept, nothing
    recomputed; under FSDP the root unit's weights are gathered for the whole step, and the head's is
    read only in forward); another head checkpointed chunks; architectures that post-process logits
    their model's own logits.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT-wrapped or bare
    labels = batch["labels"][:, 1:]
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    plain_head = (head is not None and decoder is not None
                  and not getattr(base.config, "final_logit_softcapping", None)
                  and getattr(base.config, "logit_scale", None) in (None, 1, 1.0))
    device_type = batch["input_ids"].device.type
    inputs = model_inputs(batch)
    sharded = is_sharded(model)
    with autocast(device_type):
        if not plain_head:
            logits = model(**inputs).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=data_mod.IGNORE_INDEX, reduction="sum")
        if sharded:  # through the root unit (it gathers the embeddings), no logits
            hidden = model(**inputs, output_hidden_states=True,
                           logits_to_keep=batch["input_ids"].new_zeros(0)).hidden_states[-1]
        else:
            hidden = decoder(**inputs).last_hidden_state
    mask = labels != data_mod.IGNORE_INDEX
    picked = hidden[:, :-1][mask]
    targets = labels[mask]
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        with autocast(device_type):
            return linear_cross_entropy(picked, head.weight, targets)

    def chunk_loss(h, y):
        with autocast(device_type):
            logits = head(h)
        return F.cross_entropy(logits.float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], LOSS_CHUNK_TOKENS):
        end = start + LOSS_CHUNK_TOKENS
        total = total + checkpointing.checkpoint(chunk_loss, picked[start:end], targets[start:end])
    return total


def is_sharded(model) -> bool:
    """Whether model is wrapped by FSDP (engine/train/fsdp.py)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _classification_logits(model, batch):
    with autocast(batch["input_ids"].device.type):
        return model(**model_inputs(batch)).logits.float()


def classification_loss_sum(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(_classification_logits(model, batch), batch["labels"], reduction="sum")


@dataclass
class Loss:
    """A training objective: sum(model, batch) is the summed loss of a micro-batch; it is averaged over
    examples (per_example) or over answer tokens."""

    sum: Callable[[Any, dict[str, Any]], Any]
    per_example: bool = False


def loss_units(rows: list[dict[str, Any]], classification: bool) -> int:
    """What the loss is averaged over: examples, or answer tokens (after the shift)."""
    if classification:
        return len(rows)
    return sum(sum(1 for label in r["labels"][1:] if label != data_mod.IGNORE_INDEX) for r in rows)


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(loaded: LoadedModel, rows: list[dict[str, Any]], classification: bool, batch_size: int,
             n_labels: int = 0) -> dict[str, float]:
    import torch

    model = loaded.model
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    units = 0
    truth: list[int] = []
    predicted: list[int] = []
    pad = loaded.tokenizer.pad_token_id
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            batch = _to_device(data_mod.collate(chunk, pad, classification), loaded.device)
            if classification:
                logits = _classification_logits(model, batch)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                truth += batch["labels"].tolist()
                predicted += logits.argmax(-1).tolist()
            else:
                loss_sum += float(answer_loss_sum(model, batch))
            units += loss_units(chunk, classification)
    if was_training:
        model.train()
    result = {"loss": loss_sum / max(units, 1)}
    if not classification:
        result["perplexity"] = math.exp(min(result["loss"], 50))
    else:
        result.update(classification_scores(truth, predicted, n_labels))
    return result


# ----------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model, folder: Path, weights: dict[str, Any] | None = None) -> None:
    """The PEFT adapter files of model; weights: its adapter state gathered from FSDP's shards, keyed
    as PEFT saves it (engine/train/fsdp.py), written as PEFT writes it."""
    if weights is None:
        model.save_pretrained(folder)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[model.active_adapter].save_pretrained(folder)
    save_file({key: tensor.contiguous() for key, tensor in weights.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def save_checkpoint(staging: Path, model, optimizer, scheduler, progress: dict[str, Any],
                    weights: dict[str, Any] | None = None, optimizer_state: dict[str, Any] | None = None) -> None:
    """Replace staging/checkpoint with the state after the last finished optimizer step (under FSDP:
    weights and optimizer_state, gathered whole).

    training_state.pt holds only tensors and plain containers, so that it loads with
    torch.load(weights_only=True), which runs no code from the file.
    """
    import shutil

    import torch

    final = staging / CHECKPOINT_DIR
    tmp = staging / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, weights)
    torch.save({"optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": progress, "rng": _rng_state()},
               tmp / TRAINING_STATE)
    fsync_tree(tmp)
    fault_point("checkpoint.written")
    old = staging / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
        fault_point("checkpoint.moved_aside")
    tmp.rename(final)
    fsync_dir(staging)
    fault_point("checkpoint.replaced")
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_folder(staging: Path) -> Path | None:
    """The newest complete checkpoint in staging: checkpoint/, or checkpoint.old/ when a kill came
    between moving the old one aside and putting the new one in place."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (staging / name / TRAINING_STATE).is_file():
            return staging / name
    return None


def read_checkpoint(staging: Path) -> dict[str, Any] | None:
    """{"weights": the adapter's tensors, "state": optimizer, scheduler, progress, rng} of staging's
    newest complete checkpoint, checked; None when there is none."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = checkpoint_folder(staging)
    if folder is None:
        return None
    state_file = folder / TRAINING_STATE
    try:
        # weights_only: a planted file must not run code; ours holds only tensors and plain containers
        state = torch.load(state_file, weights_only=True)
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except pickle.UnpicklingError:
        raise InputError(f"{state_file}: refused to load: it holds objects other than tensors and plain "
                         "values (not a checkpoint LQMF wrote); remove the run with lqmf adapters remove "
                         "--broken") from None
    except (OSError, RuntimeError, EOFError, SafetensorError) as err:
        raise InputError(f"{folder}: the checkpoint is unreadable ({first_line(err)}); remove the run with "
                         "lqmf adapters remove --broken") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "progress", "rng"} <= set(state):
        raise InputError(f"{state_file}: not a checkpoint LQMF wrote (missing keys)")
    return {"weights": weights, "state": state}


def check_resumable(staging: Path, total_steps: int, max_steps: int) -> None:
    """Refuse to resume a checkpoint already past this run's last step (it would finish with more steps
    than asked for); the training state is memory-mapped, not read whole."""
    import torch

    folder = checkpoint_folder(staging)
    if folder is None:
        return
    try:
        step = torch.load(folder / TRAINING_STATE, weights_only=True, mmap=True)["progress"]["step"]
    except Exception:  # noqa: BLE001 - read_checkpoint names what is wrong with it when the run loads it
        return
    if step > total_steps:
        raise InputError(f"the checkpoint in {staging} is at step {step}, past this run's {total_steps} steps "
                         f"(max_steps {max_steps}): resume with a larger --max-steps, or without it")


def apply_weights(model, checkpoint: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, checkpoint["weights"])


def has_checkpoint(staging: Path) -> bool:
    return checkpoint_folder(staging) is not None


def truncate_log(log_path: Path, step: int | None) -> int:
    """Drop metrics records past a checkpoint's step (all of them without one); returns how many.

    A resumed run logs its steps again from there, so the log never holds one step twice.
    """
    if not log_path.is_file():
        return 0
    lines = log_path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if step is not None and isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def forward_backward(model, loss_fn, rows, units, micro, pad, classification, device,
                      offload: ActivationOffload | None = None, passes: int = 0, filler=None, scale: float = 1.0,
                      pack_tokens: int = 0):
    """Forward and backward over one optimizer step's examples in micro-batches; the summed loss.

    The gradients are of the loss summed over rows divided by units, times scale. With passes, at least that many
    micro-batches run: the ones past rows run filler (one example) at weight 0, so that every FSDP
    rank joins the same number of gathers. With pack_tokens, each micro-batch's rows are packed into
    sequences of at most that many tokens (data.pack) instead of padded rows.
    """
    import contextlib

    import torch

    total = torch.zeros((), device=device)
    if pack_tokens:  # each micro-batch's examples in as few sequences as fit, without padding between them
        batches = [(data_mod.collate_packed(data_mod.pack(rows[start: start + micro], pack_tokens), pad), 1.0)
                   for start in range(0, len(rows), micro)]
    else:
        batches = [(data_mod.collate(rows[start: start + micro], pad, classification), 1.0)
                   for start in range(0, len(rows), micro)]
    if passes > len(batches):
        batches += [(data_mod.collate(filler, pad, classification), 0.0)] * (passes - len(batches))
    for collated, weight in batches:
        batch = _to_device(collated, device)
        try:
            with offload or contextlib.nullcontext():
                loss = loss_fn(model, batch) * weight
            (loss * (scale / max(units, 1))).backward()
        finally:  # also after an out-of-memory error, so a retry does not find the old tensors held
            if offload is not None:
                offload.clear()
        total += loss.detach()
    return total


def divisor_at_most(effective: int, limit: int) -> int:
    """The largest micro-batch <= limit that divides the effective batch (0 when limit < 1)."""
    return next((m for m in range(limit, 0, -1) if effective % m == 0), 0)


def memory_record(event: str, step: int, before: int, after: int, effective: int, processes: int = 1,
                   **extra: Any) -> dict[str, Any]:
    """A metrics.jsonl line saying how and why the micro-batch (each process's) changed."""
    share = effective // processes
    return {"type": "memory", "event": event, "step": step, "micro_batch": [before, after],
            "gradient_accumulation": [math.ceil(share / before), math.ceil(share / after)],
            "effective_batch": effective, **extra}


def fit_message(memory: MemoryPlan, effective: int) -> str:
    before, after = memory.requested_micro_batch, memory.micro_batch
    share = effective // memory.gpus
    return (f"micro-batch {before} -> {after} to fit {gb(memory.budget or 0)} of {memory.budget_source} "
            f"(estimated peak {gb(memory.estimate.total if memory.estimate else 0)}); gradient accumulation "
            f"{share // before} -> {share // after}, effective batch {effective} unchanged")


def stop_out_of_memory(config: TrainConfig, progress: dict[str, Any], reason: str) -> None:
    """Out of memory at micro-batch 1 (what is done is checkpointed): say what would need less memory."""
    fixes = [f"a shorter max_seq_length (now {config.max_seq_length})", f"a lower lora_r (now {config.lora_r})"]
    if not config.use_4bit_quantization:
        fixes.append("use_4bit_quantization=true")
    if not config.use_gradient_checkpointing:
        fixes.append("use_gradient_checkpointing=true")
    kept = (f"; steps 1-{progress['step']} are checkpointed: lqmf train --resume {config.job_name} "
            "--set key=value continues with new settings" if progress["step"] > 0 else "")
    raise RuntimeFailure(f"out of memory in step {progress['step'] + 1} even at micro-batch 1 ({reason}); "
                         f"try {', '.join(fixes)}{kept}")


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (systemd, docker stop, schedulers): finish the current step,
    checkpoint and stop (exit 130 or 143). A second signal stops at once, as a kill would: the last
    saved checkpoint is kept, and one line (no traceback) says so.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        os.write(2, b"error: interrupted again: stopped at once; the last saved checkpoint is kept\n")
        os._exit(128 + signum)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@dataclass
class Outcome:
    metrics: dict[str, Any]
    runtime: dict[str, Any]
    history: list[dict[str, Any]]


def parameter_groups(config: TrainConfig, model) -> list[dict[str, Any]]:
    """The trainable parameters; a classifier head (PEFT's modules_to_save) at head_learning_rate."""
    head, lora = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if "modules_to_save" in name else lora).append(parameter)
    groups = [{"params": lora, "lr": config.learning_rate}]
    if head:
        groups.append({"params": head, "lr": config.head_learning_rate or config.learning_rate})
    return [group for group in groups if group["params"]]


def make_optimizer(config: TrainConfig, model, device: str, sharded: bool = False):
    """Paged 8-bit AdamW on CUDA (also under DDP); torch's AdamW on the CPU and over FSDP's flat shards."""
    import torch

    params = parameter_groups(config, model)
    if device == "cuda" and not sharded:
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay), \
                "paged_adamw_8bit"
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay), "adamw_torch"
