"""Is an adapter folder what its manifest says? One check for `adapters list` and every loading path.

- sizes: every file the manifest lists has the size it recorded;
- checksums: with full=True each file's sha256 is compared with the manifest's (computed once per
  file version: the digests are cached by mtime and size in WORKSPACE/.lqmf/checksums.json); the cheap
  check (full=False, for `adapters list`) compares only digests already in that cache;
- the safetensors file parses and its header covers the file exactly (no torch: the header is JSON);
- adapter_config.json agrees with the manifest (r, alpha, target modules) and with the weights'
  shapes (each lora_A is r x in, each lora_B out x r, on target modules only).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError
from lqmf.core.fsutil import atomic_write_json, file_sha256
from lqmf.core.weights import LORA_KEY, TensorInfo, read_safetensors_checked, target_pattern_problem

CHECKSUM_CACHE = Path(".lqmf") / "checksums.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ChecksumCache:
    """{file path: [mtime_ns, size, sha256]} in WORKSPACE/.lqmf/checksums.json (in memory only without a
    workspace), plus {"passed:" adapter folder: the (file, mtime, size) list of a version that passed the
    content checks}; a lost update between processes only costs a recheck."""

    def __init__(self, workspace_root: Path | None):
        self.path = workspace_root / CHECKSUM_CACHE if workspace_root is not None else None
        self.changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = {}
        self.entries: dict[str, list[Any]] = data if isinstance(data, dict) else {}

    def digest(self, path: str, compute: bool) -> str | None:
        """The file's sha256 when cached for its current mtime and size (or computed, with compute)."""
        known = self.entries.get(path)
        if known is None and not compute:
            return None
        stat = os.stat(path)
        if isinstance(known, list) and len(known) == 3 and known[:2] == [stat.st_mtime_ns, stat.st_size]:
            return str(known[2])
        if not compute:
            return None
        digest = file_sha256(path)
        self.entries[path] = [stat.st_mtime_ns, stat.st_size, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed and self.path is not None and self.path.parent.parent.is_dir():
            try:
                atomic_write_json(self.path, self.entries)
            except OSError:
                pass  # a read-only workspace: the digests are recomputed next time
            self.changed = False


def adapter_problems(folder: Path, manifest: dict[str, Any], full: bool = False,
                     cache: ChecksumCache | None = None) -> list[str]:
    """What is wrong with the adapter in folder against its manifest ([] when nothing is)."""
    cache = cache or ChecksumCache(None)
    problems, signature = _file_problems(folder, manifest, full, cache)
    if problems:
        return problems
    verdict_key = f"passed:{folder}"
    if signature and cache.entries.get(verdict_key) == signature:
        return []  # these very file versions passed the checks below before
    problems = _content_problems(folder, manifest)
    if not problems and signature:
        cache.entries[verdict_key] = signature
        cache.changed = True
    return problems


def _content_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    tensors, problem = read_safetensors_checked(folder / ADAPTER_WEIGHTS)
    if problem:
        return [problem]
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{ADAPTER_CONFIG} is not readable JSON ({type(err).__name__})"]
    if not isinstance(config, dict):
        return [f"{ADAPTER_CONFIG} is not a JSON object"]
    return _config_problems(config, manifest) or _shape_problems(config, tensors)


def _file_problems(folder: Path, manifest: dict[str, Any], full: bool,
                   cache: ChecksumCache) -> tuple[list[str], list[Any]]:
    """Problems with the files the manifest lists, and their signature (name, mtime, size for each)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return [], []  # manifests written before files were recorded: nothing to compare with
    problems = []
    base = str(folder)
    try:
        stat = os.lstat(os.path.join(base, "lqmf.json"))
        signature: list[Any] = [["lqmf.json", stat.st_mtime_ns, stat.st_size]]
    except OSError:
        signature = []
    for rel, record in sorted(recorded.items()):
        if not isinstance(record, dict) or rel.startswith("/") or ".." in rel.split("/"):
            problems.append(f"lqmf.json lists '{rel}' oddly")
            continue
        path = os.path.join(base, rel)
        try:
            stat = os.lstat(path)
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        size = stat.st_size
        signature.append([rel, stat.st_mtime_ns, size])
        if record.get("size") is not None and size != record["size"]:
            problems.append(f"{rel} has {size} bytes, the manifest recorded {record['size']}")
            continue
        try:
            digest = cache.digest(path, compute=full) if record.get("sha256") else None
        except FileNotFoundError:  # gone since its lstat: a concurrent rename or remove
            problems.append(f"{rel} is missing")
            continue
        if digest is not None and digest != record["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest's")
    return problems, signature


def _config_problems(config: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return [f"{ADAPTER_CONFIG}: r is {rank!r}, not a positive integer"]
    lora = manifest.get("lora") if isinstance(manifest.get("lora"), dict) else {}
    problems = []
    for key, ours in (("r", "r"), ("lora_alpha", "alpha")):
        if lora.get(ours) is not None and config.get(key) != lora[ours]:
            problems.append(f"{ADAPTER_CONFIG}: {key} is {config.get(key)!r}, the manifest recorded {lora[ours]!r}")
    targets, recorded = config.get("target_modules"), lora.get("target_modules")
    if isinstance(targets, list) and isinstance(recorded, list) and sorted(targets) != sorted(recorded):
        problems.append(f"{ADAPTER_CONFIG}: target_modules {sorted(targets)} differ from the manifest's "
                        f"{sorted(recorded)}")
    return problems


def _shape_problems(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> list[str]:
    rank = config["r"]
    ranks = {rank, *(v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int))}
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        problem = target_pattern_problem(targets)  # never match a pattern that could backtrack for ever
        if problem is not None:
            return [f"{ADAPTER_CONFIG}: {problem}"]
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (_, shape) in tensors.items():
        match = LORA_KEY.match(key)
        if match and len(shape) == 2:
            pairs.setdefault(match["module"], {})[match["which"]] = shape
    if not pairs:
        return [f"{ADAPTER_WEIGHTS} holds no LoRA matrices"]
    for module, shapes in sorted(pairs.items()):
        a, b = shapes.get("A"), shapes.get("B")
        if a is None or b is None:
            return [f"{ADAPTER_WEIGHTS}: {module} has lora_{'A' if a is None else 'B'} missing"]
        if a[0] != b[1] or a[0] not in ranks:
            return [f"{ADAPTER_WEIGHTS}: {module} has rank {a[0]} (lora_A {list(a)}, lora_B {list(b)}); "
                    f"{ADAPTER_CONFIG} says r={rank}"]
        if isinstance(targets, list) and not any(module == t or module.endswith("." + t) for t in targets):
            return [f"{ADAPTER_WEIGHTS}: {module} is not among {ADAPTER_CONFIG}'s target_modules"]
        if isinstance(targets, str) and targets != "all-linear" and not re.search(targets, module):
            return [f"{ADAPTER_WEIGHTS}: {module} does not match {ADAPTER_CONFIG}'s target_modules"]
    return []


def ensure_intact(name: str, folder: Path, manifest: dict[str, Any], cache: ChecksumCache | None = None) -> None:
    """Refuse (InputError, one line) to load an adapter that fails the full check."""
    cache = cache or ChecksumCache(None)
    problems = adapter_problems(folder, manifest, full=True, cache=cache)
    cache.save()
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InputError(f"adapter '{name}' is corrupt: {problems[0]}{more}; `lqmf adapters verify {name}` "
                         "lists what differs (retrain it, or restore its folder)")
