"""Load benchmark (not a test): a real `lqmf serve` process under many concurrent clients.

Builds a random model of the chosen shape (or takes --model), writes random r=16 q/k/v/o adapters
for it (benchmarks/serve_bench.py), starts `python -m lqmf serve` on a free port with three of them
resident, and drives it with the official `openai` client:

- for each --clients level C: C threads each send --rounds completions of exactly --new-tokens
  tokens (`min_tokens`), spread round-robin over the three adapters and the base; aggregate
  tokens/s (all completion tokens / wall time) and the median request time. Each level (and the
  --mixed-clients one) is driven once first, unmeasured, so its batch size's CUDA graphs are captured
  before the measured rounds (a server captures a graph the first time it meets a batch size and
  length; until session 7 only the largest level and one client were warmed);
- the same C requests one after another (--sequential), for the batching gain;
- mixed vs one adapter: C concurrent requests all to one adapter, then spread over the three;
- with --distinct C: the server holds C adapters resident (--resident R: R of them, at least C), and
  C concurrent requests go each to its own adapter, all to one adapter, and all to the base model
  (in turn, twice, the median of each);
- loading a fourth adapter into the running server (`POST /admin/adapters/load`, then unload), p50;
- with --memory-run N L: a second server with --max-batch N --max-seq-len L, N concurrent requests
  filling L tokens each, and the server's peak GPU memory (torch.cuda.max_memory_allocated).

    PYTHONPATH=src python benchmarks/serve_load.py --shape tiny --clients 1 4 16 --sequential 16
    PYTHONPATH=src python benchmarks/serve_load.py --model /tmp/m7b --device cuda --4bit \\
        --clients 1 4 16 32 --max-batch 32 --memory-run 16 1024 --out serve-load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import build_model, write_adapters  # noqa: E402

PROMPT = "Explain in a few sentences how to return an item that arrived broken."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@contextmanager
def lqmf_serve(workspace: Path, model: Path, adapters: list[str], extra: list[str], threads: int | None,
               keep_log: Path | None = None):
    """`python -m lqmf serve` on a free port; yields (base url, ready record); always stopped (its
    stderr appended to keep_log)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out, log = workspace / "serve.out", workspace / "serve.log"
    command = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "serve", "--model", str(model),
               "--port", "0", "--json", "--log-level", "warning",
               *[arg for name in adapters for arg in ("--adapter", name)], *extra]
    with open(out, "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"lqmf serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"lqmf serve was not ready in 600 s:\n{log.read_text()}")
            try:
                record = json.loads(out.read_text())
                break
            except ValueError:
                time.sleep(0.2)
        yield record["url"], record
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if keep_log is not None:
            with open(keep_log, "a") as handle:
                handle.write(f"$ {' '.join(command)}\n{log.read_text(errors='replace')}\n")


def drive(client, models: list[str], clients: int, rounds: int, new_tokens: int, prompt: str = PROMPT
          ) -> dict[str, Any]:
    """clients threads, each sending rounds completions; models assigned round-robin over all requests."""
    times: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    texts: dict[str, set[str]] = {}
    lock = threading.Lock()

    def worker(index: int) -> None:
        for round_index in range(rounds):
            model = models[(index + round_index * clients) % len(models)]
            started = time.perf_counter()
            try:
                reply = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                  extra_body={"min_tokens": new_tokens})
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                times.append(time.perf_counter() - started)
                tokens.append(reply.usage.completion_tokens)
                texts.setdefault(model, set()).add(reply.choices[0].text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(times), "errors": errors[:5], "failed": len(errors),
            "wall_s": round(wall, 3), "completion_tokens": sum(tokens),
            "aggregate_tokens_per_s": round(sum(tokens) / wall, 1),
            "median_request_s": round(statistics.median(times), 3) if times else None,
            "max_request_s": round(max(times), 3) if times else None,
            "texts": {model: sorted(answers) for model, answers in texts.items()}}


