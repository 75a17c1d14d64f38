"""Merging an adapter into its base model: the full model that `lqmf export --merge` writes; and the
runtime exports (`--format gguf | ollama | vllm`) with the command that uses each.

setup (load the unquantized base in its stored dtype) -> run (apply the adapter, merge the LoRA
deltas into the weights) -> save (model, tokenizer). An adapter trained on a 4-bit base is merged
into the unquantized weights: merging into NF4 weights would round the deltas away.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.export_formats import (
    RUNTIME_NAMES,
    PromptFormat,
    RuntimeSpec,
    modelfile_text,
    ollama_create_command,
    vllm_serve_command,
)
from lqmf.core.exporting import ExportPlan, copy_adapter_files
from lqmf.core.models import ResolvedModel
from lqmf.core.progress import phase
from lqmf.core.registry import ADAPTER_WEIGHTS, MANIFEST, AdapterEntry
from lqmf.engine.data import ensure_chat_template, render
from lqmf.engine.loading import checkpoint_dtype, load_model, load_tokenizer

# Stand-ins rendered through the chat template, then replaced by Ollama's template variables.
SYSTEM_MARK, PROMPT_MARK = "\x00LQMF-SYSTEM\x00", "\x00LQMF-PROMPT\x00"


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


def _go_template(tokenizer, messages: list[dict[str, str]]) -> str:
    text = render(tokenizer, messages, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if bos and text.startswith(bos):  # llama.cpp adds BOS itself where the model wants one
        text = text[len(bos):]
    if PROMPT_MARK not in text:
        raise InputError("the chat template does not show the user's message; cannot write an Ollama TEMPLATE")
    text = text.replace("{{", '{{ "{{" }}')
    return text.replace(SYSTEM_MARK, "{{ .System }}").replace(PROMPT_MARK, "{{ .Prompt }}")


def ollama_prompt_format(base: ResolvedModel) -> PromptFormat:
    """The chat template training used (the model's, or LQMF's default) as an Ollama TEMPLATE, with stops."""
    from jinja2 import TemplateError

    tokenizer = load_tokenizer(base)
    source = ensure_chat_template(tokenizer)
    user_only = _go_template(tokenizer, [{"role": "user", "content": PROMPT_MARK}])
    try:
        with_system = _go_template(tokenizer, [{"role": "system", "content": SYSTEM_MARK},
                                               {"role": "user", "content": PROMPT_MARK}])
    except TemplateError:  # templates that refuse a system turn
        with_system = user_only
    if "{{ .System }}" in with_system and with_system != user_only:
        template = "{{ if .System }}" + with_system + "{{ else }}" + user_only + "{{ end }}"
    else:
        template = user_only
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if source == "lqmf-default":
        stops.append("### User:")
    return PromptFormat(template + "{{ .Response }}", tuple(stops))


def build_runtime_export(plan: ExportPlan, spec: RuntimeSpec, base: ResolvedModel | None, folder: Path,
                         device: str = "cpu") -> dict[str, Any]:
    """Write a gguf / ollama / vllm export (merged where plan.merge) into folder; returns its details,
    with the command that uses it at plan.target."""
    name, target = plan.entry.name, str(plan.target)
    details: dict[str, Any] = {"runtime": RUNTIME_NAMES[plan.runtime], "notes": []}
    if plan.merge:
        if base is None:
            raise ValueError("a merged export needs the base model")
        details.update(merge_adapter(plan.entry, base, folder, device))
    elif plan.runtime == "vllm":
        copy_adapter_files(plan.entry, folder)
    else:
        from lqmf.engine.gguf_adapter import write_gguf_adapter

        details["gguf_file"] = f"{name}.gguf"
        details.update(write_gguf_adapter(plan.entry.path / ADAPTER_WEIGHTS, spec.pairs or [],
                                          folder / details["gguf_file"], architecture=spec.architecture or "",
                                          alpha=spec.alpha, outtype=plan.outtype, name=name))
    if plan.runtime == "vllm":
        details["command"] = vllm_serve_command(spec.base, name, target, None if plan.merge else spec.max_lora_rank)
        if not plan.merge:
            details["max_lora_rank"] = spec.max_lora_rank
    elif plan.runtime == "ollama":
        if base is None:
            raise ValueError("an Ollama export needs the base model's tokenizer")
        prompt = ollama_prompt_format(base)
        adapter = None if plan.merge else f"./{details['gguf_file']}"
        (folder / "Modelfile").write_text(modelfile_text("." if plan.merge else spec.base, adapter, prompt),
                                          encoding="utf-8")
        details["command"] = ollama_create_command(name, str(Path(target) / "Modelfile"))
        details["stop"] = list(prompt.stops)
        if not plan.merge:
            details["notes"].append(f"FROM names the base model's folder ({spec.base}); Ollama converts it. To "
                                    "use a base you already pulled, put its Ollama name there instead.")
    else:
        details["command"] = f"llama-cli -m BASE.gguf --lora {shlex.quote(str(Path(target) / details['gguf_file']))}"
        details["notes"].append(f"BASE.gguf is the base model ({spec.base}) converted to GGUF, e.g. with "
                                "llama.cpp's convert_hf_to_gguf.py.")
    return details
