"""Adapter switching and batch-1 generation speed on a GPU, LQMF's serving path vs plain PEFT.

On the randomly initialised Mistral-7B-shaped model of benchmarks/gpu_train_bench.py (4-bit
NF4, as trained), with two r=16 q/k/v/o adapters:
  - PEFT/HF as the baseline recipe does it: `generate` with the adapter disabled / enabled,
    `load_adapter` + `set_adapter`, and `hotswap_adapter` from disk;
  - LQMF: engine/fastgen.py's CompiledDecoder (static cache, compiled CUDA-graph decode step)
    with AdapterSlots (adapters resident on the GPU, switched by an in-place copy).
Batch 1, 64 prompt tokens, 128 new tokens (greedy), medians of 3. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/gpu_serve_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from gpu_train_bench import MODEL_DIR, ensure_model

NEW_TOKENS = 128


def timed(fn, sync) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--skip-hf", action="store_true", help="skip the HF/PEFT side (measured by the baseline)")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine.fastgen import AdapterSlots, CompiledDecoder
    from lqmf.engine.loading import load_model

    ensure_model()
    sync = torch.cuda.synchronize
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    resolved = ModelCatalogue(Workspace.resolve("/tmp")).resolve(str(MODEL_DIR))
    started = time.perf_counter()
    loaded = load_model(resolved, task="chat", quantize_4bit=True)
    res["load_4bit_s"] = round(time.perf_counter() - started, 1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    model.save_pretrained("/tmp/ad")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    model.save_pretrained("/tmp/ad2")
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(3, 32000, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()

    def hf_generate():
        return model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    if not args.skip_hf:
        def hf_rate() -> float:
            return round(statistics.median(NEW_TOKENS / timed(hf_generate, sync) for _ in range(3)), 1)

        with torch.no_grad():
            hf_generate()
            with model.disable_adapter():
                res["hf_gen_tok_s_base"] = hf_rate()
            res["hf_gen_tok_s_adapter"] = hf_rate()
            eager_tokens = hf_generate()[0, 64:].tolist()

        def load_and_set(i: int) -> None:
            model.load_adapter("/tmp/ad2", adapter_name=f"x{i}")
            model.set_adapter(f"x{i}")

        loads = [timed(lambda i=i: load_and_set(i), sync) for i in range(3)]
        res["peft_load_adapter_s"] = [round(x, 3) for x in loads]
        print("PARTIAL", json.dumps(res), flush=True)
        model.set_adapter("default")
        for i in range(3):
            model.delete_adapter(f"x{i}")
        hot = [timed(lambda i=i: hotswap_adapter(model, "/tmp/ad2" if i % 2 == 0 else "/tmp/ad", adapter_name="default",
                                                 torch_device="cuda:0"), sync) for i in range(4)]
        res["peft_hotswap_s"] = [round(x, 3) for x in hot]
        hotswap_adapter(model, "/tmp/ad", adapter_name="default", torch_device="cuda:0")


    # LQMF serving path
    slots = AdapterSlots(model, "default", slot_scaling=32 / 16)
    res["lqmf_add_adapter_from_disk_s"] = round(
        timed(lambda: slots.add("b", slots.read_adapter("/tmp/ad2"), 32 / 16), sync), 4)
    swaps = [timed(lambda i=i: slots.activate("b" if i % 2 == 0 else "default"), sync) for i in range(args.swaps)]
    res["lqmf_swap_ms_p50"] = round(1000 * percentile(swaps, 0.5), 3)
    res["lqmf_swap_ms_p95"] = round(1000 * percentile(swaps, 0.95), 3)
    save(res, args.out)
    decoder = CompiledDecoder(model, max_cache_len=512)
    prompt = ids[0].tolist()
    res["lqmf_compile_warmup_s"] = None
    save(res, args.out)
    res["lqmf_compile_warmup_s"] = round(timed(lambda: decoder.generate(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS),
                                               sync), 1)
    decoder.generate(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    def lqmf_rate() -> float:
        return NEW_TOKENS / timed(lambda: decoder.generate(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS), sync)

    slots.activate(None)
    decoder.generate(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    res["lqmf_gen_tok_s_base"] = round(statistics.median(lqmf_rate() for _ in range(3)), 1)
    save(res, args.out)
    slots.activate("default")
    res["lqmf_gen_tok_s_adapter"] = round(statistics.median(lqmf_rate() for _ in range(3)), 1)
    fast_tokens = decoder.generate(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS).tokens
    if not args.skip_hf:
        res["greedy_tokens_equal_to_hf_first_32"] = sum(
            a == b for a, b in zip(fast_tokens[:32], eager_tokens[:32], strict=True))
        res["adapter_overhead_pct_hf"] = round(100 * (res["hf_gen_tok_s_base"] / res["hf_gen_tok_s_adapter"] - 1), 1)
    res["adapter_overhead_pct_lqmf"] = round(100 * (res["lqmf_gen_tok_s_base"] / res["lqmf_gen_tok_s_adapter"] - 1), 1)
    res["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    save(res, args.out)


def save(res: dict, out: str) -> None:
    """Print and write what has been measured so far (a later stage may not finish in time)."""
    print("RESULT", json.dumps(res), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "lqmf_serve.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
