"""Inference with a registered adapter (or its bare base): generation and classification.

`lqmf test`, `lqmf bench` and `lqmf serve` all load adapters through `load_for_inference`, so
an answer is produced the same way everywhere.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core.datasets import prompt_messages
from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.progress import phase
from lqmf.core.registry import AdapterEntry, Registry
from lqmf.core.workspace import Workspace
from lqmf.engine import data as data_mod
from lqmf.engine.loading import LoadedModel, load_model, quiet_libraries
from lqmf.engine.model_cache import KEPT

ACTIVE = "\0active"  # InferenceModel.selected outside `adapter_context`: PEFT's active adapter


@dataclass
class InferenceModel:
    """A base model, optionally wrapped by PEFT with one or more adapters resident."""

    loaded: LoadedModel
    task: str
    base: ResolvedModel
    labels: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    adapter_paths: dict[str, Path] = field(default_factory=dict)  # PEFT adapter name -> the folder it came from
    fast_decode: bool | None = None  # the batched decoder, a batch of one (decode/batched.py); None: on CUDA
    decoder: Any = None  # that BatchedDecoder, made on first use
    stacked: list[str] | None = None  # the adapters the decoder holds, in index order (None: to be read)
    selected: str | None = ACTIVE  # the adapter `adapter_context` chose (None: the bare base)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def adapter_base(workspace: Workspace, entry: AdapterEntry) -> ResolvedModel:
    """The base model an adapter was trained on: its reference if it still resolves, else its recorded path."""
    recorded = entry.manifest["base_model"]
    catalogue = ModelCatalogue(workspace)
    try:
        resolved = catalogue.resolve(recorded["reference"])
        if resolved.available or resolved.kind == "hub":
            return resolved
    except InputError:
        pass
    if recorded.get("path"):
        return catalogue.resolve(recorded["path"])
    raise RuntimeFailure(f"the base model of adapter '{entry.name}' ({recorded['reference']}) is not available")


def labels_of(entry: AdapterEntry) -> list[str]:
    id2label = entry.manifest.get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))]


def load_for_inference(workspace: Workspace, adapter: str | None = None, *, base: str | ResolvedModel | None = None,
                       task: str | None = None, device: str = "auto", quantize_4bit: bool | None = None,
                       labels: list[str] | None = None) -> InferenceModel:
    """Load an adapter on its base, or a bare base model (adapter=None, base=MODEL).

    quantize_4bit=None loads the base the way the adapter was trained (4-bit if it was).
    base may be a ResolvedModel (e.g. adapter_base(...)) to load exactly the model an adapter uses.
    An adapter comes from KEPT's model when a long-lived process keeps one that matches.
    """
    KEPT.last_reused = False
    quiet_libraries()
    entry = Registry(workspace).get_intact(adapter) if adapter else None
    if entry is not None:
        resolved = adapter_base(workspace, entry)
        task = entry.manifest["task"]
        labels = labels_of(entry)
        if quantize_4bit is None:
            quantize_4bit = bool(entry.manifest.get("runtime", {}).get("quantized_4bit"))
        key = (resolved.load_id, task, device, bool(quantize_4bit), tuple(labels))
        kept = KEPT.lookup(key, entry, attach_adapter)
        if kept is not None:
            return kept
    else:
        if base is None:
            raise InputError("give an adapter name or a base model")
        resolved = base if isinstance(base, ResolvedModel) else ModelCatalogue(workspace).resolve(base)
        task = task or "chat"
    loaded = load_model(resolved, task=task, device_preference=device, quantize_4bit=bool(quantize_4bit),
                        labels=labels or None)
    if task != "classification":
        data_mod.ensure_chat_template(loaded.tokenizer)
    model = InferenceModel(loaded, task, resolved, labels or [])
    if entry is not None:
        attach_adapter(model, entry.path, entry.name)
        KEPT.store(key, entry, model)
    else:
        phase("importing peft")
        import peft  # noqa: F401  (1-3 s: paid here, not by the first adapter a server loads)
    return model


def attach_adapter(model: InferenceModel, path: Path, slot: str) -> None:
    """Load the adapter folder at path beside the base under the PEFT adapter name slot.

    The first adapter wraps the base in a PeftModel; later ones are added beside it, so several
    stay resident and `adapter_context` picks one per call.
    """
    from peft import PeftModel

    phase(f"loading adapter {slot}")
    if isinstance(model.model, PeftModel):  # on modules the first adapter targets: its layers, of its class
        model.model.load_adapter(str(path), adapter_name=slot, low_cpu_mem_usage=True)
    else:
        model.loaded.model = PeftModel.from_pretrained(model.model, str(path), adapter_name=slot,
                                                       low_cpu_mem_usage=True)
    model.model.eval()
    model.adapters.append(slot)
    model.adapter_paths[slot] = path
    model.stacked = None  # the decoder reads its adapters again before its next request


def detach_adapter(model: InferenceModel, slot: str) -> None:
    """Free an adapter's weights. The last one stays: PEFT needs one adapter to run the bare base."""
    if len(model.adapters) < 2:
        raise InputError("the last resident adapter cannot be deleted; replace it in place instead")
    model.model.delete_adapter(slot)
    model.adapters.remove(slot)
    model.adapter_paths.pop(slot, None)
    model.stacked = None


