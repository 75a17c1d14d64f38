"""Merging an adapter into its base model: the full model that `lqmf export --merge` writes.

setup (load the unquantized base in its stored dtype) -> run (apply the adapter, merge the LoRA
deltas into the weights) -> save (model, tokenizer). An adapter trained on a 4-bit base is merged
into the unquantized weights: merging into NF4 weights would round the deltas away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.models import ResolvedModel
from lqmf.core.progress import phase
from lqmf.core.registry import MANIFEST, AdapterEntry
from lqmf.engine.data import ensure_chat_template
from lqmf.engine.loading import checkpoint_dtype, load_model


def labels_of(entry: AdapterEntry) -> list[str] | None:
    """The label names of a classification adapter, in class-id order (from the manifest's id2label)."""
    manifest = entry.manifest or {}
    if manifest.get("task") != "classification":
        return None
    id2label = manifest.get("id2label") or {}
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))] or None
    except KeyError:
        raise InputError(f"{entry.path / MANIFEST}: id2label must map 0..N-1 to label names") from None


def merge_adapter(entry: AdapterEntry, base: ResolvedModel, folder: Path, device: str = "cpu") -> dict[str, Any]:
    """Save base + adapter, merged, with its tokenizer into folder; returns what was done."""
    from peft import PeftModel

    manifest = entry.manifest or {}
    task = manifest.get("task") or "chat"
    labels = labels_of(entry)
    if task == "classification" and not labels:
        raise InputError(f"{entry.path / MANIFEST} has no id2label; the classification head cannot be rebuilt")
    dtype = checkpoint_dtype(base)
    loaded = load_model(base, task=task, device_preference=device, quantize_4bit=False, labels=labels,
                        dtype_name=dtype)
    phase(f"loading adapter {entry.name}")
    try:
        model = PeftModel.from_pretrained(loaded.model, str(entry.path))
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeFailure(f"cannot apply adapter '{entry.name}' to '{base.reference}': {first}") from None
    phase("merging and saving")
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    if task != "classification":
        ensure_chat_template(loaded.tokenizer)  # the template training used when the model has none
    loaded.tokenizer.save_pretrained(folder)
    trained_4bit = bool((manifest.get("runtime") or {}).get("quantized_4bit"))
    details: dict[str, Any] = {"base_model": base.reference, "merged_dtype": dtype,
                               "trained_quantized_4bit": trained_4bit}
    if trained_4bit:
        details["note"] = (f"'{entry.name}' was trained on the 4-bit (NF4) quantized base; it was merged into "
                           f"the unquantized {dtype} base weights, so outputs can differ slightly from the "
                           "4-bit model it was trained with.")
    return details
