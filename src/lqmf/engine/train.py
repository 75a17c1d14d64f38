"""LoRA / QLoRA training: setup -> run -> save, resumable, interruptible.

The loop is our own (not transformers.Trainer) so that it can change its micro-batch without
losing its place, checkpoint on Ctrl-C, compute the loss only on answer tokens without
materialising full-vocabulary logits, and sync with the device only when it logs.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lqmf.core.config import TrainConfig
from lqmf.core.datasets import TaskDataset
from lqmf.core.errors import Interrupted, RuntimeFailure
from lqmf.core.fsutil import append_jsonl
from lqmf.core.memory_plan import (
    GiB,
    MemoryEstimate,
    TrainSettings,
    estimate,
    fit_budget,
    gb,
    model_shape,
    settings_for,
    what_would_fit,
)
from lqmf.core.metrics import classification_scores
from lqmf.core.models import ResolvedModel
from lqmf.engine import data as data_mod
from lqmf.engine.fastgen import use_lean_lora
from lqmf.engine.loading import (
    LoadedModel,
    first_line,
    four_bit_support,
    load_model,
    load_tokenizer,
    quiet_libraries,
    select_device,
)
from lqmf.engine.memory import (
    is_out_of_memory,
    memory_budget,
    memory_in_use_gb,
    peak_memory_gb,
    release_memory,
    reset_peak_memory,
)
from lqmf.engine.offload import ActivationOffload

CHECKPOINT_DIR = "checkpoint"
METRICS_LOG = "metrics.jsonl"
LOSS_CHUNK_TOKENS = 1024


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

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation

    def plan(self) -> dict[str, Any]:
        return {
            "train_examples": len(self.train), "validation_examples": len(self.validation),
            "labels": self.labels, "micro_batch": self.micro_batch,
            "gradient_accumulation": self.accumulation, "effective_batch": self.effective_batch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "train_tokens_per_epoch": self.train_tokens, "longest_example_tokens": self.max_tokens,
            "chat_template": self.chat_template, "dropped_examples": self.dropped, "notes": self.notes,
        }


def split_examples(dataset: TaskDataset, fraction: float, seed: int):
    """Seeded train/validation split through `datasets` (stratified for classification)."""
    from datasets import ClassLabel, Dataset

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


def prepare(config: TrainConfig, model: ResolvedModel, dataset: TaskDataset) -> Prepared:
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
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(train.rows) / (micro * accumulation)))
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
    return Prepared(train.rows, val.rows, dataset.labels, micro, accumulation, steps_per_epoch, total,
                    sum(len(r["input_ids"]) for r in train.rows), max(train.max_tokens, val.max_tokens),
                    train.notes + val.notes, template, train.dropped + val.dropped, tokenizer)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "requested_micro_batch": self.requested_micro_batch,
            "micro_batch": self.micro_batch, "offload_activations": self.offload_activations,
            "budget_gb": round(self.budget / GiB, 4) if self.budget else None,
            "budget_source": self.budget_source, "model_shape_from": self.shape_source,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


def plan_memory(config: TrainConfig, model: ResolvedModel, prepared: Prepared) -> MemoryPlan:
    """Estimate the run's peak memory and pick the largest micro-batch, at most the one asked for,
    that fits the budget (max_memory, or the GPU's free memory) while keeping the effective batch.
    With offload_activations=auto, activations are offloaded when that fits a larger micro-batch.

    Adjusts prepared's micro-batch and accumulation; raises RuntimeFailure, saying what would fit,
    when even micro-batch 1 does not. Loads no weights.
    """
    device = select_device(config.device)
    quantize = config.use_4bit_quantization and four_bit_support(device) is None
    shape, source = model_shape(model)
    requested = prepared.micro_batch
    settings = None
    if shape is not None:
        settings = settings_for(config, model, device=device.type,
                                seq_len=min(config.max_seq_length, prepared.max_tokens), micro_batch=requested,
                                num_labels=max(len(prepared.labels), 2), quantize_4bit=quantize)
    if settings is None:
        offloadable = TrainSettings(device=device.type,
                                    gradient_checkpointing=config.use_gradient_checkpointing).offloadable
        return MemoryPlan(device.type, requested, requested, None, source,
                          offload_activations=config.offload_activations == "on" and offloadable)
    budget, budget_source, context_counted = memory_budget(config.max_memory, device.type)
    micro = requested
    if budget is not None:
        micro, settings = fit_budget(shape, settings, prepared.effective_batch, budget, context_counted,
                                     config.offload_activations)
        if micro == 0:
            needed = estimate(shape, replace(settings, micro_batch=1))
            options = what_would_fit(shape, settings, budget, context_counted)
            fix = (f"it would fit with {' or '.join(str(option) for option in options)}" if options
                   else "no single change makes it fit; use a smaller model")
            raise RuntimeFailure(
                f"training needs about {gb(needed.total)} even at micro-batch 1 ({settings.seq_len} tokens, "
                f"r={settings.lora_r}, {'4-bit' if quantize else 'not quantized'}), more than the "
                f"{gb(budget)} of {budget_source}: {fix}"
            )
        prepared.micro_batch, prepared.accumulation = micro, prepared.effective_batch // micro
    return MemoryPlan(device.type, requested, micro, estimate(shape, replace(settings, micro_batch=micro)), source,
                      budget, budget_source, settings.offloaded)


# ----------------------------------------------------------------------------- model


def load_base(config: TrainConfig, model_ref: ResolvedModel, prepared: Prepared, task: str) -> LoadedModel:
    """The base model as training loads it (4-bit if asked and possible), not yet wrapped with LoRA."""
    quiet_libraries()
    loaded = load_model(model_ref, task=task, device_preference=config.device,
                        quantize_4bit=config.use_4bit_quantization, labels=prepared.labels or None, training=True,
                        tokenizer=prepared.tokenizer)
    if loaded.quantized and loaded.device == "cpu":
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 inference the first time a layer runs
        # in eval mode and never unpacks them for training (its in-place bias add then fails in
        # backward); our per-epoch evaluation would trigger it, so keep the training layout.
        for module in loaded.model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return loaded


def setup_model(config: TrainConfig, model_ref: ResolvedModel, prepared: Prepared, task: str,
                base: LoadedModel | None = None) -> LoadedModel:
    """Load the base (or take base, already loaded by load_base) and wrap it with a fresh LoRA adapter.

    A caller that passes base gets its model back with `result.model.unload()` (LoRA layers removed).
    """
    quiet_libraries()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    loaded = replace(base) if base is not None else load_base(config, model_ref, prepared, task)
    model = loaded.model
    # Unlike peft's prepare_model_for_kbit_training, frozen layers stay in their load dtype (bf16 on
    # GPUs): upcasting embeddings, norms and lm_head to fp32 costs ~0.5 GB on a 7B model and buys
    # nothing under autocast. Trainable parameters (LoRA, classifier heads) are fp32 below.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.use_gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets = config.target_modules or model_ref.target_modules or "all-linear"
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none",
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    try:
        loaded.model = get_peft_model(model, lora)
    except ValueError as err:
        raise RuntimeFailure(f"LoRA setup failed for target_modules={targets}: {err}") from None
    for parameter in loaded.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
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


def _answer_loss_sum(model, batch) -> Any:
    """Summed cross-entropy over answer tokens, computing logits only where labels are set.

    Falls back to the model's own logits for architectures that post-process them.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT-wrapped or bare
    labels = batch["labels"][:, 1:]
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    plain_head = (head is not None and decoder is not None
                  and not getattr(base.config, "final_logit_softcapping", None)
                  and getattr(base.config, "logit_scale", None) in (None, 1, 1.0))
    device_type = batch["input_ids"].device.type
    with autocast(device_type):
        if not plain_head:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=data_mod.IGNORE_INDEX, reduction="sum")
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = labels != data_mod.IGNORE_INDEX
    picked = hidden[:, :-1][mask]
    targets = labels[mask]

    def chunk_loss(h, y):
        with autocast(device_type):
            logits = head(h)
        return F.cross_entropy(logits.float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], LOSS_CHUNK_TOKENS):
        end = start + LOSS_CHUNK_TOKENS
        total = total + checkpoint(chunk_loss, picked[start:end], targets[start:end], use_reentrant=False)
    return total


