"""Writing a PEFT LoRA adapter as the adapter-only GGUF that llama.cpp loads with `--lora`.

llama.cpp finds each pair by the base tensor's GGUF name plus `.lora_a` / `.lora_b`, checks
`general.type = adapter`, `adapter.type = lora` and the architecture against the base model's,
and scales each pair by `adapter.lora.alpha` / rank. PEFT's own scaling (rsLoRA, alpha_pattern)
is folded into lora_B where it differs, so the product is what PEFT computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lqmf.core.export_formats import LoraPair
from lqmf.core.progress import phase


def _permuted_rows(b, n_head: int):
    """lora_B rows reordered as llama.cpp's converter reorders the q/k weight rows (per head, the two
    rotary halves interleaved)."""
    out, rank = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, rank).swapaxes(1, 2).reshape(out, rank)


def _typed(data, outtype: str):
    """(array, raw GGML type) for outtype; Q8_0 falls back to F16 where a row is no multiple of its block."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if outtype == "bf16" else GGMLQuantizationType.Q8_0
    try:
        return quants.quantize(data.astype(np.float32), qtype), qtype
    except quants.QuantError:
        return data.astype(np.float16), None


def write_gguf_adapter(weights: Path, pairs: list[LoraPair], out: Path, *, architecture: str, alpha: float,
                       outtype: str, name: str) -> dict[str, Any]:
    """Write the pairs of the safetensors file `weights` to the GGUF file `out`; returns what was written."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_file_type(file_types[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    folded = 0
    with safe_open(str(weights), framework="pt") as tensors:
        for index, pair in enumerate(pairs):
            phase(f"converting {pair.gguf_name} ({index + 1}/{len(pairs)})")
            a = tensors.get_tensor(pair.a_key).float().numpy()
            b = tensors.get_tensor(pair.b_key).float().numpy()
            llama_scale = alpha / pair.rank if alpha else 1.0
            if not np.isclose(pair.scale, llama_scale, rtol=1e-6, atol=0.0):
                b = b * np.float32(pair.scale / llama_scale)
                folded += 1
            if pair.permute_heads:
                b = _permuted_rows(b, pair.permute_heads)
            for suffix, data in (("lora_a", a), ("lora_b", b)):
                typed, raw = _typed(np.ascontiguousarray(data), outtype)
                writer.add_tensor(f"{pair.gguf_name}.{suffix}", typed, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": architecture, "lora_alpha": float(alpha), "outtype": outtype,
            "lora_pairs": len(pairs), "scale_folded_into_lora_b": folded}