def http_json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST body to) url; the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def adapter_loads(url: str, name: str, repeats: int) -> dict[str, Any]:
    """Round trips of loading an adapter into the running server and unloading it, and how often that
    built the adapter tables anew (and so dropped the CUDA graphs)."""
    builds = (health(url).get("batching") or {}).get("adapter_table_builds", 0)
    loads = []
    for _ in range(repeats):
        started = time.perf_counter()
        body = http_json(url + "/admin/adapters/load", {"adapter": name, "activate": False})
        loads.append((time.perf_counter() - started, body["swap_ms"]))
        http_json(url + "/admin/adapters/unload", {"adapter": name})
    return {"round_trip_ms_p50": round(statistics.median(t for t, _ in loads) * 1000, 1),
            "server_ms_p50": round(statistics.median(s for _, s in loads), 1),
            "round_trip_ms_max": round(max(t for t, _ in loads) * 1000, 1), "n": repeats,
            "table_builds": (health(url).get("batching") or {}).get("adapter_table_builds", 0) - builds}


def long_prompt(model: Path, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens for the model's tokenizer (raw completions add BOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = ("the quick brown fox jumps over the lazy dog " * (tokens // 2 + 8)).split()
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens - 1]
    text = tokenizer.decode(ids)
    while len(tokenizer(text, add_special_tokens=True)["input_ids"]) > tokens:
        ids = ids[:-1]
        text = tokenizer.decode(ids)
    return text


