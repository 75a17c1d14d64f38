"""The machine, read cheaply (no torch): GPUs through nvidia-smi; CPU and RAM from /proc (psutil elsewhere);
disk; installed library versions from their dist-info folders."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

GiB = 2**30  # (not from memory_plan: `lqmf status` need not import it)

LIBRARIES = ("lqmf", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
NVIDIA_SMI_TIMEOUT_S = 5.0
GPU_QUERY = ("index", "name", "memory.total", "memory.used", "memory.free", "driver_version", "utilization.gpu")


def _run_nvidia_smi(args: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None), or (None, why nvidia-smi gave nothing)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None, "nvidia-smi not found (no NVIDIA driver on this machine)"
    try:
        result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                                check=False)
    except subprocess.TimeoutExpired:
        return None, f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f} s"
    except OSError as err:
        return None, f"nvidia-smi failed to start: {err}"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return None, f"nvidia-smi failed: {detail[0] if detail else f'exit status {result.returncode}'}"
    return result.stdout, None


def parse_gpu_query(text: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=<GPU_QUERY> --format=csv,noheader,nounits` (MiB, %) as dicts (bytes)."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(GPU_QUERY):
            continue
        row = dict(zip(GPU_QUERY, cells, strict=True))
        mib = {key: _number(row[f"memory.{key}"]) for key in ("total", "used", "free")}
        gpus.append({
            "index": int(row["index"]), "name": row["name"],
            **{f"memory_{key}_gb": round(v * 2**20 / GiB, 2) if v is not None else None for key, v in mib.items()},
            "driver": row["driver_version"], "utilization_pct": _number(row["utilization.gpu"]),
        })
    return gpus


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:  # "[N/A]" on some boards
        return None


def parse_cuda_version(text: str) -> str | None:
    """The driver's CUDA version from `nvidia-smi --version` (or plain `nvidia-smi`) output."""
    match = re.search(r"CUDA Version\s*:?\s*([0-9.]+)", text)
    return match.group(1) if match else None


def gpus() -> dict[str, Any]:
    """{"gpus": [...], "cuda_version": ..., "problem": "gpu_problem": why none are listed (or None)}."""
    out, problem = _run_nvidia_smi([f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader,nounits"])
    if out is None:
        return {"gpus": [], "cuda_version": None, "gpu_problem": problem}
    version, _ = _run_nvidia_smi(["--version"])
    return {"gpus": parse_gpu_query(out), "cuda_version": parse_cuda_version(version or ""), "gpu_problem": None}


def free_gpu_memory() -> tuple[int | None, str | None]:
    """(free bytes on the first GPU, its name), without importing torch; (None, None) with no GPU."""
    found = gpus()["gpus"]
    if not found or found[0]["memory_free_gb"] is None:
        return None, None
    return int(found[0]["memory_free_gb"] * GiB), found[0]["name"]


def platform_name() -> str:
    """What platform.platform() says ("Linux-6.1.0-x86_64-with-glibc2.36"), without the `uname -p` it runs
    on Linux for a processor name that is nearly always "unknown" or the machine again, both left out
    (a child process: about 5 ms of CPU, its own included, on every `lqmf status`)."""
    if platform.system() != "Linux":
        return platform.platform()
    parts = (platform.system(), platform.release(), platform.machine(), "with", "".join(platform.libc_ver()))
    return "-".join(part for part in parts if part)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_meminfo() -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo, as psutil.virtual_memory reads them on Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _physical_cores() -> int | None:
    """Distinct cores in sysfs' topology (what psutil.cpu_count(logical=False) counts on Linux)."""
    siblings = set()
    for name in ("core_cpus_list", "thread_siblings_list"):
        for path in Path("/sys/devices/system/cpu").glob(f"cpu[0-9]*/topology/{name}"):
            try:
                siblings.add(path.read_text().strip())
            except OSError:
                continue
        if siblings:
            return len(siblings)
    return None


def cpu_and_ram() -> dict[str, Any]:
    meminfo, physical = _proc_meminfo(), _physical_cores()
    if meminfo is None or physical is None:  # not Linux: psutil (~40 ms to import) knows the others
        import psutil

        memory = psutil.virtual_memory()
        meminfo, physical = (memory.total, memory.available), psutil.cpu_count(logical=False)
    total, available = meminfo
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical,
                "load_average": load},
        "ram": {"total_gb": round(total / GiB, 2), "available_gb": round(available / GiB, 2),
                "used_pct": round((total - available) / total * 100, 1)},
    }


_DIST_INFO = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+?)\.(?:dist|egg)-info$")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions (None: not installed), read from the dist-info folder names on sys.path, first
    found first, as importlib.metadata finds them, without its ~40 ms import."""
    wanted = {_normalized(name): name for name in names}
    versions: dict[str, str | None] = dict.fromkeys(names)
    for entry in sys.path:
        try:
            folders = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in folders:
            match = _DIST_INFO.match(folder)
            name = wanted.get(_normalized(match["name"])) if match else None
            if name is not None and versions[name] is None:
                versions[name] = match["version"]
    return versions


def disk(path: Path) -> dict[str, Any]:
    """Free space on the file system that holds path (or its nearest existing parent)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return {"path": str(path), "total_gb": round(usage.total / GiB, 2), "free_gb": round(usage.free / GiB, 2)}