def replace_adapter(model: InferenceModel, path: Path, slot: str) -> bool:
    """Copy the adapter at path into slot's existing weights (hot-swap); False when they do not fit.

    Hot-swapping needs adapters of one kind on the same modules; it avoids creating modules, which
    makes it the fastest way to change an adapter, and keeps every weight's address, so captured
    CUDA graphs stay valid. Same rank: one batched copy from the file (`_copy_into_slot`); a
    different rank: PEFT's hotswap_adapter. Incompatibility is found before any weight changes.
    """
    from peft import LoraConfig, PeftType

    from lqmf.engine.compat import hotswap_lora_adapter

    old = model.model.peft_config[slot]
    try:
        new = LoraConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        return False
    for config in (old, new):
        if (config.peft_type != PeftType.LORA or config.modules_to_save or config.use_dora
                or getattr(config, "trainable_token_indices", None)):
            return False
    if set(_as_list(old.target_modules)) != set(_as_list(new.target_modules)):
        return False
    model.model.set_adapter(slot, inference_mode=True)
    if not _copy_into_slot(model, path, slot, new):
        try:
            hotswap_lora_adapter(model.model, str(path), slot, model.loaded.device)
        except (RuntimeError, ValueError):
            return False
    model.model.peft_config[slot] = new
    model.adapter_paths[slot] = path
    model.stacked = None  # the decoder reads the new weights before its next request
    return True


def _copy_into_slot(model: InferenceModel, path: Path, slot: str, config) -> bool:
    """Copy a same-shaped plain LoRA adapter's weights into slot's tensors and set its scaling."""
    import math

    import torch
    from safetensors.torch import load_file

    from lqmf.engine.compat import foreach_copy, live_lora_key, set_lora_scaling
    from lqmf.engine.lora.lean import lora_layers

    if config.rank_pattern or config.alpha_pattern or config.lora_bias:
        return False
    live = {name: p for name, p in model.model.named_parameters() if "lora_" in name and f".{slot}." in name}
    try:
        state = load_file(str(path / "adapter_model.safetensors"), device=str(model.loaded.device))
    except (OSError, RuntimeError, ValueError):
        return False
    state = {live_lora_key(key, slot): value for key, value in state.items()}
    if set(state) != set(live) or any(state[name].shape != p.shape for name, p in live.items()):
        return False
    # One batched copy for plain tensors; any strided view one by one, as a strided tensor would send
    # the whole batch down the slow path.
    dense = sorted(name for name, p in live.items() if p.is_contiguous())
    with torch.no_grad():
        foreach_copy([live[name] for name in dense], [state[name] for name in dense])
        for name in set(live) - set(dense):
            live[name].copy_(state[name])
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    for layer in lora_layers(model.model):
        if slot in layer.scaling:
            set_lora_scaling(layer, slot, scaling)
    return True


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


