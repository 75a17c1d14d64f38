"""One training run as a recipe (the shape of torchtune's): setup, then for each optimizer step
step (with out-of-memory recovery), log, evaluate and checkpoint; then finish.

The same recipe runs alone or as one rank of several (engine/train/distributed.py): each rank takes its
share of every step's examples, the ranks agree on every step's outcome before they exchange
gradients, and rank 0 alone writes the metrics log, checkpoints and the adapter.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from lqmf.core.config import TrainConfig
from lqmf.core.datasets import TaskDataset
from lqmf.core.errors import Interrupted, LqmfError, RankFailure, RuntimeFailure
from lqmf.core.faults import fault_point
from lqmf.core.fsutil import append_jsonl
from lqmf.core.memory_plan import GiB, lora_dropout_kept
from lqmf.core.models import ResolvedModel
from lqmf.engine.compat import checkpointed_layers
from lqmf.engine.fused.blocks import (
    TILE_TOKENS,
    fused_kernels_wanted,
    fused_rope,
    keep_mlps,
    tile_mlps,
    use_fused_kernels,
)
from lqmf.engine.fused.norm import lean_rms_norms
from lqmf.engine.loading import LoadedModel, compute_dtype, first_line, select_device
from lqmf.engine.lora.lean import recompute_lora_dropout
from lqmf.engine.train import fsdp
from lqmf.engine.train import loop as steps
from lqmf.engine.train.distributed import Collective
from lqmf.engine.train.memory import (
    is_out_of_memory,
    memory_in_use_gb,
    peak_memory_gb,
    release_memory,
    reset_peak_memory,
)
from lqmf.engine.train.offload import ActivationOffload, keep_layers


class _StopRequested(Exception):
    """Raised at a step boundary once every rank agreed to stop (a signal reached one of them)."""


class Recipe:
    """A LoRA adapter trained into staging: Recipe(...).run() -> Outcome."""

    def __init__(self, config: TrainConfig, model_ref: ResolvedModel, dataset: TaskDataset, staging: Path, *,
                 prepared: steps.Prepared, memory: steps.MemoryPlan, events: steps.Events | None = None,
                 resume: bool = False, collective: Collective | None = None, loss: steps.Loss | None = None):
        self.config, self.model_ref, self.dataset, self.staging = config, model_ref, dataset, staging
        self.prepared, self.memory, self.resume = prepared, memory, resume
        self.collective = collective or Collective()
        self.main = self.collective.is_main
        self.events = events if events is not None and self.main else steps.Events()
        self.sharded = memory.strategy == "fsdp" and self.collective.distributed
        self.classification = dataset.task == "classification"
        self.loss = loss or steps.Loss(steps.classification_loss_sum if self.classification else steps.answer_loss_sum,
                                       per_example=self.classification)
        self.pack_tokens = memory.pack_tokens if loss is None else 0  # another objective (KTO) reads whole rows
        self.log_path = staging / steps.METRICS_LOG
        self.total = prepared.total_steps

    # ------------------------------------------------------------------ setup

    def setup(self, loaded: LoadedModel | None = None) -> None:
        """Model (or the caller's, LoRA applied by steps.setup_model), optimizer, schedule, resumed state."""
        import torch
        from transformers import get_scheduler

        self._note_plan()
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        self.loaded = loaded or steps.setup_model(self.config, self.model_ref, self.prepared, self.dataset.task,
                                                  sharded=self.sharded)
        for note in self.loaded.notes:
            self.events.on_note(note)
        self.model = self.loaded.model  # the PEFT model: what is saved
        self.fused_kernels: dict[str, int] | None = None
        self._use_fused_kernels()
        self.lean_norms = 0 if self.fused_kernels else lean_rms_norms(self.model)
        if self.memory.tiled_mlp:
            tile_mlps(self.model)
        self._use_chunked_attention()
        self.kept_layers: list[int] = []
        self._keep_layers()
        self.kept_mlps: list[int] = []
        self._keep_mlps()
        self._keep_lora_dropout()
        self.fresh = {"step": 0, "epoch": 0, "step_in_epoch": 0, "micro_batch": self.prepared.micro_batch,
                      "history": [], "initial_eval": None, "last_eval": None, "elapsed_s": 0.0}
        checkpoint = steps.read_checkpoint(self.staging) if self.resume else None
        if checkpoint and self.sharded:  # LoRA weights go in before FSDP flattens them
            steps.apply_weights(self.model, checkpoint)
        counts = {"trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                  "total_params": sum(p.numel() for p in self.model.parameters())}  # before FSDP shards them
        self.adapter_keys = fsdp.adapter_keys(self.model) if self.sharded else {}
        self.runner = (fsdp.wrap(self.model, self.loaded.device, compute_dtype(select_device(self.loaded.device)))
                       if self.sharded else self.model)
        self.trainable = [p for p in self.runner.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_name = steps.make_optimizer(self.config, self.runner, self.loaded.device,
                                                                   self.sharded)
        self.scheduler = get_scheduler(self.config.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=int(self.config.warmup_ratio * self.total),
                                       num_training_steps=self.total)
        self.progress = self._resumed(checkpoint) if self.resume else dict(self.fresh)
        self.resumed_from = self.progress["step"] if self.resume else None
        self._log_fit()
        self.plan = {**self.prepared.plan(), **self.loaded.runtime(), "optimizer": self.optimizer_name, **counts,
                     "resumed_at_step": self.progress["step"], "memory": self.memory.to_dict()}
        self.events.on_plan(self.plan)

    def _use_fused_kernels(self) -> None:
        wanted, note = fused_kernels_wanted(self.config.fused_kernels, self.loaded.device, self.prepared.world_size,
                                            self.memory.tiled_mlp)
        if note:
            self.events.on_note(note)
        if not wanted:
            return
        self.fused_kernels = use_fused_kernels(self.model)
        counts = self.fused_kernels
        rope = f"RoPE in {counts['rope']} attention layers" if counts["rope"] else "transformers' RoPE (not fused here)"
        nf4 = f", the NF4 dequantize of {counts['nf4_dequantize']} 4-bit layers" if counts["nf4_dequantize"] else ""
        dropout = (f", the dropout of {counts['lora_dropout']} LoRA layers inside their rank-r product"
                   if counts["lora_dropout"] else "")
        self.events.on_note(f"fused kernels (liger-kernel): {counts['rms_norm']} RMSNorm, {counts['swiglu']} SwiGLU, "
                            f"{rope}{nf4}{dropout}")

    def _keep_layers(self) -> None:
        """Take the plan's kept layers out of gradient checkpointing (engine/train/offload.py), saying so."""
        memory = self.memory
        if not memory.kept_layers or not self.config.use_gradient_checkpointing:
            return
        kept = keep_layers(self.model, memory.kept_layers)
        self.kept_layers = kept
        where = "in pinned CPU memory" if memory.offload_activations else "on the device"
        self.events.on_note(f"kept layers: {len(kept)} of {len(checkpointed_layers(self.model))} decoder layers "
                            f"keep their activations {where} instead of recomputing them in backward "
                            f"(kept_layers={self.config.kept_layers})"
                            if kept else f"kept_layers={self.config.kept_layers}: "
                            f"{type(self.model.get_base_model()).__name__} has no layers checkpointed one by one; "
                            "every layer is recomputed")

    def _keep_mlps(self) -> None:
        """Have the plan's kept MLPs keep gate and up for backward (engine/fused/blocks.py: KeptMLP), saying so."""
        count = self.memory.kept_mlps
        if not count or not self.config.use_gradient_checkpointing or self.memory.tiled_mlp:
            return
        layers = checkpointed_layers(self.model)
        self.kept_mlps = keep_mlps(layers, count, self.kept_layers)
        self.events.on_note(f"kept MLPs: {len(self.kept_mlps)} of {len(layers)} decoder layers keep their MLP's gate "
                            "and up on the device instead of recomputing them in backward "
                            f"(kept_mlps={self.config.kept_mlps})" if self.kept_mlps else
                            f"kept_mlps={self.config.kept_mlps}: {type(self.model.get_base_model()).__name__} has no "
                            "MLPs in layers checkpointed one by one; every MLP is recomputed")

    def _keep_lora_dropout(self) -> None:
        """Where the plan says so, have the LoRA layers keep their dropout's output and mask for backward
        instead of recomputing it (engine/lora/lean.py: _low_rank), saying so. PEFT's forward (FSDP) keeps
        them anyway; the fused kernels keep neither (they draw the mask again in backward)."""
        self.lora_dropout_kept = lora_dropout_kept(self.config.lora_dropout, self.sharded,
                                                   self.memory.recompute_lora_dropout,
                                                   bool(self.fused_kernels and self.fused_kernels["lora_dropout"]))
        if self.lora_dropout_kept and not self.sharded:
            recompute_lora_dropout(self.model, False)
            asked = self.config.recompute_lora_dropout
            self.events.on_note("LoRA dropout: its output and mask are kept for backward "
                                f"{'(they fit the budget) ' if asked == 'auto' else ''}instead of recomputed "
                                f"(recompute_lora_dropout={asked})")

    def _use_chunked_attention(self) -> None:
        from lqmf.engine.fused import attention

        rows = self.pack_tokens or self.config.max_seq_length
        if not attention.wanted(self.model.config, rows, bool(self.pack_tokens)):
            return
        if attention.use_chunked_attention(self.model):
            self.events.on_note(f"chunked attention on: {attention.QUERY_CHUNK} queries at a time against the keys "
                                f"they see, no {rows} x {rows} mask")
        else:
            self.events.on_note(f"{type(self.model.get_base_model()).__name__} cannot switch its attention: "
                                f"transformers builds a {rows} x {rows} mask for each micro-batch")

    def _note_plan(self) -> None:
        memory, config = self.memory, self.config
        for note in self.prepared.notes:
            self.events.on_note(note)
        if memory.micro_batch != memory.requested_micro_batch:
            self.events.on_note(steps.fit_message(memory, self.prepared.effective_batch))
        if memory.offload_activations:
            self.events.on_note(f"activation offload on: checkpointed activations wait in pinned CPU memory "
                                f"(offload_activations={config.offload_activations})")
        elif config.offload_activations == "on":
            without = " and no FSDP" if memory.strategy == "fsdp" else ""
            self.events.on_note(f"offload_activations=on needs CUDA and gradient checkpointing{without}; not "
                                f"offloading on {memory.device}")
        if self.pack_tokens:
            self.events.on_note(f"packing on: examples end to end in sequences of up to {self.pack_tokens} tokens, "
                                f"attention inside each (packing={config.packing})")
        if memory.tiled_mlp:
            self.events.on_note(f"tiled MLP on: each block's MLP runs {TILE_TOKENS} tokens at a time "
                                f"(tiled_mlp={config.tiled_mlp})")
        if memory.gpus > 1:
            self.events.on_note(f"{memory.strategy} on {memory.gpus} processes: {self.prepared.micro_batch} x "
                                f"{self.prepared.accumulation} examples each per step")

    def _resumed(self, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
        """The progress saved in staging's checkpoint (or fresh, saying so); metrics past it are dropped."""
        if checkpoint is None:
            if self.main:
                steps.truncate_log(self.log_path, None)
            self.events.on_note(f"no checkpoint in {self.staging} (the run stopped before its first save): "
                                f"starting again from step 0/{self.total}")
            return dict(self.fresh)
        if not self.sharded:
            steps.apply_weights(self.model, checkpoint)
        state = checkpoint["state"]
        if self.sharded:
            fsdp.load_optimizer_state(self.runner, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        steps.set_rng_state(state["rng"])
        progress = {**self.fresh, **state["progress"]}
        progress["micro_batch"] = min(progress["micro_batch"], self.fresh["micro_batch"])
        dropped = steps.truncate_log(self.log_path, progress["step"]) if self.main else 0
        self.events.on_note(f"resumed from step {progress['step']}/{self.total}"
                            + (f" ({dropped} metrics records after that step dropped)" if dropped else ""))
        return progress

    def _log_fit(self) -> None:
        memory = self.memory
        if memory.micro_batch != memory.requested_micro_batch and self.main:
            append_jsonl(self.log_path, steps.memory_record(
                "fit", self.progress["step"], memory.requested_micro_batch, memory.micro_batch,
                self.prepared.effective_batch, memory.gpus, budget_gb=memory.to_dict()["budget_gb"],
                budget_source=memory.budget_source))

    # ------------------------------------------------------------------ the loop

    def run(self, loaded: LoadedModel | None = None) -> steps.Outcome:
        self.setup(loaded)
        with self._rotary_context():
            return self._run_loop()

    def _rotary_context(self):
        """liger-kernel's RoPE for the run where the fused kernels are on (fused_rope)."""
        return fused_rope(self.model) if self.fused_kernels and self.fused_kernels["rope"] else nullcontext()

    def _run_loop(self) -> steps.Outcome:
        if (self.prepared.validation and self.config.eval_at_start and self.progress["step"] == 0
                and self.progress["initial_eval"] is None):
            self.progress["initial_eval"] = self.evaluate(0, 0.0)
        self.runner.train()
        reset_peak_memory(self.loaded.device)
        self.started = time.perf_counter() - self.progress["elapsed_s"]
        self.offload = (ActivationOffload(self.loaded.device, ahead_bytes=self.memory.kept_block_bytes)
                        if self.memory.offload_activations else None)
        self._start_window()
        with steps.StopFlag() as self.stop:
            try:
                while self.progress["step"] < self.total:
                    self.run_epoch()
            except _StopRequested:
                self.progress["elapsed_s"] = time.perf_counter() - self.started
                self.checkpoint()
                signum = self.stop.signum or signal.SIGINT
                self.stop_all(Interrupted(
                    f"training {'terminated' if signum == signal.SIGTERM else 'interrupted'} after step "
                    f"{self.progress['step']}/{self.total}; checkpoint saved: lqmf train --resume "
                    f"{self.config.job_name} continues it", exit_code=128 + signum))
        self.evaluate_final_weights()
        return self.finish()

    def run_epoch(self) -> None:
        progress, effective = self.progress, self.prepared.effective_batch
        order = list(range(len(self.prepared.train)))
        random.Random(self.config.seed + progress["epoch"]).shuffle(order)
        groups = [order[i: i + effective] for i in range(0, len(order), effective)]
        while progress["step_in_epoch"] < len(groups) and progress["step"] < self.total:
            rows = [self.prepared.train[i] for i in groups[progress["step_in_epoch"]]]
            outcome = self.step(rows)
            if outcome is None:
                continue  # out of memory: the micro-batch shrank, the step runs again
            progress["step"] += 1
            progress["step_in_epoch"] += 1
            epoch_done = progress["step_in_epoch"] >= len(groups)
            epoch_float = progress["epoch"] + progress["step_in_epoch"] / len(groups)
            self.log(outcome, epoch_float)
            self.maybe_evaluate(epoch_done, epoch_float)
            if epoch_done:
                progress["epoch"] += 1
                progress["step_in_epoch"] = 0
            progress["elapsed_s"] = time.perf_counter() - self.started
            step = progress["step"]
            if (self.config.save_steps and step % self.config.save_steps == 0) or epoch_done or step == self.total:
                self.checkpoint()
            if step < self.total and (outcome["stop"] or not self.collective.distributed and self.stop.requested):
                raise _StopRequested  # alone, also a signal that came while it checkpointed
            if epoch_done:
                return

    def _share(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This rank's contiguous part of a step's examples (sizes differ by at most one)."""
        world, rank = self.collective.world_size, self.collective.topology.rank
        bounds = [len(rows) * r // world for r in range(world + 1)]
        return rows[bounds[rank]: bounds[rank + 1]]

    def step(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Forward and backward over this rank's share of rows, then (all ranks agreeing) one optimizer
        step; None when out of memory made the micro-batch shrink and the step must run again."""
        import torch

        micro, world = self.progress["micro_batch"], self.collective.world_size
        units = steps.loss_units(rows, self.loss.per_example)  # over every rank's rows: the loss is their mean
        mine = self._share(rows)
        passes = math.ceil(math.ceil(len(rows) / world) / micro) if self.sharded else 0
        oom = failure = None
        try:
            loss = steps.forward_backward(self.runner, self.loss.sum, mine, units, micro,
                                          self.loaded.tokenizer.pad_token_id, self.classification, self.loaded.device,
                                          self.offload, passes, rows[:1],
                                          scale=world if self.sharded else 1,  # FSDP averages over ranks
                                          pack_tokens=self.pack_tokens)
        except Exception as err:
            if is_out_of_memory(err):
                oom = first_line(err)
            elif not self.collective.distributed:
                raise
            else:
                failure = err.message if isinstance(err, LqmfError) else f"{type(err).__name__}: {first_line(err)}"
        any_oom, any_failure, stop = self.collective.agree(oom is not None, failure is not None, self.stop.requested)
        if any_failure:
            self.fail_together(failure)
        if any_oom:
            self.recover_from_oom(oom or "out of memory on another rank")
            return None
        if not self.sharded:
            self.collective.sum_gradients(self.trainable)
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = (fsdp.clip_grad_norm(self.runner, self.config.max_grad_norm) if self.sharded
                         else torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window_loss += loss
        self.window_units += units
        self.window_tokens += sum(len(r["input_ids"]) for r in rows)
        return {"grad_norm": grad_norm, "stop": bool(stop)}  # ranks stop after the same step

    def recover_from_oom(self, reason: str) -> None:
        """Halve the micro-batch (keeping the effective batch); at micro-batch 1, stop with a checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)  # the half-done step's gradients
        release_memory(self.loaded.device)
        micro = self.progress["micro_batch"]
        share = self.prepared.effective_batch // self.collective.world_size
        smaller = steps.divisor_at_most(share, micro // 2)
        if smaller == 0:
            if self.progress["step"] > 0:
                self.checkpoint()
            try:
                steps.stop_out_of_memory(self.config, self.progress, reason)
            except RuntimeFailure as err:
                self.stop_all(err)
        self.progress["micro_batch"] = smaller
        record = steps.memory_record("out_of_memory", self.progress["step"] + 1, micro, smaller,
                                      self.prepared.effective_batch, self.collective.world_size, error=reason,
                                      memory_gb=memory_in_use_gb(self.loaded.device))
        if self.main:
            append_jsonl(self.log_path, record)
        self.events.on_note(
            f"out of memory in step {record['step']} at micro-batch {micro}: micro-batch {micro} -> {smaller}, "
            f"gradient accumulation {share // micro} -> {share // smaller} (effective batch "
            f"{self.prepared.effective_batch} unchanged); redoing step {record['step']}")

    def fail_together(self, failure: str | None) -> None:
        """A step failed on some rank: every rank stops; rank 0 keeps the last finished step's checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        failures = [(rank, text) for rank, text in enumerate(self.collective.gather(failure)) if text]
        saved = self.progress["step"] > 0
        if saved:
            self.checkpoint()
        rank, text = failures[0]
        kept = (f"; steps 1-{self.progress['step']} are checkpointed: lqmf train --resume {self.config.job_name} "
                "continues" if saved else "")
        world = self.collective.world_size
        step = self.progress["step"] + 1
        self.stop_all(RuntimeFailure(f"step {step} failed on rank {rank} of {world}: {text}{kept}"))

    def stop_all(self, error: LqmfError) -> None:
        """Raise error where every rank decided the same: rank 0 reports it, the others exit quietly."""
        if self.main:
            raise error from None
        raise RankFailure(error.message, exit_code=error.exit_code) from None

    # ------------------------------------------------------------------ log, evaluate, checkpoint

    def _start_window(self) -> None:
        import torch

        self.window_loss = torch.zeros((), device=self.loaded.device)
        self.window_units = self.window_tokens = 0
        self.window_start = time.perf_counter()

    def log(self, outcome: dict[str, Any], epoch: float) -> None:
        step = self.progress["step"]
        if step % self.config.logging_steps and step != self.total:
            return
        loss = float(self.collective.sum_(self.window_loss)) / max(self.window_units, 1)  # waits for the device
        now = time.perf_counter()
        elapsed = now - self.started
        grad_norm = outcome["grad_norm"]
        record = {
            "type": "train", "step": step, "total_steps": self.total, "epoch": round(epoch, 3), "loss": loss,
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
            "memory_gb": memory_in_use_gb(self.loaded.device),
            "elapsed_s": elapsed, "eta_s": elapsed / step * (self.total - step) if step else None,
        }
        self.progress["history"].append(record)
        if self.main:
            append_jsonl(self.log_path, record)
        self.events.on_step(record)
        self._start_window()

    def maybe_evaluate(self, epoch_done: bool, epoch: float) -> None:
        config, step = self.config, self.progress["step"]
        if self.prepared.validation and (
            (config.eval_strategy == "steps" and config.eval_steps and step % config.eval_steps == 0)
            or (config.eval_strategy == "epoch" and epoch_done)
        ):
            self.progress["last_eval"] = self.evaluate(step, epoch)

    def evaluate_final_weights(self) -> None:
        """Evaluate the weights about to be saved unless the last evaluation was of exactly these (the
        manifest's metrics and its improved mark then describe the shipped adapter)."""
        progress = self.progress
        last = progress["last_eval"]
        if self.prepared.validation and self.config.eval_strategy != "no" and (
                last is None or last["step"] != progress["step"]):
            epoch = progress["step"] / self.prepared.steps_per_epoch
            progress["last_eval"] = self.evaluate(progress["step"], epoch)

    def evaluate(self, step: int, epoch: float) -> dict[str, Any]:
        """Every rank evaluates the whole held-out split (no exchange needed); on out of memory the
        evaluation batch halves."""
        batch_size = max(1, self.progress["micro_batch"] * 2)
        runner = replace(self.loaded, model=self.runner)
        while True:
            try:
                result = steps.evaluate(runner, self.prepared.validation, self.classification, batch_size,
                                        len(self.prepared.labels))
                break
            except Exception as err:
                if batch_size == 1 or not is_out_of_memory(err) or self.sharded:
                    raise
            release_memory(self.loaded.device)
            batch_size //= 2
            self.events.on_note(f"out of memory while evaluating: evaluation batch {batch_size * 2} -> {batch_size}")
        record = {"type": "eval", "step": step, "epoch": round(epoch, 3), **{f"eval_{k}": v for k, v in result.items()}}
        if self.main:
            append_jsonl(self.log_path, record)
        self.events.on_eval(record)
        return record

    def checkpoint(self) -> None:
        """Rank 0 saves the state after the last finished step (under FSDP every rank gathers it first)."""
        weights = optimizer = None
        if self.sharded:
            weights = fsdp.trainable_state_dict(self.runner, self.adapter_keys)
            optimizer = fsdp.optimizer_state(self.runner, self.optimizer)
        if self.main:
            steps.save_checkpoint(self.staging, self.model, self.optimizer, self.scheduler, self.progress,
                                  weights=weights, optimizer_state=optimizer)
        self.collective.barrier()

    # ------------------------------------------------------------------ finish

    def finish(self) -> steps.Outcome:
        """Rank 0 saves the adapter; every rank returns the metrics (peak memory: the largest rank's)."""
        import torch

        weights = fsdp.trainable_state_dict(self.runner, self.adapter_keys) if self.sharded else None
        if self.main:
            # The last step's checkpoint stays in staging until the finished adapter is in place
            # (Registry.finalize removes it): a kill at any instant leaves the adapter or a resumable run.
            fault_point("train.final_checkpoint")
            steps.save_adapter(self.model, self.staging, weights)
            fault_point("train.adapter_saved")
        device = self.loaded.device
        peaks = self.collective.gather(peak_memory_gb(device))
        reserved = self.collective.gather(torch.cuda.max_memory_reserved() / GiB if device == "cuda" else None)
        progress, prepared = self.progress, self.prepared
        train_records = [h for h in progress["history"] if h["type"] == "train"]
        metrics: dict[str, Any] = {
            "train_loss": train_records[-1]["loss"] if train_records else None,
            "first_train_loss": train_records[0]["loss"] if train_records else None,
            "steps": progress["step"], "epochs": round(progress["step"] / prepared.steps_per_epoch, 3),
            "train_seconds": round(time.perf_counter() - self.started, 2), "peak_memory_gb": max(peaks),
        }
        if len(peaks) > 1:
            metrics["peak_memory_gb_per_process"] = peaks
        if device == "cuda":
            metrics["peak_memory_reserved_gb"] = max(reserved)
        if progress["last_eval"]:
            metrics.update({k: v for k, v in progress["last_eval"].items() if k.startswith("eval_")})
        if progress["initial_eval"]:
            metrics["initial"] = {k: v for k, v in progress["initial_eval"].items() if k.startswith("eval_")}
        runtime = {**self.loaded.runtime(), "optimizer": self.optimizer_name, "micro_batch": progress["micro_batch"],
                   "gradient_accumulation": prepared.effective_batch // prepared.world_size // progress["micro_batch"],
                   "processes": prepared.world_size, "strategy": self.memory.strategy,
                   "offload_activations": self.offload is not None, "pack_tokens": self.pack_tokens,
                   "tiled_mlp": self.memory.tiled_mlp, "fused_kernels": self.fused_kernels,
                   "lean_norms": self.lean_norms, "kept_layers": self.kept_layers, "kept_mlps": self.kept_mlps,
                   "lora_dropout_kept": self.lora_dropout_kept,
                   "memory_estimate_gb": round(self.memory.estimate.total / GiB, 3) if self.memory.estimate else None,
                   "chat_template": prepared.chat_template, "trainable_params": self.plan["trainable_params"],
                   "resumed_from_step": self.resumed_from}
        return steps.Outcome(metrics, runtime, progress["history"])


def train(config: TrainConfig, model_ref: ResolvedModel, dataset: TaskDataset, staging: Path,
          events: steps.Events | None = None, prepared: steps.Prepared | None = None, resume: bool = False,
          memory: steps.MemoryPlan | None = None, loaded: LoadedModel | None = None, collective=None,
          loss: steps.Loss | None = None) -> steps.Outcome:
    """Train a LoRA adapter into staging (PEFT files + metrics log) and return its metrics.

    memory is plan_memory's result for prepared, when the caller has it already; loaded a model the
    caller set up already (setup_model, e.g. on a base it keeps loaded; seed torch before that);
    collective the ranks of a multi-process run (engine/train/distributed.py); loss another objective
    than the task's (engine/train/kto.py).
    """
    prepared = prepared or steps.prepare(config, model_ref, dataset)
    memory = memory or steps.plan_memory(config, model_ref, prepared)
    recipe = Recipe(config, model_ref, dataset, staging, prepared=prepared, memory=memory, events=events,
                    resume=resume, collective=collective, loss=loss)
    return recipe.run(loaded)