def distinct_adapters(client, served: list[str], base_id: str, args, repeats: int = 2) -> dict[str, Any]:
    """args.distinct clients each on its own adapter, against all of them on one adapter and on the base:
    the three in turn, `repeats` times, the median tokens/s of each (one round varies by several percent)."""
    clients = args.distinct
    models = {"distinct": served[:clients], "one_adapter": served[:1], "base": [base_id]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, chosen in models.items():
            runs[name].append(drive(client, chosen, clients, args.rounds, args.new_tokens))
    speed = {name: statistics.median(run["aggregate_tokens_per_s"] for run in done) for name, done in runs.items()}
    return {"clients": clients, "resident": len(served), "repeats": repeats, "tokens_per_s": speed,
            "each_run": {name: [run["aggregate_tokens_per_s"] for run in done] for name, done in runs.items()},
            "distinct_over_one": round(speed["distinct"] / speed["one_adapter"], 3),
            "one_adapter_over_base": round(speed["one_adapter"] / speed["base"], 3),
            "failed": sum(run["failed"] for done in runs.values() for run in done)}


def health(url: str) -> dict[str, Any]:
    return http_json(url + "/health")


def loop_counts(url: str) -> dict[str, float]:
    """The scheduler's steps, CUDA graphs captured and loop times so far (batching in /health)."""
    batching = health(url).get("batching") or {}
    return {key: batching.get(key, 0) for key in ("steps", "graphs", "prefill_graphs")} | batching.get("loop", {})


def loop_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where the scheduler's loop spent a level's time: the counters' growth between two loop_counts."""
    return {key: round(after[key] - before.get(key, 0), 3) for key in after}


def measured_server_flags(args: argparse.Namespace, extra: list[str], adapters: int) -> list[str]:
    """The flags of the measured server: the tuned ones, or with --default-flags what a user types."""
    if args.default_flags:
        return ["--max-adapters", str(adapters)] if args.distinct else []
    return [*extra, "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small", "mistral-7b"])
    parser.add_argument("--model", type=Path, help="an existing model folder instead of a random one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--4bit", dest="four_bit", action="store_true")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--default-flags", action="store_true",
                        help="start the measured server as a user would: only --model and --adapter (no --device, "
                        "--4bit, --max-batch, --max-seq-len, --max-queue, --max-new-tokens; --max-adapters only "
                        "with --distinct)")
    parser.add_argument("--sequential", type=int, default=0, help="also send this many requests one after another")
    parser.add_argument("--mixed-clients", type=int, default=16)
    parser.add_argument("--load-repeats", type=int, default=5)
    parser.add_argument("--distinct", type=int, default=0, metavar="CLIENTS",
                        help="also CLIENTS requests each on its own resident adapter, vs one adapter, vs the base")
    parser.add_argument("--resident", type=int, default=0, metavar="ADAPTERS",
                        help="with --distinct: hold this many adapters resident (default: --distinct's count)")
    parser.add_argument("--memory-run", type=int, nargs=2, metavar=("SEQUENCES", "TOKENS"))
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the server (CPU)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--server-log", type=Path, help="append the servers' stderr here")
    args = parser.parse_args()

    import openai

    scratch = Path(tempfile.mkdtemp(prefix="lqmf-serve-load-"))
    workspace = scratch / "ws"
    (workspace / "adapters").mkdir(parents=True)
    model = args.model or build_model(args.shape, scratch / "model", args.device)
    written = max(3, args.distinct, args.resident) + 1
    names = write_adapters(workspace, model, str(model), written, 16, TARGETS, args.four_bit)
    served, spare = names[:-1], names[-1]
    extra = ["--device", args.device, "--4bit" if args.four_bit else "--no-4bit", "--max-new-tokens",
             str(max(args.new_tokens, 512)), "--max-queue", "256", "--max-adapters", str(len(names))]
    report: dict[str, Any] = {"command": " ".join(sys.argv), "default_flags": args.default_flags,
                              "python": platform.python_version(),
                              "model": str(model), "shape": None if args.model else args.shape,
                              "four_bit": args.four_bit, "device": args.device, "new_tokens": args.new_tokens}
    with lqmf_serve(workspace, model, served, measured_server_flags(args, extra, len(names)), args.threads,
                    args.server_log) as (url, record):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        models = [*served[:3], record["base_id"]]
        report["server"] = {k: v for k, v in health(url).items() if k in ("batching", "device", "dtype")}
        for clients in sorted({*args.clients, args.mixed_clients} - {0}, reverse=True):  # warm-up, one round a
            drive(client, models, clients, 1, args.new_tokens)  # level: its batch size's graphs are captured
        report["levels"] = []
        for clients in args.clients:
            before = loop_counts(url)
            result = drive(client, models, clients, args.rounds, args.new_tokens)
            result["loop"] = loop_delta(before, loop_counts(url))
            report["levels"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "texts"}), flush=True)
        # greedy answers per model id, whatever the batch: one distinct text each when batching is exact
        answers = {model: {text for level in report["levels"] for text in level["texts"].get(model, [])}
                   for model in models}
        report["distinct_answers_per_model"] = {model: len(texts) for model, texts in answers.items()}
        print(json.dumps(report["distinct_answers_per_model"]), flush=True)
        if args.sequential:
            concurrent = drive(client, models, args.sequential, 1, args.new_tokens)
            sequential = drive(client, models, 1, args.sequential, args.new_tokens)
            report["sequential_vs_concurrent"] = {
                "requests": args.sequential, "concurrent_wall_s": concurrent["wall_s"],
                "sequential_wall_s": sequential["wall_s"],
                "ratio": round(concurrent["wall_s"] / sequential["wall_s"], 3)}
            print(json.dumps(report["sequential_vs_concurrent"]), flush=True)
        one = drive(client, served[:1], args.mixed_clients, args.rounds, args.new_tokens)
        mixed = drive(client, served[:3], args.mixed_clients, args.rounds, args.new_tokens)
        report["mixed_vs_one_adapter"] = {"clients": args.mixed_clients, "one_adapter": one, "three_adapters": mixed,
                                          "mixed_over_one": round(mixed["aggregate_tokens_per_s"]
                                                                  / one["aggregate_tokens_per_s"], 3)}
        print(json.dumps(report["mixed_vs_one_adapter"]), flush=True)
        if args.distinct:
            report["distinct_adapters"] = distinct_adapters(client, served, record["base_id"], args)
            print(json.dumps(report["distinct_adapters"]), flush=True)
        report["adapter_load"] = adapter_loads(url, spare, args.load_repeats)
        print(json.dumps(report["adapter_load"]), flush=True)
        report["server_after"] = health(url).get("gpu_memory_gb")
    if args.memory_run:
        sequences, length = args.memory_run
        prompt = long_prompt(model, length - args.new_tokens)
        with lqmf_serve(workspace, model, served, [*extra, "--max-batch", str(sequences), "--max-seq-len",
                                                   str(length)], args.threads, args.server_log) as (url, record):
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            run = drive(client, [*served, record["base_id"]], sequences, 1, args.new_tokens, prompt)
            report["memory_run"] = {"sequences": sequences, "tokens": length, "load": run,
                                    "gpu_memory_gb": health(url).get("gpu_memory_gb")}
            print(json.dumps(report["memory_run"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
