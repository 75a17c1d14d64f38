"""What llama.cpp (GGUF), Ollama and vLLM accept from a PEFT LoRA adapter, decided from its config and
the names and shapes in its safetensors header (no tensor is loaded here).

llama.cpp applies a LoRA pair to a base tensor named as its converter names it (`blk.N.attn_q.weight`
...), scaled by alpha / rank (rank read from the tensors); vLLM loads the PEFT folder as it is, up to
`--max-lora-rank`. Neither takes DoRA, trained biases or full saved weights (modules_to_save), and
each refusal here is one line saying why.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

from lqmf.core.errors import InputError
from lqmf.core.registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterEntry
from lqmf.core.weights import TensorInfo, read_safetensors_header

FORMATS = ("peft", "gguf", "ollama", "vllm")
GGUF_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
# vLLM's accepted --max-lora-rank values (vllm/config/lora.py)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class GgufArchitecture:
    name: str  # general.architecture, as llama.cpp's converter writes it for the base model
    permute_qk: bool  # the converter reorders q/k rows (HF rotary halves -> GGML pairs): so must the lora_B rows


GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": GgufArchitecture("llama", True),
    "MistralForCausalLM": GgufArchitecture("llama", True),
    "Qwen2ForCausalLM": GgufArchitecture("qwen2", False),
    "Qwen3ForCausalLM": GgufArchitecture("qwen3", False),
    "GemmaForCausalLM": GgufArchitecture("gemma", False),
    "Gemma2ForCausalLM": GgufArchitecture("gemma2", False),
    "Gemma3ForCausalLM": GgufArchitecture("gemma3", False),
}
# PEFT module name -> llama.cpp tensor name inside block N (gguf-py's tensor mapping for these families)
GGUF_BLOCK_TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                      "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
RUNTIME_TARGETS = (*GGUF_BLOCK_TENSORS, "lm_head")
LORA_KEY = re.compile(r"^base_model\.model\.(?:model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)"
                      r"|(?P<head>lm_head))\.lora_(?P<part>[AB])\.weight$")
RUNTIME_NAMES = {"gguf": "llama.cpp", "ollama": "Ollama", "vllm": "vLLM"}


@dataclass(frozen=True)
class LoraPair:
    """One LoRA pair as llama.cpp takes it."""

    gguf_name: str  # the base tensor it adapts, e.g. blk.0.attn_q.weight
    a_key: str
    b_key: str
    rank: int
    scale: float  # PEFT's scaling of this pair (alpha/r, alpha/sqrt(r) with rsLoRA, per-module patterns)
    permute_heads: int | None  # reorder lora_B rows as the converter reorders this base tensor (heads), or None


def _suffix_value(pattern: Any, module_path: str, default: float) -> float:
    """A rank_pattern/alpha_pattern value for module_path (keys are module-path suffixes), else default."""
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            if module_path == key or module_path.endswith("." + str(key)):
                return float(value)
    return default


def pair_scale(config: dict[str, Any], module_path: str, rank: int) -> float:
    alpha = _suffix_value(config.get("alpha_pattern"), module_path, float(config.get("lora_alpha") or 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_runtime_config(fmt: str, name: str, config: dict[str, Any], task: str | None) -> None:
    """Refuse, in one line, an adapter whose config the runtime cannot take."""
    runtime = RUNTIME_NAMES[fmt]
    where = f"adapter '{name}' (adapter_config.json)"
    if task == "classification":
        raise InputError(f"adapter '{name}' is a classification adapter (a saved classifier head); "
                         f"{runtime} serves text generation only: export it as PEFT or --merge")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InputError(f"{where} is a {config.get('peft_type')} adapter; {runtime} takes LoRA adapters only")
    if config.get("use_dora"):
        raise InputError(f"{where} is a DoRA adapter (use_dora): {runtime} cannot apply its magnitude vectors; "
                         "export --merge for a merged model instead")
    if str(config.get("bias", "none")) != "none":
        raise InputError(f"{where} trains biases (bias={config.get('bias')}); {runtime} applies LoRA pairs only")
    saved = config.get("modules_to_save") or []
    if saved:
        what = "full embedding or head weights" if any(m in ("embed_tokens", "lm_head") for m in saved) \
            else "full weights"
        raise InputError(f"{where} saves {what} of {', '.join(map(str, saved))} (modules_to_save); "
                         f"{runtime} loads LoRA pairs only")
    if config.get("trainable_token_indices"):
        raise InputError(f"{where} trains token embeddings (trainable_token_indices); {runtime} cannot load them")


def runtime_pairs(fmt: str, name: str, config: dict[str, Any],
                  tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, str]]:
    """{module path: (lora_A key, lora_B key)} of an adapter whose every tensor the runtime can take."""
    runtime = RUNTIME_NAMES[fmt]
    halves: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = LORA_KEY.match(key)
        if match is None:
            what = "a full embedding or head weight" if ("embed_tokens" in key or "lm_head" in key) else \
                "not a LoRA pair on a projection"
            raise InputError(f"adapter '{name}' (adapter_model.safetensors) holds '{key}', {what}; "
                             f"{runtime} cannot load it")
        module = match["head"] or match["module"]
        if module not in RUNTIME_TARGETS:
            raise InputError(f"adapter '{name}' targets '{module}', which {runtime} cannot apply LoRA to "
                             f"(it takes {', '.join(RUNTIME_TARGETS)})")
        path = key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
        halves.setdefault(path, {})[match["part"]] = key
    if not halves:
        raise InputError(f"adapter '{name}' (adapter_model.safetensors) holds no LoRA pair")
    for path, parts in halves.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise InputError(f"adapter '{name}' (adapter_model.safetensors) has no {missing} for {path}")
    return {path: (parts["A"], parts["B"]) for path, parts in sorted(halves.items())}


def gguf_architecture(base_config: dict[str, Any], base: str) -> GgufArchitecture:
    architectures = base_config.get("architectures") or []
    for arch in architectures:
        if arch in GGUF_ARCHITECTURES:
            return GGUF_ARCHITECTURES[arch]
    found = ", ".join(map(str, architectures)) or "none"
    raise InputError(f"base model '{base}' (config.json architectures: {found}) is not an architecture lqmf "
                     f"exports to GGUF (it takes {', '.join(GGUF_ARCHITECTURES)})")


def gguf_pairs(name: str, config: dict[str, Any], tensors: dict[str, TensorInfo], base_config: dict[str, Any],
               base: str, fmt: str = "gguf") -> list[LoraPair]:
    """The adapter's LoRA pairs named and arranged as llama.cpp loads them on the base model's GGUF."""
    arch = gguf_architecture(base_config, base)
    heads = {"q_proj": base_config.get("num_attention_heads"),
             "k_proj": base_config.get("num_key_value_heads") or base_config.get("num_attention_heads")}
    pairs = []
    for path, (a_key, b_key) in runtime_pairs(fmt, name, config, tensors).items():
        rank = tensors[a_key][1][0]
        if path == "lm_head":
            if base_config.get("tie_word_embeddings"):
                raise InputError(f"adapter '{name}' adapts lm_head, which base model '{base}' ties to its "
                                 "embeddings: llama.cpp has no separate output tensor to apply it to")
            gguf_name = "output.weight"
            module = "lm_head"
        else:
            layer, module = path.split(".")[2], path.split(".")[-1]
            gguf_name = f"blk.{layer}.{GGUF_BLOCK_TENSORS[module]}.weight"
        permute = heads.get(module) if arch.permute_qk else None
        pairs.append(LoraPair(gguf_name, a_key, b_key, rank, pair_scale(config, path, rank),
                              int(permute) if permute else None))
    return pairs


@dataclass(frozen=True)
class RuntimeSpec:
    """What a gguf / ollama / vllm export of one adapter needs, checked before anything is written."""

    base: str  # the base model as the runtime's command names it (hub id or folder)
    pairs: list[LoraPair] | None = None  # GGUF
    architecture: str | None = None  # GGUF
    alpha: float = 0.0
    max_lora_rank: int | None = None  # vLLM


def merged_spec(fmt: str, entry: AdapterEntry, base: str) -> RuntimeSpec:
    """A merged export for the runtime: any adapter merges, but Ollama serves text generation only."""
    if fmt == "ollama" and (entry.manifest or {}).get("task") == "classification":
        raise InputError(f"adapter '{entry.name}' is a classification adapter; Ollama serves text generation only")
    return RuntimeSpec(base)


def runtime_spec(fmt: str, entry: AdapterEntry, base_config: dict[str, Any] | None, base: str) -> RuntimeSpec:
    """Check the adapter (and for GGUF its base model's config.json) against the runtime; refusals in one line."""
    try:
        config = json.loads((entry.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{entry.path / ADAPTER_CONFIG}: cannot read it ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise InputError(f"{entry.path / ADAPTER_CONFIG}: not a JSON object")
    check_runtime_config(fmt, entry.name, config, (entry.manifest or {}).get("task"))
    tensors = read_safetensors_header(entry.path / ADAPTER_WEIGHTS)
    if fmt == "vllm":
        vllm_pairs = runtime_pairs(fmt, entry.name, config, tensors)
        return RuntimeSpec(base, max_lora_rank=vllm_max_lora_rank(entry.name, tensors, vllm_pairs))
    if not base_config:
        raise InputError(f"the config.json of base model '{base}' is not on this machine; a GGUF adapter "
                         "needs its architecture and head counts")
    pairs = gguf_pairs(entry.name, config, tensors, base_config, base, fmt)
    return RuntimeSpec(base, pairs, gguf_architecture(base_config, base).name, float(config.get("lora_alpha") or 0.0))


def vllm_max_lora_rank(name: str, tensors: dict[str, TensorInfo], pairs: dict[str, tuple[str, str]]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds the adapter's largest rank."""
    rank = max(tensors[a_key][1][0] for a_key, _ in pairs.values())
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise InputError(f"adapter '{name}' has rank {rank}, above vLLM's largest --max-lora-rank "
                     f"{VLLM_MAX_LORA_RANKS[-1]}; export --merge for a merged model instead")


def vllm_serve_command(base: str, name: str, folder: str, max_rank: int | None) -> str:
    if max_rank is None:  # a merged model
        return f"vllm serve {shlex.quote(folder)}"
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(f'{name}={folder}')} "
            f"--max-lora-rank {max_rank}")


# ----------------------------------------------------------------------------- Ollama


@dataclass(frozen=True)
class PromptFormat:
    """A chat template as Ollama writes one: Go template text and the stop strings."""

    template: str
    stops: tuple[str, ...]


def _go_quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def modelfile_text(base_from: str, adapter_file: str | None, prompt: PromptFormat | None) -> str:
    """An Ollama Modelfile: FROM the base (or the merged model), ADAPTER, TEMPLATE and stop words."""
    lines = [f"FROM {base_from}"]
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    if prompt is not None:
        if '"""' in prompt.template:
            raise InputError('the chat template contains """, which an Ollama Modelfile TEMPLATE cannot hold')
        lines.append(f'TEMPLATE """{prompt.template}"""')
        lines += [f"PARAMETER stop {_go_quoted(stop)}" for stop in prompt.stops]
    return "\n".join(lines) + "\n"


def ollama_create_command(model_name: str, modelfile: str) -> str:
    return f"ollama create {shlex.quote(model_name)} -f {shlex.quote(modelfile)}"
