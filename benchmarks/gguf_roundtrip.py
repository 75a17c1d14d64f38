"""Does llama.cpp compute what PEFT computes with an adapter that `lqmf export --format gguf` wrote?

Builds the tiny random Llama (engine/tiny.py; --family qwen2 or gemma: one of the same shape), trains a
LoRA adapter on it with `lqmf train` (all seven projections), exports it with `lqmf export --format
gguf`, writes the base model as an f32 GGUF with the gguf package (names from gguf-py's tensor map,
converted as llama.cpp's convert_hf_to_gguf.py converts the family), loads both with llama.cpp through
llama-cpp-python, and compares the next-token logits of each prompt with PEFT's (transformers + peft
on the same weights). Also compares the base alone; reports how far the adapter moves the logits (so a
match is not a match of two no-ops); and, column "file in PEFT", PEFT's logits with the pairs read back
from the GGUF (what the file holds, apart from llama.cpp's arithmetic).

    PYTHONPATH=src:SITE .venv/bin/python benchmarks/gguf_roundtrip.py          # f32 + f16 adapters, f32 KV cache
    PYTHONPATH=src:SITE .venv/bin/python benchmarks/gguf_roundtrip.py --family qwen2 --outtype q8_0 bf16 \
        --kv-cache f16 --steps 10

SITE: where llama-cpp-python is installed, if not in the virtualenv. The tolerance is a fraction of how
far the adapter moves the logits (TOLERANCE below); results and what they mean: docs/export.md. Needs
llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp; not a dependency of LQMF). Nothing
is downloaded. Exit status 1 when a difference is over the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is AI?", "How do I return an item?", "Translate to French: hello",
           "Summarize the following text. The quick brown fox jumps over the lazy dog."]
# Largest |llama.cpp - PEFT| on a next-token logit, as a fraction of how far the adapter moves the logits
# (the largest |PEFT with adapter - PEFT base|). f32: the pair as PEFT holds it; only summation order
# and llama.cpp's approximations (Gemma's GELU) differ. f16/bf16/q8_0: the pair is rounded, and llama.cpp
# also rounds the activations to the pair's type in its matrix products (bf16, q8_0: coarsely). An f16 KV
# cache (llama.cpp's default) rounds keys and values as well.
TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "bf16": 0.15, "q8_0": 0.3}
KV_TOLERANCE = {"f32": 0.0, "f16": 1e-2}
ALL_PROJECTIONS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def lqmf(*args: str, workspace: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lqmf", "--workspace", str(workspace), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lqmf {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


FAMILIES = ("llama", "qwen2", "gemma")


def build_base(family: str, path: Path, corpus: list[str]) -> Path:
    """A tiny random model of the family (2 layers, hidden 64, 4 heads, 2 KV heads) with the tiny tokenizer."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lqmf.engine.tiny import build_tiny_causal_lm, build_tokenizer

    if family == "llama":
        return build_tiny_causal_lm(path, corpus=corpus)
    tokenizer = build_tokenizer(corpus)
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    else:
        model = GemmaForCausalLM(GemmaConfig(**shape, head_dim=16))
        with torch.no_grad():  # Gemma's norms start at 0 (scale 1 + w): give them weights to carry over
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_base_gguf(model_dir: Path, out: Path, family: str = "llama") -> None:
    """The HF model in model_dir as an f32 GGUF llama.cpp loads (byte-level BPE vocabulary, 'default'
    pre-tokenizer), converted as llama.cpp's convert_hf_to_gguf.py converts the family."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma": gguf.MODEL_ARCH.GEMMA}[family]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("lqmf-tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_rope_dimension_count(head_dim)
    if family == "gemma":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or
                                    (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    special = {t["id"] for t in tokenizer["added_tokens"] if t.get("special")}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if vocab[t] in special else gguf.TokenType.NORMAL
                            for t in tokens])
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, data in load_file(str(model_dir / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if family == "gemma" and name.endswith("norm.weight"):  # GemmaRMSNorm scales by 1 + w
            data = data + 1
        if family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # rotary halves -> pairs
            heads = n_head if "q_proj" in name else n_kv
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2) \
                .reshape(data.shape)
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SystemExit(f"no GGUF name for {name}")
        writer.add_tensor(mapped, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def peft_logits(model_dir: Path, adapter_dir: Path, token_ids: list[list[int]]):
    """(with adapter, base alone) next-token logits per prompt, from transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.no_grad():
        adapted = [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in token_ids]
        with model.disable_adapter():
            base = [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in token_ids]
    return adapted, base


KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16 (llama.cpp's default KV cache)


def peft_with_file_pairs(model_dir: Path, adapter_dir: Path, adapter_gguf: Path, family: str,
                         token_ids: list[list[int]]):
    """PEFT's next-token logits with each LoRA pair replaced by the one the GGUF holds (dequantized, q/k rows
    put back in Hugging Face's order, llama.cpp's alpha/rank scaling): what the file says, without llama.cpp."""
    import gguf
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    reader = gguf.GGUFReader(adapter_gguf)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    pairs = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
             for t in reader.tensors}
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma": gguf.MODEL_ARCH.GEMMA}[family]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            hf_name = name.removeprefix("base_model.model.") + ".weight"
            target = names.get_name(hf_name, try_suffixes=(".weight",))
            a, b = pairs[f"{target}.lora_a"], pairs[f"{target}.lora_b"]
            heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
            module_name = hf_name.split(".")[-2]
            if family == "llama" and module_name in heads:  # GGML's pairs -> Hugging Face's rotary halves
                n = heads[module_name]
                b = b.reshape(n, b.shape[0] // n // 2, 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
            factor = (alpha / a.shape[0]) / module.scaling["default"]
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b * factor, dtype=np.float32)))
        return [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in token_ids]


def llama_cpp_logits(base_gguf: Path, adapter_gguf: Path | None, token_ids: list[list[int]], kv: str = "f32"):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None, n_ctx=256,
                n_threads=1, n_batch=256, logits_all=True, type_k=KV_TYPES[kv], type_v=KV_TYPES[kv], verbose=False)
    out = []
    for ids in token_ids:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[len(ids) - 1], dtype=np.float32))
    llm.close()
    return out


def roundtrip(work: Path, outtypes: list[str], steps: int = 30, kv: str = "f32", family: str = "llama") -> list[dict]:
    """Build, train, export and compare; one result row per outtype (plus the base alone)."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "src"))
    corpus = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples" / "datasets").iterdir())]
    model_dir = build_base(family, work / f"tiny-{family}", corpus)
    workspace = work / "ws"
    print(f"training an adapter on {model_dir} ({steps} steps) ...", file=sys.stderr)
    lqmf("train", str(model_dir), str(REPO / "examples" / "datasets" / "chat_training.csv"), "chat", "--name",
         "rt", "--no-4bit", "--max-steps", str(steps), "--lr", "2e-2", "--batch-size", "4", "--grad-accum", "1",
         "--max-seq-length", "128", "--set", f"target_modules={ALL_PROJECTIONS}", "-q", workspace=workspace)
    write_base_gguf(model_dir, work / "base-f32.gguf", family)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_ids = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]
    adapted, base = peft_logits(model_dir, workspace / "adapters" / "rt", token_ids)
    effect = max(float(np.abs(a - b).max()) for a, b in zip(adapted, base, strict=True))
    rows = []
    cpp_base = llama_cpp_logits(work / "base-f32.gguf", None, token_ids, kv)
    rows.append(_row("base alone", cpp_base, base, (TOLERANCE["f32"] + KV_TOLERANCE[kv]) * effect, effect))
    for outtype in outtypes:
        out = json.loads(lqmf("export", "rt", f"{work}/exports/{outtype}/", "--format", "gguf", "--outtype",
                              outtype, "--json", workspace=workspace))
        adapter = Path(out["path"]) / out["gguf_file"]
        row = _row(f"adapter {outtype}", llama_cpp_logits(work / "base-f32.gguf", adapter, token_ids, kv),
                   adapted, (TOLERANCE[outtype] + KV_TOLERANCE[kv]) * effect, effect)
        from_file = peft_with_file_pairs(model_dir, workspace / "adapters" / "rt", adapter, family, token_ids)
        row["file_vs_peft"] = max(float(np.abs(f - e).max()) for f, e in zip(from_file, adapted, strict=True))
        rows.append(row)
    return rows


def _row(what: str, got, expected, tolerance: float, effect: float) -> dict:
    import numpy as np

    diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    same_top = sum(int(np.argmax(g) == np.argmax(e)) for g, e in zip(got, expected, strict=True))
    return {"what": what, "max_abs_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance,
            "same_argmax": f"{same_top}/{len(got)}", "adapter_effect": effect}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outtype", nargs="+", default=["f32", "f16"], choices=sorted(TOLERANCE))
    parser.add_argument("--steps", type=int, default=30, help="training steps of the adapter")
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="the tiny base model's family")
    parser.add_argument("--kv-cache", choices=sorted(KV_TYPES), default="f32",
                        help="llama.cpp's KV cache type (its default is f16, which rounds keys and values)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lqmf-gguf-rt-") as tmp:
        rows = roundtrip(Path(tmp), args.outtype, args.steps, args.kv_cache, args.family)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'compared with PEFT':<18} {'llama.cpp':>10} {'tolerance':>10} {'argmax':>7} {'adapter moves':>14}"
              f" {'file in PEFT':>13}")
        for row in rows:
            from_file = f"{row['file_vs_peft']:>13.2e}" if "file_vs_peft" in row else f"{'-':>13}"
            print(f"{row['what']:<18} {row['max_abs_diff']:>10.2e} {row['tolerance']:>10.1e} "
                  f"{row['same_argmax']:>7} {row['adapter_effect']:>14.4f} {from_file}  "
                  f"{'ok' if row['ok'] else 'OVER'}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
