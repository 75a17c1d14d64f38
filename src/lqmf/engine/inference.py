"""Inference with a registered adapter (or its bare base): generation and classification.

`lqmf test`, `lqmf bench` and `lqmf serve` all load adapters through `load_for_inference`, so
an answer is produced the same way everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lqmf.core.datasets import prompt_messages
from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.registry import AdapterEntry, Registry
from lqmf.core.workspace import Workspace
from lqmf.engine import data as data_mod
from lqmf.engine.loading import LoadedModel, load_model, quiet_libraries


@dataclass
class InferenceModel:
    """A base model, optionally wrapped by PEFT with one or more adapters resident."""

    loaded: LoadedModel
    task: str
    base: ResolvedModel
    labels: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

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


def load_for_inference(workspace: Workspace, adapter: str | None = None, *,
                       base: str | ResolvedModel | None = None,
                       task: str | None = None, device: str = "auto", quantize_4bit: bool | None = None,
                       labels: list[str] | None = None) -> InferenceModel:
    """Load an adapter on its base, or a bare base model (adapter=None, base=MODEL).

    quantize_4bit=None loads the base the way the adapter was trained (4-bit if it was).
    base may be a ResolvedModel (e.g. adapter_base(...)) to load exactly the model an adapter uses.
    """
    quiet_libraries()
    from peft import PeftModel

    entry = Registry(workspace).get(adapter) if adapter else None
    if entry is not None:
        resolved = adapter_base(workspace, entry)
        task = entry.manifest["task"]
        labels = labels_of(entry)
        if quantize_4bit is None:
            quantize_4bit = bool(entry.manifest.get("runtime", {}).get("quantized_4bit"))
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
        loaded.model = PeftModel.from_pretrained(loaded.model, str(entry.path), adapter_name=entry.name)
        loaded.model.eval()
        model.adapters.append(entry.name)
    return model


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _CallbackStreamer:
    """Feeds decoded text pieces to a callback as generate() produces tokens."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, started: float):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.started = started
        self.first_token_at: float | None = None
        self.tokens: list[int] = []
        self.emitted = ""
        self.skip_prompt = True

    def put(self, value) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() - self.started
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.emitted) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.emitted):])
            self.emitted = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text


def prompt_ids(model: InferenceModel, prompt: str | list[dict[str, str]], raw: bool = False) -> list[int]:
    """Token ids for a prompt formatted as the task trained it (raw=True: the text as it is)."""
    if raw:
        return model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = prompt_messages(model.task, prompt) if isinstance(prompt, str) else prompt
    return data_mod.encode_prompt(model.tokenizer, messages)


def generate(model: InferenceModel, ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
             min_new_tokens: int = 0) -> Generation:
    """Generate a continuation of ids; greedy when temperature is 0."""
    import torch

    if model.task == "classification":
        raise InputError("a classification adapter labels text; it does not generate")
    if seed is not None:
        torch.manual_seed(seed)
    device = model.loaded.device
    input_ids = torch.tensor([ids], device=device)
    sampling = temperature > 0
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                               "pad_token_id": model.tokenizer.pad_token_id, "min_new_tokens": min_new_tokens}
    if sampling:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    started = time.perf_counter()
    streamer = _CallbackStreamer(model.tokenizer, on_text, started)
    with torch.inference_mode():
        output = model.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, **options)
    seconds = time.perf_counter() - started
    new = output[0, len(ids):].tolist()
    return Generation(model.tokenizer.decode(new, skip_special_tokens=True), len(ids), len(new), seconds,
                      streamer.first_token_at)


def classify(model: InferenceModel, texts: list[str], max_length: int = 512) -> list[dict[str, float]]:
    """{label: probability} for each text, labels in id order."""
    import torch

    if model.task != "classification":
        raise InputError(f"a {model.task} adapter generates text; it does not classify")
    encoded = model.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    encoded = {k: v.to(model.loaded.device) for k, v in encoded.items()}
    with torch.inference_mode():
        probs = model.model(**encoded).logits.float().softmax(-1).cpu()
    return [{label: float(p) for label, p in zip(model.labels, row, strict=True)} for row in probs]


def next_token_logits(model: InferenceModel, ids: list[int]):
    """The model's logits over the sequence (for exact comparisons across loading paths)."""
    import torch

    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids], device=model.loaded.device)).logits.float().cpu()
