"""The adapter registry: what the folders under adapters/ say.

An adapter is complete when its folder holds PEFT's adapter_config.json and
adapter_model.safetensors and LQMF's manifest lqmf.json (written last, in a staging folder
that is renamed into place only when the run is done). Anything else under adapters/ is
listed as broken. Writes happen under one file lock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from lqmf.core.errors import ConflictError, NotFoundError, did_you_mean
from lqmf.core.fsutil import atomic_write_json, fsync_dir
from lqmf.core.names import validate_name
from lqmf.core.workspace import Workspace

MANIFEST = "lqmf.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_FILE = ".registry.lock"


@dataclass
class AdapterEntry:
    name: str
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None = None  # why it is broken; None when complete

    @property
    def complete(self) -> bool:
        return self.problem is None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file in folder except the manifest."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


class Registry:
    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.root = workspace.adapters_dir

    def lock(self, timeout: float = 60.0) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK_FILE), timeout=timeout)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def staging_path(self, name: str) -> Path:
        return self.root / f"{STAGING_PREFIX}{validate_name(name)}"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def inspect(self, folder: Path) -> AdapterEntry:
        name = folder.name
        if name.startswith(STAGING_PREFIX):
            return AdapterEntry(name[len(STAGING_PREFIX):], folder, None,
                                "unfinished training run (resume with lqmf train --resume, or remove it)")
        missing = [f for f in (*PEFT_FILES, MANIFEST) if not (folder / f).is_file()]
        if missing:
            return AdapterEntry(name, folder, None, f"missing {', '.join(missing)}")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return AdapterEntry(name, folder, None, f"{MANIFEST} is not valid JSON")
        if not isinstance(manifest, dict):
            return AdapterEntry(name, folder, None, f"{MANIFEST} is not a JSON object")
        return AdapterEntry(name, folder, manifest)

    def entries(self) -> list[AdapterEntry]:
        """Every folder under adapters/, complete or broken, sorted by name."""
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir()
                   if p.is_dir() and not p.name.startswith(TRASH_PREFIX)
                   and (not p.name.startswith(".") or p.name.startswith(STAGING_PREFIX))]
        return sorted((self.inspect(p) for p in folders), key=lambda e: e.name)

    def get(self, name: str) -> AdapterEntry:
        """A complete adapter by name, or NotFoundError (suggesting the closest name)."""
        folder = self.path(name)
        if not folder.is_dir():
            names = [e.name for e in self.entries()]
            raise NotFoundError(f"adapter '{name}' not found in {self.root}{did_you_mean(name, names)}")
        entry = self.inspect(folder)
        if not entry.complete:
            raise NotFoundError(f"adapter '{name}' is broken: {entry.problem}")
        return entry

    def finalize(self, name: str, staging: Path, manifest: dict[str, Any], force: bool = False) -> Path:
        """Write the manifest into staging, then rename staging into place (atomically, under the lock)."""
        manifest = {**manifest, "files": file_inventory(staging)}
        atomic_write_json(staging / MANIFEST, manifest)
        target = self.path(name)
        with self.lock():
            trash = None
            if target.exists():
                if not force:
                    raise ConflictError(f"adapter '{name}' already exists; use --force to replace it")
                trash = self.root / f"{TRASH_PREFIX}{name}-{time.time_ns()}"
                target.rename(trash)
            staging.rename(target)
            fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return target
