"""Cold start of the light verbs, as a ratio to `python -c "import typer, yaml"` measured in the same run.

    python benchmarks/cold_start.py [--repeat 15] [--adapters 3] [--workspace DIR] [--json]

Each repetition runs every case once in a fresh interpreter, in turn, so that load on a shared
machine falls on all of them alike; the figures per case are the median wall time and the median
CPU time (user + system, which other processes on a busy machine disturb less). Bytecode is
compiled first (one untimed run each, PYTHONDONTWRITEBYTECODE unset), as an installed package has it.
The workspace defaults to a temporary one holding --adapters adapter folders with manifests (3; the
figures in docs/cli.md are also given at 1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
BASELINE = "import typer, yaml"
CASES = {
    "lqmf --help": ["--help"],
    "lqmf adapters list --json": ["adapters", "list", "--json"],
    "lqmf status --json": ["status", "--json"],
    "lqmf models list": ["models", "list"],
}


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _commands(workspace: Path) -> dict[str, list[str]]:
    commands = {f"python -c \"{BASELINE}\"": [sys.executable, "-c", BASELINE]}
    for name, args in CASES.items():
        commands[name] = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), *args]
    return commands


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _seconds(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run."""
    cpu, started = _cpu_of_children(), time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started, _cpu_of_children() - cpu


def fake_adapters(workspace: Path, count: int = 3) -> None:
    """Adapter folders with manifests and empty weights: enough for the registry to list them."""
    for index in range(count):
        folder = workspace / "adapters" / f"demo-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        (folder / "adapter_model.safetensors").write_bytes(b"")
        manifest = {"lqmf_manifest": 1, "name": folder.name, "task": "chat", "created": "2026-01-01T00:00:00+00:00",
                    "base_model": {"reference": "tiny", "source": "tiny"}, "lora": {"r": 8}, "metrics": {}}
        (folder / "lqmf.json").write_text(json.dumps(manifest))


def measure(repeat: int = 15, workspace: Path | None = None, adapters: int = 3) -> dict:
    """Median wall and CPU seconds per case, and each lqmf case's ratios to the baseline's."""
    given = workspace is not None
    with tempfile.TemporaryDirectory() as scratch:
        if workspace is None:
            workspace = Path(scratch)
            fake_adapters(workspace, adapters)
        env = _env()
        commands = _commands(workspace)
        for command in commands.values():  # compile bytecode, warm the page cache
            _seconds(command, env)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(repeat):
            for name, command in commands.items():
                runs[name].append(_seconds(command, env))
    wall = {name: statistics.median(w for w, _ in values) for name, values in runs.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in runs.items()}
    baseline_name = next(iter(commands))
    base_wall, base_cpu = wall[baseline_name], cpu[baseline_name]
    return {
        "baseline": baseline_name, "baseline_wall_s": round(base_wall, 4), "baseline_cpu_s": round(base_cpu, 4),
        "repeat": repeat, "adapters": None if given else adapters, "python": sys.version.split()[0],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cases": {name: {"wall_s": round(wall[name], 4), "wall_ratio": round(wall[name] / base_wall, 3),
                         "cpu_s": round(cpu[name], 4), "cpu_ratio": round(cpu[name] / base_cpu, 3)}
                  for name in CASES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--adapters", type=int, default=3, help="Adapter folders in the temporary workspace.")
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    options = parser.parse_args()
    result = measure(options.repeat, options.workspace, options.adapters)
    if options.json:
        print(json.dumps(result, indent=2))
        return
    print(f"medians of {result['repeat']} runs each; {result['adapters'] or 'given'} adapters; "
          f"load average {result['load_average']}")
    print(f"{'':<30} {'wall':>8} {'ratio':>6} {'CPU':>8} {'ratio':>6}")
    print(f"{result['baseline']:<30} {result['baseline_wall_s'] * 1000:6.0f} ms {'1.00x':>6} "
          f"{result['baseline_cpu_s'] * 1000:6.0f} ms {'1.00x':>6}")
    for name, case in result["cases"].items():
        print(f"{name:<30} {case['wall_s'] * 1000:6.0f} ms {case['wall_ratio']:5.2f}x "
              f"{case['cpu_s'] * 1000:6.0f} ms {case['cpu_ratio']:5.2f}x")


if __name__ == "__main__":
    main()