def _classification_logits(model, batch):
    with autocast(batch["input_ids"].device.type):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _classification_loss_sum(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(_classification_logits(model, batch), batch["labels"], reduction="sum")


def _units(rows: list[dict[str, Any]], classification: bool) -> int:
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
                loss_sum += float(_answer_loss_sum(model, batch))
            units += _units(chunk, classification)
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


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(staging: Path, model, optimizer, scheduler, progress: dict[str, Any]) -> None:
    """Replace staging/checkpoint with the state after the last finished optimizer step."""
    import shutil

    import torch

    final = staging / CHECKPOINT_DIR
    tmp = staging / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "progress": progress, "rng": _rng_state()}, tmp / "training_state.pt")
    old = staging / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(staging: Path, model, optimizer, scheduler) -> dict[str, Any]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = staging / CHECKPOINT_DIR
    weights = load_file(str(folder / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    state = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["progress"]


def has_checkpoint(staging: Path) -> bool:
    return (staging / CHECKPOINT_DIR / "training_state.pt").is_file()


def _forward_backward(model, loss_fn, rows, units, micro, pad, classification, device,
                      offload: ActivationOffload | None = None):
    """Forward and backward over one optimizer step's examples in micro-batches; the summed loss."""
    import contextlib

    import torch

    total = torch.zeros((), device=device)
    for start in range(0, len(rows), micro):
        batch = _to_device(data_mod.collate(rows[start: start + micro], pad, classification), device)
        try:
            with offload or contextlib.nullcontext():
                loss = loss_fn(model, batch)
            (loss / max(units, 1)).backward()
        finally:  # also after an out-of-memory error, so a retry does not find the old tensors held
            if offload is not None:
                offload.clear()
        total += loss.detach()
    return total


def _divisor_at_most(effective: int, limit: int) -> int:
    """The largest micro-batch <= limit that divides the effective batch (0 when limit < 1)."""
    return next((m for m in range(limit, 0, -1) if effective % m == 0), 0)


def _memory_record(event: str, step: int, before: int, after: int, effective: int, **extra: Any) -> dict[str, Any]:
    """A metrics.jsonl line saying how and why the micro-batch changed."""
    return {"type": "memory", "event": event, "step": step, "micro_batch": [before, after],
            "gradient_accumulation": [math.ceil(effective / before), math.ceil(effective / after)],
            "effective_batch": effective, **extra}


def _fit_message(memory: MemoryPlan, effective: int) -> str:
    before, after = memory.requested_micro_batch, memory.micro_batch
    return (f"micro-batch {before} -> {after} to fit {gb(memory.budget or 0)} of {memory.budget_source} "
            f"(estimated peak {gb(memory.estimate.total if memory.estimate else 0)}); gradient accumulation "
            f"{effective // before} -> {effective // after}, effective batch {effective} unchanged")


def _stop_out_of_memory(staging: Path, model, optimizer, scheduler, progress: dict[str, Any], config: TrainConfig,
                        reason: str) -> None:
    """Out of memory at micro-batch 1: keep what is done and say what would need less memory."""
    if progress["step"] > 0:
        save_checkpoint(staging, model, optimizer, scheduler, progress)
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
    """First Ctrl-C: finish the current step, checkpoint and stop. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- run


@dataclass
class Outcome:
    metrics: dict[str, Any]
    runtime: dict[str, Any]
    history: list[dict[str, Any]]


def make_optimizer(config: TrainConfig, model, device: str):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay), \
                "paged_adamw_8bit"
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay), "adamw_torch"


def train(config: TrainConfig, model_ref: ResolvedModel, dataset: TaskDataset, staging: Path,
          events: Events | None = None, prepared: Prepared | None = None, resume: bool = False,
          memory: MemoryPlan | None = None, loaded: LoadedModel | None = None) -> Outcome:
    """Train a LoRA adapter into staging (PEFT files + metrics log) and return its metrics.

    memory is plan_memory's result for prepared, when the caller has it already; loaded a model the
    caller set up already (setup_model on a base it keeps loaded; it seeds torch before that).
    """
    import torch
    from transformers import get_scheduler

    events = events or Events()
    classification = dataset.task == "classification"
    prepared = prepared or prepare(config, model_ref, dataset)
    for note in prepared.notes:
        events.on_note(note)
    memory = memory or plan_memory(config, model_ref, prepared)
    if memory.micro_batch != memory.requested_micro_batch:
        events.on_note(_fit_message(memory, prepared.effective_batch))
    if memory.offload_activations:
        events.on_note(f"activation offload on: checkpointed activations wait in pinned CPU memory "
                       f"(offload_activations={config.offload_activations})")
    elif config.offload_activations == "on":
        events.on_note(f"offload_activations=on needs CUDA and gradient checkpointing; not offloading on "
                       f"{memory.device}")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    loaded = loaded or setup_model(config, model_ref, prepared, dataset.task)
    for note in loaded.notes:
        events.on_note(note)
    model = loaded.model
    optimizer, optimizer_name = make_optimizer(config, model, loaded.device)
    total = prepared.total_steps
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * total), num_training_steps=total)
    log_path = staging / METRICS_LOG
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0, "micro_batch": prepared.micro_batch,
                "history": [], "initial_eval": None, "elapsed_s": 0.0}
    if resume and has_checkpoint(staging):
        progress = load_checkpoint(staging, model, optimizer, scheduler)
        progress["micro_batch"] = min(progress["micro_batch"], prepared.micro_batch)
        events.on_note(f"resumed from step {progress['step']}/{total}")
    effective = prepared.effective_batch
    if memory.micro_batch != memory.requested_micro_batch:
        append_jsonl(log_path, _memory_record("fit", progress["step"], memory.requested_micro_batch,
                                              memory.micro_batch, effective, budget_gb=memory.to_dict()["budget_gb"],
                                              budget_source=memory.budget_source))
    plan = {**prepared.plan(), **loaded.runtime(), "optimizer": optimizer_name,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()), "resumed_at_step": progress["step"],
            "memory": memory.to_dict()}
    events.on_plan(plan)
    n_labels = len(prepared.labels)

    def run_eval(step: int, epoch: float) -> dict[str, Any]:
        batch_size = max(1, progress["micro_batch"] * 2)
        while True:
            try:
                result = evaluate(loaded, prepared.validation, classification, batch_size, n_labels)
                break
            except Exception as err:
                if batch_size == 1 or not is_out_of_memory(err):
                    raise
            release_memory(loaded.device)
            batch_size //= 2
            events.on_note(f"out of memory while evaluating: evaluation batch {batch_size * 2} -> {batch_size}")
        record = {"type": "eval", "step": step, "epoch": round(epoch, 3),
                  **{f"eval_{k}": v for k, v in result.items()}}
        append_jsonl(log_path, record)
        events.on_eval(record)
        return record

    if prepared.validation and config.eval_at_start and progress["step"] == 0 and progress["initial_eval"] is None:
        progress["initial_eval"] = run_eval(0, 0.0)

    model.train()
    reset_peak_memory(loaded.device)
    started = time.perf_counter() - progress["elapsed_s"]
    pad = loaded.tokenizer.pad_token_id
    loss_fn = _classification_loss_sum if classification else _answer_loss_sum
    offload = ActivationOffload(loaded.device) if memory.offload_activations else None
    last_eval: dict[str, Any] | None = None
    window_loss = torch.zeros((), device=loaded.device)
    window_units = 0
    window_tokens = 0
    window_start = time.perf_counter()
    with StopFlag() as stop:
        try:
            while progress["step"] < total:
                epoch = progress["epoch"]
                order = list(range(len(prepared.train)))
                random.Random(config.seed + epoch).shuffle(order)
                groups = [order[i: i + effective] for i in range(0, len(order), effective)]
                while progress["step_in_epoch"] < len(groups) and progress["step"] < total:
                    rows = [prepared.train[i] for i in groups[progress["step_in_epoch"]]]
                    units = _units(rows, classification)
                    micro = progress["micro_batch"]
                    try:
                        step_loss = _forward_backward(model, loss_fn, rows, units, micro, pad, classification,
                                                      loaded.device, offload)
                    except Exception as err:
                        if not is_out_of_memory(err):
                            raise
                        reason = first_line(err)
                    else:
                        reason = None
                    if reason is not None:  # handled here, once the traceback and its tensors are gone
                        optimizer.zero_grad(set_to_none=True)  # the half-done step's gradients
                        release_memory(loaded.device)
                        smaller = _divisor_at_most(effective, micro // 2)
                        if smaller == 0:
                            _stop_out_of_memory(staging, model, optimizer, scheduler, progress, config, reason)
                        progress["micro_batch"] = smaller
                        record = _memory_record("out_of_memory", progress["step"] + 1, micro, smaller, effective,
                                                error=reason, memory_gb=memory_in_use_gb(loaded.device))
                        append_jsonl(log_path, record)
                        events.on_note(f"out of memory in step {record['step']} at micro-batch {micro}: micro-batch "
                                       f"{micro} -> {smaller}, gradient accumulation "
                                       f"{record['gradient_accumulation'][0]} -> {record['gradient_accumulation'][1]} "
                                       f"(effective batch {effective} unchanged); redoing step {record['step']}")
                        continue
                    window_loss += step_loss
                    window_tokens += sum(len(r["input_ids"]) for r in rows)
                    window_units += units
                    grad_norm = None
                    if config.max_grad_norm > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress["step"] += 1
                    progress["step_in_epoch"] += 1
                    step = progress["step"]
                    epoch_float = epoch + progress["step_in_epoch"] / len(groups)
                    if step % config.logging_steps == 0 or step == total:
                        loss_value = float(window_loss) / max(window_units, 1)  # waits for the device
                        now = time.perf_counter()
                        elapsed = now - started
                        record = {
                            "type": "train", "step": step, "total_steps": total, "epoch": round(epoch_float, 3),
                            "loss": loss_value,
                            "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm) if grad_norm is not None else None,
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "memory_gb": memory_in_use_gb(loaded.device),
                            "elapsed_s": elapsed, "eta_s": elapsed / step * (total - step) if step else None,
                        }
                        progress["history"].append(record)
                        append_jsonl(log_path, record)
                        events.on_step(record)
                        window_loss.zero_()
                        window_units = window_tokens = 0
                        window_start = time.perf_counter()
                    epoch_done = progress["step_in_epoch"] >= len(groups)
                    if prepared.validation and (
                        (config.eval_strategy == "steps" and config.eval_steps and step % config.eval_steps == 0)
                        or (config.eval_strategy == "epoch" and epoch_done)
                        or (config.eval_strategy != "no" and step == total and last_eval is None)
                    ):
                        last_eval = run_eval(step, epoch_float)
                    if epoch_done:
                        progress["epoch"] += 1
                        progress["step_in_epoch"] = 0
                    progress["elapsed_s"] = time.perf_counter() - started
                    if (config.save_steps and step % config.save_steps == 0) or (epoch_done and step < total):
                        save_checkpoint(staging, model, optimizer, scheduler, progress)
                    if stop.requested and step < total:
                        raise KeyboardInterrupt
                    if epoch_done:
                        break
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)
            progress["elapsed_s"] = time.perf_counter() - started
            save_checkpoint(staging, model, optimizer, scheduler, progress)
            raise Interrupted(
                f"training interrupted after step {progress['step']}/{total}; checkpoint saved in {staging}"
            ) from None

    model.save_pretrained(staging)
    import shutil

    shutil.rmtree(staging / CHECKPOINT_DIR, ignore_errors=True)
    train_records = [h for h in progress["history"] if h["type"] == "train"]
    metrics: dict[str, Any] = {
        "train_loss": train_records[-1]["loss"] if train_records else None,
        "first_train_loss": train_records[0]["loss"] if train_records else None,
        "steps": progress["step"], "epochs": round(progress["step"] / prepared.steps_per_epoch, 3),
        "train_seconds": round(time.perf_counter() - started, 2),
        "peak_memory_gb": peak_memory_gb(loaded.device),
    }
    if loaded.device == "cuda":
        metrics["peak_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    if last_eval:
        metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
    if progress["initial_eval"]:
        metrics["initial"] = {k: v for k, v in progress["initial_eval"].items() if k.startswith("eval_")}
    runtime = {**loaded.runtime(), "optimizer": optimizer_name, "micro_batch": progress["micro_batch"],
               "gradient_accumulation": math.ceil(effective / progress["micro_batch"]),
               "offload_activations": offload is not None,
               "memory_estimate_gb": round(memory.estimate.total / GiB, 3) if memory.estimate else None,
               "chat_template": prepared.chat_template, "trainable_params": plan["trainable_params"]}
    return Outcome(metrics, runtime, progress["history"])