@contextmanager
def adapter_context(model: InferenceModel, slot: str | None) -> Iterator[None]:
    """Run the block with one resident adapter active, or with none (slot=None: the bare base)."""
    peft_model = model.model
    previous, model.selected = model.selected, slot
    try:
        if slot is None:
            with peft_model.disable_adapter() if model.adapters else nullcontext():
                yield
            return
        if peft_model.active_adapter != slot:
            peft_model.set_adapter(slot, inference_mode=True)
        yield
    finally:
        model.selected = previous


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None
    finish_reason: str = "stop"  # stop (end of text or a stop string) | length | cancelled

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _CallbackStreamer:
    """Decodes tokens as generate() produces them, cuts the text at a stop string, feeds pieces to a callback.

    Text that might be the start of a stop string is held back until it is known not to be one. With
    neither a callback nor stop strings the tokens are decoded once, at the end (decoding the whole
    answer after every token held the GIL for milliseconds a step with many requests in flight).
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, started: float, stop: list[str],
                 skip_prompt: bool = True):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.started = started
        self.stop = [s for s in stop if s]
        self.first_token_at: float | None = None
        self.tokens: list[int] = []
        self.emitted = ""
        self.text = ""
        self.stopped = False
        self.skip_prompt = skip_prompt

    def put(self, value, at: float | None = None) -> None:
        """New tokens (a tensor from generate(), or a list of ids); at: when the first of them was picked
        (perf_counter(); default now)."""
        if self.skip_prompt:  # generate()'s first call carries the prompt
            self.skip_prompt = False
            return
        if self.stopped:
            return
        if self.first_token_at is None:
            self.first_token_at = (time.perf_counter() if at is None else at) - self.started
        self.tokens.extend(value if isinstance(value, list) else value.reshape(-1).tolist())
        if self.on_text is None and not self.stop:
            return  # nobody reads the text before the end: decode once, in end()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            self._emit(self.text)
            return
        self.text = text
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            self._emit(text[:len(text) - self._stop_prefix_length(text)])

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of text that begins a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted):
            if self.on_text is not None:
                self.on_text(text[len(self.emitted):])
            self.emitted = text

    def end(self) -> None:
        if not self.stopped:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self._emit(self.text)


def prompt_ids(model: InferenceModel, prompt: str | list[dict[str, str]], raw: bool = False) -> list[int]:
    """Token ids for a prompt formatted as the task trained it (raw=True: the text as it is)."""
    if raw:
        return model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = prompt_messages(model.task, prompt) if isinstance(prompt, str) else prompt
    return data_mod.encode_prompt(model.tokenizer, messages)


def context_length(model: InferenceModel) -> int | None:
    """The longest sequence (prompt + answer) the model's positions allow, when its config says."""
    config = model.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def generate(model: InferenceModel, ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
             min_new_tokens: int = 0, stop: list[str] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Generation:
    """Generate a continuation of ids; greedy when temperature is 0.

    Generation ends at the end-of-text token, at max_new_tokens, at the first of the stop strings
    (which the text leaves out), or as soon as cancelled() turns true. On CUDA (or with
    model.fast_decode) the batched decoder of decode/batched.py runs it, a batch of one; transformers'
    generate elsewhere, with LQMF_FAST=0, and for what that decoder cannot run (`_fast_decoder`).
    """
    if model.task == "classification":
        raise InputError("a classification adapter labels text; it does not generate")
    eos_ids = eos_ids_of(model)
    started = time.perf_counter()
    decoder, index = _fast_decoder(model, len(ids) + max_new_tokens)
    streamer = _CallbackStreamer(model.tokenizer, on_text, started, stop or [], skip_prompt=decoder is None)

    def done() -> bool:
        return streamer.stopped or (cancelled is not None and cancelled())

    new = None
    if decoder is not None:
        def on_token(token: int) -> bool:
            streamer.put([token])
            return done()

        new = decoder.generate(ids, max_new_tokens, adapter=index, eos_ids=eos_ids, temperature=temperature,
                               top_p=top_p, seed=seed, on_token=on_token, min_new_tokens=min_new_tokens).tokens
        streamer.end()
    if new is None:
        new = _hf_generate(model, ids, max_new_tokens, temperature, top_p, seed, min_new_tokens, streamer, done)
    return _generation(streamer, ids, new, eos_ids, max_new_tokens, started, cancelled)


def eos_ids_of(model: InferenceModel) -> set[int]:
    """The token ids that end a generation."""
    eos = model.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {model.tokenizer.eos_token_id}
    eos_ids.discard(None)
    return eos_ids


def _generation(streamer: _CallbackStreamer, ids: list[int], new: list[int], eos_ids: set[int], max_new_tokens: int,
                started: float, cancelled: Callable[[], bool] | None) -> Generation:
    if streamer.stopped or (new and new[-1] in eos_ids):
        reason = "stop"
    elif cancelled is not None and cancelled():
        reason = "cancelled"
    else:
        reason = "length" if len(new) >= max_new_tokens else "stop"
    return Generation(streamer.text, len(ids), len(new), time.perf_counter() - started, streamer.first_token_at,
                      reason)


def generate_batched(model: InferenceModel, scheduler, ids: list[int], *, entry=None, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     min_new_tokens: int = 0, stop: list[str] | None = None,
                     on_text: Callable[[str], None] | None = None,
                     cancelled: Callable[[], bool] | None = None, on_queued: Callable[[], None] | None = None,
                     poll_s: float = 0.05) -> Generation:
    """generate(), through the continuous-batching scheduler (engine/serve/scheduler.py) with adapter entry.

    Runs on the caller's thread: it queues the request (scheduler.Busy when the queue is full),
    calls on_queued(), then turns the tokens the scheduler sends into text, stop strings and
    on_text calls; once it has what it needs, or cancelled() turns true, it cancels the row.
    """
    from lqmf.engine.serve.scheduler import BatchRequest

    eos_ids = eos_ids_of(model)
    started = time.perf_counter()
    request = scheduler.submit(BatchRequest(ids, max_new_tokens, entry, temperature, top_p, seed, min_new_tokens,
                                            frozenset(eos_ids), each_token=on_text is not None or bool(stop)))
    if on_queued is not None:
        on_queued()
    streamer = _CallbackStreamer(model.tokenizer, on_text, started, stop or [], skip_prompt=False)
    new: list[int] = []
    try:
        while True:
            try:
                item = request.tokens.get(timeout=poll_s)
            except queue.Empty:
                if cancelled is not None and cancelled():
                    request.cancel()
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if streamer.stopped or request.cancelled.is_set():
                continue  # tokens already on their way when the row was cancelled
            tokens = item if isinstance(item, list) else [item]
            new.extend(tokens)
            streamer.put(tokens, at=request.first_token_at)
            if streamer.stopped or (cancelled is not None and cancelled()):
                request.cancel()
    finally:
        request.cancel()  # a caller that fails (or leaves) frees the row
    streamer.end()
    return _generation(streamer, ids, new, eos_ids, max_new_tokens, started, cancelled)


def _hf_generate(model: InferenceModel, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, min_new_tokens: int, streamer: _CallbackStreamer,
                 done: Callable[[], bool]) -> list[int]:
    """The new tokens from transformers' generate(), streamed through streamer, stopping once done()."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([ids], device=model.loaded.device)
    sampling = temperature > 0
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                               "pad_token_id": model.tokenizer.pad_token_id, "min_new_tokens": min_new_tokens}
    if sampling:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), done(), dtype=torch.bool, device=input_ids.device)

    with torch.inference_mode():
        output = model.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhen()]),
                                      **options)
    return output[0, len(ids):].tolist()


def fast_enabled() -> bool:
    """False when LQMF_FAST=0: stock PEFT layers and transformers' generate, one request at a time."""
    return os.environ.get("LQMF_FAST", "1") != "0"


def _fast_decoder(model: InferenceModel, tokens: int) -> tuple[Any, int]:
    """(the model's BatchedDecoder with room for tokens, the selected adapter's index in it), made or
    rebuilt larger when needed; (None, 0) where transformers' generate answers: off CUDA unless
    model.fast_decode, LQMF_FAST=0, a model not Llama-shaped, a sequence beyond the model's context,
    or an adapter the decoder cannot apply (DoRA, rank patterns...) or read from a folder (a PEFT
    combination)."""
    fast = model.fast_decode if model.fast_decode is not None else model.loaded.device == "cuda"
    if not fast or not fast_enabled():
        return None, 0
    from lqmf.engine.decode.batched import BatchedDecoder, cache_size_for, supports

    base = model.model.get_base_model() if model.adapters else model.model
    size = cache_size_for(tokens, context_length(model))
    if not supports(base) or size < tokens:
        return None, 0
    if model.decoder is None or model.decoder.max_len < tokens:
        model.decoder = None  # free the old cache and graphs first
        model.decoder, model.stacked = BatchedDecoder(base, 1, size), None
    slot = model.selected if model.selected != ACTIVE else (model.model.active_adapter if model.adapters else None)
    if slot is None:
        return model.decoder, 0
    if model.stacked is None:
        model.stacked = _stack_adapters(model, model.decoder)
    if slot not in model.stacked:
        return None, 0
    return model.decoder, model.stacked.index(slot) + 1


def _stack_adapters(model: InferenceModel, decoder) -> list[str]:
    """Read every resident adapter the decoder can apply from its folder into the decoder (adapter i of
    the list returned gets index i + 1)."""
    from lqmf.engine.lora.stacked import StackedAdapter, UnsupportedAdapter, read_adapter

    entries = []
    for slot in model.adapters:
        path = model.adapter_paths.get(slot)
        if path is None:
            continue
        try:
            weights = read_adapter(path, decoder.projections, decoder.device, decoder.dtype)
        except (UnsupportedAdapter, OSError, KeyError, ValueError):
            continue  # this adapter is answered by transformers' generate
        entries.append(StackedAdapter(len(entries) + 1, slot, path, weights))
    decoder.set_adapters(entries)
    return [entry.name for entry in entries]


def classify(model: InferenceModel, texts: list[str], max_length: int = 512,
             labels: list[str] | None = None) -> list[dict[str, float]]:
    """{label: probability} for each text, labels in id order (the model's own, or labels)."""
    import torch

    if model.task != "classification":
        raise InputError(f"a {model.task} adapter generates text; it does not classify")
    labels = labels or model.labels
    encoded = model.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    encoded = {k: v.to(model.loaded.device) for k, v in encoded.items()}
    with torch.inference_mode():
        probs = model.model(**encoded).logits.float().softmax(-1).cpu()
    return [{label: float(p) for label, p in zip(labels, row, strict=True)} for row in probs]


def next_token_logits(model: InferenceModel, ids: list[int]):
    """The model's logits over the sequence (for exact comparisons across loading paths)."""
    import torch

    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids], device=model.loaded.device)).logits.float().cpu()
