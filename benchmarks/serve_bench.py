"""Serving benchmark (not a test): adapter swap latency and generation speed of `lqmf serve`.

It builds a random model of the chosen shape (speed does not depend on weight values) or uses
--model, writes random LoRA adapters for it into a scratch workspace, loads them in the model
host that `lqmf serve` uses, and measures:

- swap latency, p50/p95 over --repeats: `load` into a new PEFT slot (load_adapter), `switch` to an
  adapter that is not resident (PEFT hotswap into the active adapter's weights), switching between
  resident adapters (set_adapter, what a request naming another adapter pays), and `unload`;
  with --http the same swaps through a running server's admin route (what `lqmf adapters switch`
  sees: HTTP, queueing and the swap);
- generation tokens/s at batch 1 (greedy, exactly --new-tokens tokens) with the base and with an
  unmerged adapter, and the slowdown.

CPU, as recorded in docs/serving.md:
    PYTHONPATH=src python benchmarks/serve_bench.py --shape tiny --http
    PYTHONPATH=src python benchmarks/serve_bench.py --shape small --http --new-tokens 32
GPU, a Mistral-7B-shaped model in bf16 (or --4bit, with bitsandbytes):
    PYTHONPATH=src python benchmarks/serve_bench.py --shape mistral-7b --device cuda --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHAPES = {
    # a 2-layer toy, a ~150M Llama for CPUs, and the shape of the GPU baseline (Mistral-7B)
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024),
    "small": dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}
PROMPT = "Explain in a few sentences how to return an item that arrived broken."


def build_model(shape: str, folder: Path, device: str) -> Path:
    """A randomly initialised model of shape, with LQMF's tiny tokenizer, saved to folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lqmf.engine.tiny import build_tokenizer

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = build_tokenizer(vocab_size=min(2048, config.vocab_size))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_adapters(workspace: Path, model_path: Path, reference: str, count: int, rank: int, targets: list[str],
                   quantized: bool) -> list[str]:
    """count random LoRA adapters for the model, registered in the workspace as LQMF adapters."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    layers = [(name, module.in_features, module.out_features) for name, module in skeleton.named_modules()
              if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    names = []
    for index in range(count):
        name = f"bench-{index}"
        folder = workspace / "adapters" / name
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(index)
        weights = {}
        for layer, fan_in, fan_out in layers:
            weights[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
            weights[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
        save_file(weights, folder / "adapter_model.safetensors")
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM",
                   base_model_name_or_path=str(model_path)).save_pretrained(folder)
        manifest = {"name": name, "task": "chat", "runtime": {"quantized_4bit": quantized},
                    "base_model": {"reference": reference, "path": str(model_path), "source": str(model_path)}}
        (folder / "lqmf.json").write_text(json.dumps(manifest))
        names.append(name)
    return names


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered), 3), "p95_ms": round(p95, 3), "n": len(ordered)}


class Bench:
    def __init__(self, host, device: str):
        self.host = host
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - started) * 1000

    def swaps(self, names: list[str], repeats: int) -> dict[str, Any]:
        host, first, second, third = self.host, *names[:3]
        results: dict[str, Any] = {}
        loads, unloads = [], []
        for _ in range(repeats):  # a new slot beside the active adapter, then freed again
            loads.append(self.timed(lambda: host.load(second, activate=False)))
            unloads.append(self.timed(lambda: host.unload(second)))
        results["load (new slot)"], results["unload"] = percentiles(loads), percentiles(unloads)
        methods, hotswaps = set(), []
        for index in range(repeats):  # neither resident: each replaces the active one in place
            target = (second, third)[index % 2]
            hotswaps.append(self.timed(lambda target=target: methods.add(host.switch(target).method)))
        assert methods == {"hotswap"}, methods
        results["switch (hotswap, not resident)"] = percentiles(hotswaps)
        host.switch(first)
        host.load(second, activate=False)
        model = host.model.model
        slots = [host.resident[first].slot, host.resident[second].slot]
        flips = [self.timed(lambda index=index: model.set_adapter(slots[index % 2], inference_mode=True))
                 for index in range(repeats)]
        results["switch (resident, set_adapter)"] = percentiles(flips)
        host.unload(second)
        return results

    def generation(self, adapter: str, new_tokens: int, repeats: int) -> dict[str, Any]:
        from lqmf.engine import inference

        model = self.host.model
        ids = inference.prompt_ids(model, PROMPT)
        rows = {}
        for label, slot in (("base", None), ("adapter", self.host.resident[adapter].slot)):
            with inference.adapter_context(model, slot):
                inference.generate(model, ids, max_new_tokens=4, min_new_tokens=4)  # warm-up
                runs = [inference.generate(model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                        for _ in range(repeats)]
            rows[label] = {"tokens_per_s": round(statistics.median(r.tokens_per_second for r in runs), 2),
                           "first_token_ms": round(statistics.median(r.first_token_seconds for r in runs) * 1000, 2)}
        if model.decoder is not None:  # how the decoder (a batch of one) ran: CUDA graphs, or eagerly
            rows["cuda_graphs"], rows["capture_failures"] = len(model.decoder.graphs), len(model.decoder.failed)
        rows["adapter_slowdown_pct"] = round(100 * (1 - rows["adapter"]["tokens_per_s"] / rows["base"]["tokens_per_s"]),
                                             1)
        rows.update(prompt_tokens=len(ids), new_tokens=new_tokens, repeats=repeats)
        return rows


def http_generation(url: str, model_id: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Batch-1 completions through the server: tokens/s over the whole request (prompt, HTTP and all)."""
    import urllib.request

    def complete() -> tuple[int, float]:
        body = json.dumps({"model": model_id, "prompt": PROMPT, "max_tokens": new_tokens}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.load(response)
        return answer["usage"]["completion_tokens"], time.perf_counter() - started

    complete()  # warm-up
    runs = [complete() for _ in range(repeats)]
    return {"tokens_per_s": round(statistics.median(tokens / seconds for tokens, seconds in runs), 2),
            "completion_tokens": [tokens for tokens, _ in runs]}


def http_swaps(host, workspace, names: list[str], repeats: int, new_tokens: int,
               gen_repeats: int) -> dict[str, Any]:
    """Swap latency through a running server's admin route, as `lqmf adapters switch` sees it, and
    generation speed through its completions route, with the base and with the active adapter."""
    import uvicorn

    from lqmf.core.serving import notify_server, server_url
    from lqmf.engine.serve.server import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    url = server_url("127.0.0.1", sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(host), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    results: dict[str, Any] = {}
    try:
        notify_server(workspace, "switch", names[0], server_url=url)  # untimed: the fresh server's first request
        for label, targets in (("switch over HTTP (hotswap)", names[1:3]), ("switch over HTTP (resident)", names[:2])):
            if label.endswith("(resident)"):
                notify_server(workspace, "switch", names[0], server_url=url)
                notify_server(workspace, "load", names[1], server_url=url)
            round_trips, inside = [], []
            for index in range(repeats):
                started = time.perf_counter()
                answer = notify_server(workspace, "switch", targets[index % 2], server_url=url)
                round_trips.append((time.perf_counter() - started) * 1000)
                inside.append(answer["swap_ms"])
            results[label] = {**percentiles(round_trips), "server_swap_p50_ms": percentiles(inside)["p50_ms"]}
        base = http_generation(url, host.base_id, new_tokens, gen_repeats)
        adapter = http_generation(url, host.active, new_tokens, gen_repeats)
        results["generation over HTTP"] = {
            "base": base, "adapter": adapter,
            "adapter_slowdown_pct": round(100 * (1 - adapter["tokens_per_s"] / base["tokens_per_s"]), 1)}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return results


def environment(host, device: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    model = host.model.model
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": device, "dtype": host.model.loaded.dtype,
            "quantized_4bit": host.model.loaded.quantized, "threads": torch.get_num_threads(),
            "base_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model (alias, folder or hub id); default: a random --shape model")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="shape of the random model")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="load the base in 4-bit (bitsandbytes)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--repeats", type=int, default=30, help="swaps per measurement")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--gen-repeats", type=int, default=3, help="generations per measurement (median)")
    parser.add_argument("--http", action="store_true", help="also swap through a running server (needs FastAPI)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a "
                        "shared CPU, 1 avoids oversubscription stalls")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine.loading import quiet_libraries, select_device
    from lqmf.engine.serve.host import BatchSettings, ModelHost

    quiet_libraries()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = select_device(args.device).type
    scratch = Path(tempfile.mkdtemp(prefix="lqmf-serve-bench-"))
    workspace = Workspace(scratch / "ws")
    started = time.perf_counter()
    if args.model:
        resolved = ModelCatalogue(workspace).resolve(args.model)
        model_path, reference = resolved.path, args.model
        if model_path is None:
            sys.exit(f"{args.model}: not available locally (download it first)")
    else:
        model_path = build_model(args.shape, scratch / args.shape, device)
        reference = str(model_path)
    names = write_adapters(workspace.root, model_path, reference, 3, args.rank, args.targets.split(","),
                           args.four_bit)
    prepared_s = time.perf_counter() - started
    started = time.perf_counter()
    host = ModelHost.start(workspace, base=reference, adapters=[names[0]], device=args.device,
                           quantize_4bit=args.four_bit, batching=BatchSettings(enabled=False))  # PEFT slots
    load_s = time.perf_counter() - started
    bench = Bench(host, device)
    adapter_bytes = (workspace.adapters_dir / names[0] / "adapter_model.safetensors").stat().st_size
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/serve_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model or f"random {args.shape}", "rank": args.rank, "targets": args.targets,
        "adapter_mb": round(adapter_bytes / 2**20, 2),
        "prepare_s": round(prepared_s, 1), "model_load_s": round(load_s, 2),
        "environment": environment(host, device),
        "generation": bench.generation(names[0], args.new_tokens, args.gen_repeats),
        "swaps": bench.swaps(names, args.repeats),
    }
    if args.http:
        over_http = http_swaps(host, workspace, names, args.repeats, args.new_tokens, args.gen_repeats)
        results["generation_http"] = over_http.pop("generation over HTTP")
        results["swaps"].update(over_http)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict[str, Any]) -> None:
    from tabulate import tabulate

    env = results["environment"]
    print(f"# {results['command']}")
    print(f"{results['model']} ({env['base_parameters']:,} parameters, {env['dtype']}"
          f"{', 4-bit' if env['quantized_4bit'] else ''}) on {env.get('gpu') or env['device']}, "
          f"LoRA r={results['rank']} on {results['targets']} ({results['adapter_mb']} MB); "
          f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}")
    rows = [[name, r["p50_ms"], r["p95_ms"], r.get("server_swap_p50_ms", ""), r["n"]]
            for name, r in results["swaps"].items()]
    print(tabulate(rows, headers=["swap", "p50 ms", "p95 ms", "server-side p50 ms", "n"], tablefmt="github"))
    gen = results["generation"]
    print()
    print(tabulate([[label, gen[label]["tokens_per_s"], gen[label]["first_token_ms"]] for label in ("base", "adapter")],
                   headers=[f"generation ({gen['new_tokens']} new tokens, batch 1)", "tokens/s", "first token ms"],
                   tablefmt="github"))
    print(f"\nslowdown with an unmerged adapter: {gen['adapter_slowdown_pct']}%")
    if "generation_http" in results:
        http = results["generation_http"]
        print(f"through the server's /v1/completions: base {http['base']['tokens_per_s']} tokens/s, adapter "
              f"{http['adapter']['tokens_per_s']} tokens/s ({http['adapter_slowdown_pct']}% slower)")


if __name__ == "__main__":
    main()
