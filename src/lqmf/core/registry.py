"""The adapter registry: what the folders under adapters/ say.

An adapter is complete when its folder holds PEFT's adapter_config.json and
adapter_model.safetensors and LQMF's manifest lqmf.json (written last, in a staging folder
that is renamed into place only when the run is done). Anything else under adapters/ is
listed as broken (or as training, while a run holds its run lock).

Beside the folders the registry keeps:
  .registry.lock   the lock that every write (finalize, rename, remove, active pointer) holds
  .active.json     the active adapter of each base model, rewritten atomically under that lock
  .locks/NAME.lock held by a training run of NAME while it runs (released by the OS if it dies)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lqmf.core.errors import ConflictError, InputError, LqmfError, NotFoundError, RuntimeFailure, did_you_mean
from lqmf.core.faults import fault_point
from lqmf.core.fsutil import atomic_write_json, file_sha256, fsync_dir
from lqmf.core.integrity import ChecksumCache, adapter_problems, ensure_intact
from lqmf.core.names import slug, validate_name
from lqmf.core.workspace import Workspace

if TYPE_CHECKING:  # imported where used: `adapters list` and `status` resolve no model
    from lqmf.core.models import ResolvedModel

MANIFEST = "lqmf.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
STAGING_PREFIX = ".staging-"
STAGING_NOTE = ".lqmf-staging.json"  # in a staging folder not written by training: {"operation": "combine"...}
TRASH_PREFIX = ".trash-"
LOCK_FILE = ".registry.lock"
ACTIVE_FILE = ".active.json"
RUN_LOCKS_DIR = ".locks"
ACTIVE_FORMAT = 1
LOCK_TIMEOUT_S = 60.0
REMOVE_WAIT_S = 1.0  # how long remove waits on a run lock before calling the run live

OK, BROKEN, TRAINING, CORRUPT = "ok", "broken", "training", "corrupt"
SUSPECT = "suspect"  # intact files, but a recorded metric is NaN or infinite
SUMMARY_FIELDS = ("base_model", "base_id", "task", "rank", "target_modules", "quantized_4bit", "size_bytes",
                  "created", "metric", "improved")
# The metric that `adapters list` shows, by task: the first one the manifest has.
KEY_METRICS = {
    "classification": ("eval_accuracy", "eval_macro_f1", "eval_loss", "train_loss"),
    "default": ("eval_loss", "eval_perplexity", "train_loss"),
}


def base_id(base: dict[str, Any]) -> str:
    """A stable key for the base model an adapter was trained on (the active pointer's key).

    Hub and packaged models are keyed by their source (the same on every machine); local
    folders by their resolved path.
    """
    source = str(base.get("source") or base.get("reference") or "?")
    kind = base.get("kind")
    if kind is None:  # manifests written before `kind` was recorded
        kind = "package" if source.startswith("package:") else ("local" if base.get("path") else "hub")
    if kind in ("hub", "package") or not base.get("path"):
        return source
    return str(base["path"])


@dataclass
class AdapterEntry:
    name: str
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None = None  # why it is broken; None when complete
    training: bool = False  # an unfinished run whose process still holds its run lock

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def state(self) -> str:
        return OK if self.complete else TRAINING if self.training else BROKEN

    @property
    def base_model(self) -> dict[str, Any]:
        base = (self.manifest or {}).get("base_model")
        return base if isinstance(base, dict) else {}

    @property
    def base_id(self) -> str | None:
        return base_id(self.base_model) if self.base_model else None

    @property
    def lora(self) -> dict[str, Any]:
        """The manifest's LoRA settings (r, alpha, dropout, target_modules); {} where it has none."""
        lora = (self.manifest or {}).get("lora")
        return lora if isinstance(lora, dict) else {}


_ENCODE = json.JSONEncoder(default=str).encode
LISTED_APART = ("name", "state", "problem", "path", "active")  # a listed row's fields kept apart from its body


@dataclass
class ListedAdapter:
    """One row of `adapters list`: the fields read every time, and the rest as cached JSON text."""

    name: str
    path: str
    state: str
    problem: str | None
    base_id: str | None
    body: str  # the row's other fields, as JSON without the braces
    active: bool

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "problem": self.problem, "path": self.path,
                **json.loads("{" + self.body + "}"), "active": self.active}

    def json_line(self) -> str:
        """The row as one line of JSON, as json.dumps(self.row()) writes it."""
        problem = "null" if self.problem is None else _ENCODE(self.problem)  # the encoder's slow path for
        active = "true" if self.active else "false"  # anything but a string: 0.6 ms per 1,000 rows each
        head = (f'{{"name": {_ENCODE(self.name)}, "state": {_ENCODE(self.state)}, '
                f'"problem": {problem}, "path": {_ENCODE(self.path)}')
        return f'{head}, {self.body}, "active": {active}}}' if self.body else f'{head}, "active": {active}}}'


@dataclass
class VerifyReport:
    name: str
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "ok": self.ok, "problems": self.problems,
                "notes": self.notes}


def mark_staging(staging: Path, operation: str) -> None:
    """Create staging for a folder that `operation` (combine, compress) writes, saying so inside it."""
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_NOTE).write_text(json.dumps({"operation": operation}), encoding="utf-8")


def _staging_operation(folder: Path) -> str | None:
    """The operation that marked a staging folder (mark_staging); None for a training run's."""
    raw = _read_regular_file(os.path.join(str(folder), STAGING_NOTE))
    if raw is None:
        return None
    try:
        operation = json.loads(raw).get("operation")
    except (UnicodeDecodeError, ValueError, AttributeError):
        operation = None
    return operation if operation in ("combine", "compress") else "combine/compress"


def file_inventory(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file in folder except the manifest and the excluded folders."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or rel.split("/")[0] in exclude:
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def contained_file(folder: Path, rel: str) -> Path | None:
    """folder/rel when rel is a plain relative path that stays inside folder, else None."""
    relative = Path(rel)
    if not rel or relative.is_absolute() or ".." in relative.parts:
        return None
    return folder / relative


def _regular_file(path: str | Path) -> bool:
    """True for a regular file that is not a symbolic link (one lstat)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_regular_file(path: str) -> bytes | None:
    """The bytes of a regular file that is not a symbolic link, else None (one open, no extra lstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            return handle.read() if stat.S_ISREG(os.fstat(handle.fileno()).st_mode) else None
    except OSError:
        return None


def nonfinite_metrics(manifest: dict[str, Any]) -> list[str]:
    """The recorded metrics (manifest "metrics") that are NaN or infinite, as 'name is value' lines."""
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    return [f"metric {key} is {value}" for key, value in sorted(metrics.items())
            if isinstance(value, float) and not math.isfinite(value)]


def key_metric(task: str | None, metrics: dict[str, Any]) -> dict[str, Any] | None:
    for key in KEY_METRICS.get(task or "", KEY_METRICS["default"]):
        if isinstance(metrics.get(key), (int, float)):
            return {"name": key, "value": metrics[key]}
    return None


class Registry:
    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.root = workspace.adapters_dir

    # ------------------------------------------------------------------ paths and locks

    @contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the registry's write lock (one writer at a time across processes)."""
        from filelock import FileLock, Timeout  # not at import time: read-only verbs start faster

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK_FILE), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise RuntimeFailure(f"the adapter registry stayed locked for {timeout:.0f} s "
                                 f"({self.root / LOCK_FILE}); is another lqmf process stuck?") from None
        try:
            yield
        finally:
            lock.release()

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def staging_path(self, name: str) -> Path:
        return self.root / f"{STAGING_PREFIX}{validate_name(name)}"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def run_lock_path(self, name: str) -> Path:
        return self.root / RUN_LOCKS_DIR / f"{validate_name(name)}.lock"

    @contextmanager
    def training_run(self, name: str, wait: float = 0.0) -> Iterator[None]:
        """Hold NAME's run lock while a training run writes its staging folder.

        The OS drops the lock when the process dies (even on SIGKILL), so an unfinished run whose
        lock is free crashed; one whose lock is held is still training and must not be removed.
        `wait` rides out the instant in which another process probes the lock (is_training).
        """
        from filelock import FileLock, Timeout

        path = self.run_lock_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=wait)
        try:
            lock.acquire()
        except Timeout:
            raise ConflictError(f"a training run of '{name}' is in progress (it holds {path})") from None
        try:
            yield
        finally:
            lock.release()

    def is_training(self, name: str) -> bool:
        """Whether a live process holds NAME's run lock (probes it without waiting)."""
        try:
            path = self.run_lock_path(name)
        except InputError:
            return False  # no training run can have a name training refuses
        if not path.exists():
            return False
        try:
            with self.training_run(name):
                return False
        except ConflictError:
            return True
        except OSError:  # a lock file this user cannot open: someone else's run, finished or not
            return False

    # ------------------------------------------------------------------ reading

    def inspect(self, folder: Path, symlink: bool | None = None) -> AdapterEntry:
        """What one folder under adapters/ holds (string paths and raw reads: `list` runs this 1,000s of times).

        symlink: whether folder is a symbolic link, when the caller already knows (from os.scandir).
        """
        name = folder.name
        if name.startswith(STAGING_PREFIX):
            run = name[len(STAGING_PREFIX):]
            operation = _staging_operation(folder)
            if self.is_training(run):
                doing = "training" if operation is None else f"`lqmf adapters {operation}`"
                return AdapterEntry(run, folder, None, f"{doing} in progress", training=True)
            if operation is not None:
                return AdapterEntry(run, folder, None,
                                    f"left by an interrupted `lqmf adapters {operation}` (nothing to resume: run it "
                                    "again); lqmf adapters remove --broken removes it")
            return AdapterEntry(run, folder, None,
                                f"unfinished training run: lqmf train --resume {run} continues it if it saved a "
                                "checkpoint; lqmf adapters remove --broken removes it")
        if folder.is_symlink() if symlink is None else symlink:
            return AdapterEntry(name, folder, None, "a symbolic link (adapters must be folders in the workspace)")
        try:
            validate_name(name)
        except InputError as err:
            return AdapterEntry(name, folder, None, err.message)
        base = str(folder)
        missing = [f for f in PEFT_FILES if not _regular_file(os.path.join(base, f))]
        raw = _read_regular_file(os.path.join(base, MANIFEST))
        if raw is None:
            missing.append(MANIFEST)
        if missing:
            return AdapterEntry(name, folder, None, f"missing {', '.join(missing)}")
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return AdapterEntry(name, folder, None, f"{MANIFEST} is not valid JSON")
        if not isinstance(manifest, dict):
            return AdapterEntry(name, folder, None, f"{MANIFEST} is not a JSON object")
        return AdapterEntry(name, folder, manifest)

    def entries(self) -> list[AdapterEntry]:
        """Every folder under adapters/, complete, broken or training, sorted by name."""
        return sorted((self.inspect(path, symlink) for path, symlink in self._folders()),
                      key=lambda e: (e.name, e.path.name))

    def _folders(self) -> list[tuple[Path, bool]]:
        """(folder, is a symbolic link) of every entry under adapters/ that may be an adapter or a run."""
        return [(Path(path), symlink) for path, _, symlink in self._folder_names()]

    def _folder_names(self) -> list[tuple[str, str, bool]]:
        """(path, name, is a symbolic link) of every entry under adapters/ that may be an adapter or a run."""
        try:
            with os.scandir(self.root) as listing:
                return [(item.path, item.name, item.is_symlink()) for item in listing
                        if (item.is_dir() or item.is_symlink())
                        and (not item.name.startswith(".") or item.name.startswith(STAGING_PREFIX))]
        except (FileNotFoundError, NotADirectoryError):
            return []

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

    def get_intact(self, name: str) -> AdapterEntry:
        """A complete adapter that passes the full integrity check (sizes, checksums, config vs weights):
        what every path that loads an adapter asks for. Refuses with one line (InputError)."""
        entry = self.get(name)
        self.check_intact(entry)
        return entry

    def check_intact(self, entry: AdapterEntry) -> None:
        """get_intact's check, for an entry already in hand (a folder the server's operator named).

        A folder renamed or removed by another process while it was being checked is not found (exit 3),
        not corrupt."""
        try:
            ensure_intact(entry.name, entry.path, entry.manifest or {}, ChecksumCache(self.workspace.root))
        except (InputError, FileNotFoundError):  # a file listed, then gone when read
            if not entry.path.is_dir():
                raise NotFoundError(f"adapter '{entry.name}' not found in {self.root}: it was renamed or "
                                    "removed while being checked") from None
            raise

    def summary(self, entry: AdapterEntry, active: dict[str, dict[str, Any]] | None = None,
                checksums: ChecksumCache | None = None) -> dict[str, Any]:
        """One adapter as `adapters list --json` reports it; a complete one failing the cheap integrity
        check (sizes, cached checksums, config vs weight shapes) is `corrupt`."""
        active = self.active_pointers(strict=False) if active is None else active
        row: dict[str, Any] = {"name": entry.name, "state": entry.state, "problem": entry.problem,
                               "path": str(entry.path)}
        if not entry.complete:
            return {**row, **dict.fromkeys(SUMMARY_FIELDS), "active": False}
        manifest = entry.manifest or {}
        base = entry.base_model
        lora = entry.lora
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
        runtime = manifest.get("runtime") if isinstance(manifest.get("runtime"), dict) else {}
        key = entry.base_id
        row.update({
            "base_model": base.get("alias") or base.get("reference"),
            "base_id": key,
            "task": manifest.get("task"),
            "rank": lora.get("r"),
            "target_modules": lora.get("target_modules"),
            "quantized_4bit": runtime.get("quantized_4bit"),
            "size_bytes": sum(f.get("size", 0) for f in files.values() if isinstance(f, dict)),
            "created": manifest.get("created"),
            "metric": key_metric(manifest.get("task"), metrics),
            "improved": (manifest.get("learning") or {}).get("improved"),
            "active": key is not None and (active.get(key) or {}).get("adapter") == entry.name,
        })
        cache = checksums or ChecksumCache(self.workspace.root)
        problems = adapter_problems(entry.path, manifest, cache=cache)
        if checksums is None:
            cache.save()
        if problems:
            row.update(state=CORRUPT, problem=problems[0])
        elif bad_metrics := nonfinite_metrics(manifest):
            row.update(state=SUSPECT, problem=f"{bad_metrics[0]}: its weights may be broken; retrain or remove it")
        return row

    def listing(self, active: dict[str, dict[str, Any]] | None = None,
                checksums: ChecksumCache | None = None) -> list[ListedAdapter]:
        """Every folder's summary row (as `adapters list --json` shows them), sorted by name: a complete
        adapter's comes from the listing cache while its files are unchanged (core/listing.py)."""
        from lqmf.core.listing import ListingCache

        active = self.active_pointers(strict=False) if active is None else active
        cache_checksums = checksums or ChecksumCache(self.workspace.root)
        listed = []
        with ListingCache(self.workspace.root, self.root, cache_checksums.entries) as cache:
            for path, name, symlink in self._folder_names():  # strings: Path objects cost 1,000s of parses
                cached = None if symlink or name.startswith(STAGING_PREFIX) else cache.row(path, name)
                if cached is None:
                    folder = Path(path)
                    entry = self.inspect(folder, symlink)
                    row = self.summary(entry, active, cache_checksums)
                    body = _ENCODE({k: v for k, v in row.items() if k not in LISTED_APART})[1:-1]
                    cached = (row["state"], row["problem"], row["base_id"], body)
                    if entry.complete:
                        files = [MANIFEST, *PEFT_FILES, *((entry.manifest or {}).get("files") or {})]
                        cache.put(folder, list(dict.fromkeys(f for f in files if isinstance(f, str))), cached)
                    name = row["name"]  # a run's name, without the staging prefix
                state, problem, key, body = cached
                listed.append(ListedAdapter(name, path, state, problem, key, body,
                                            key is not None and (active.get(key) or {}).get("adapter") == name))
        if checksums is None:
            cache_checksums.save()
        cache.save()
        return sorted(listed, key=attrgetter("name", "path"))  # paths differ only by their folder names

    # ------------------------------------------------------------------ writing

    def finalize(self, name: str, staging: Path, manifest: dict[str, Any], force: bool = False,
                 scratch: tuple[str, ...] = ()) -> Path:
        """Write the manifest into staging, then rename staging into place (atomically, under the lock).

        scratch: folders in staging that are not part of the adapter (a training checkpoint): left out
        of the manifest, and removed only once the adapter is in place, so that a kill at any instant
        leaves either the finished adapter or the run that can still be resumed.
        """
        manifest = {**manifest, "files": file_inventory(staging, exclude=(*scratch, STAGING_NOTE))}
        atomic_write_json(staging / MANIFEST, manifest)
        fault_point("finalize.manifest_written")
        (staging / STAGING_NOTE).unlink(missing_ok=True)  # until here a kill leaves a folder that says what it is
        target = self.path(name)
        with self.lock():
            trash = None
            if target.exists():
                if not force:
                    raise ConflictError(f"adapter '{name}' already exists; use --force to replace it")
                trash = self._to_trash(target, name)
                fault_point("finalize.old_trashed")
            staging.rename(target)
            fsync_dir(self.root)
        fault_point("finalize.renamed")
        for folder in scratch:
            shutil.rmtree(target / folder, ignore_errors=True)
        if trash is not None:
            self._empty_trash(trash)
        return target

    def _to_trash(self, folder: Path, name: str) -> Path:
        trash = self.root / f"{TRASH_PREFIX}{slug(name)}-{time.time_ns()}"
        folder.rename(trash)
        return trash

    @staticmethod
    def _empty_trash(trash: Path) -> None:
        if trash.is_symlink():
            trash.unlink()
        else:
            shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> Path:
        """Rename a complete adapter; the active pointers that named it follow it."""
        source, target = self.path(old), self.path(new)
        if old == new:
            raise InputError(f"adapter '{old}' already has that name")
        with self.lock():
            entry = self.get(old)
            if target.exists() or target.is_symlink():
                raise ConflictError(f"adapter '{new}' already exists; remove it first or pick another name")
            if self.staging_path(new).exists():
                raise ConflictError(f"an unfinished training run named '{new}' exists in {self.root}")
            source.rename(target)
            fsync_dir(self.root)
            fault_point("rename.moved")
            atomic_write_json(target / MANIFEST, {**(entry.manifest or {}), "name": new})
            pointers = self.active_pointers(strict=False)
            moved = {k: {**v, "adapter": new} for k, v in pointers.items() if v["adapter"] == old}
            if moved:
                self._write_pointers({**pointers, **moved})
        return target

    def _run_guard(self, name: str):
        """The run lock of NAME, or nothing for a folder whose name no training run could have."""
        try:
            validate_name(name)
        except InputError:
            return nullcontext()
        return self.training_run(name, wait=REMOVE_WAIT_S)

    def _removal_target(self, name: str) -> Path | None:
        """The one folder that `remove NAME` removes: adapters/NAME, or else NAME's unfinished run.

        When both exist (a failed --force re-run beside the good adapter) the name is ambiguous and
        nothing is removed. A folder with a name that training would refuse (spaces, say) can still
        be removed, but never anything outside adapters/ or hidden in it.
        """
        if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name:
            validate_name(name)  # raises the precise reason
        folder = self.root / name
        if not (folder.exists() or folder.is_symlink()):
            validate_name(name)
        try:
            staging = self.staging_path(name)
        except InputError:
            staging = None
        present = [p for p in (folder, staging) if p is not None and (p.exists() or p.is_symlink())]
        if len(present) == 2:
            raise ConflictError(f"adapter '{name}' and an unfinished run of it ({staging.name}) both exist; "
                                "`lqmf adapters remove --broken` removes the unfinished run and keeps the "
                                "adapter; run this again afterwards to remove the adapter")
        return present[0] if present else None

    def remove(self, name: str) -> list[str]:
        """Remove adapter NAME (or, when there is none, NAME's unfinished run); returns the folder removed.

        Refuses (ConflictError) while a training run of NAME is in progress, and when both exist.
        Of several processes removing one adapter at once, one removes it; the others get NotFoundError.
        """
        def missing() -> NotFoundError:
            names = sorted({e.name for e in self.entries()})
            return NotFoundError(f"adapter '{name}' not found in {self.root}{did_you_mean(name, names)}")

        if self._removal_target(name) is None:
            raise missing()
        with self.lock(), self._run_guard(name):
            folder = self._removal_target(name)
            if folder is None:  # another process removed it meanwhile
                raise missing()
            pointers = self.active_pointers(strict=False)  # first: a kill after this leaves the adapter, inactive
            kept = {k: v for k, v in pointers.items() if v["adapter"] != name}
            if kept != pointers:
                self._write_pointers(kept)
            trash = self._to_trash(folder, name)
            fsync_dir(self.root)
            fault_point("remove.trashed")
        self._empty_trash(trash)
        return [folder.name]

    def remove_broken(self) -> list[str]:
        """Remove every broken folder (crashed runs, incomplete folders) and leftover trash.

        Runs still training are left alone.
        """
        removed = []
        for entry in self.entries():
            if entry.state != BROKEN:
                continue
            try:
                with self.lock(), self._run_guard(entry.name):
                    if not entry.path.exists() and not entry.path.is_symlink():
                        continue  # removed meanwhile by another process
                    trash = self._to_trash(entry.path, entry.name)
                    fsync_dir(self.root)
            except ConflictError:
                continue  # it started training again meanwhile
            self._empty_trash(trash)
            removed.append(entry.path.name)
        if self.root.is_dir():
            for leftover in self.root.glob(f"{TRASH_PREFIX}*"):
                self._empty_trash(leftover)
        return removed

    # ------------------------------------------------------------------ active adapters

    def active_pointers(self, strict: bool = True) -> dict[str, dict[str, Any]]:
        """{base id: {adapter, base_model, since}}: the active adapter of each base model.

        With strict=False an unreadable pointer file counts as empty instead of failing.
        """
        path = self.root / ACTIVE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        active = data.get("active") if isinstance(data, dict) else None
        if not isinstance(active, dict):
            if not strict:
                return {}
            raise InputError(f"{path} is not a valid active-adapter file; "
                             "`lqmf adapters unload --all` resets it")
        return {k: v for k, v in active.items() if isinstance(v, dict) and isinstance(v.get("adapter"), str)}

    def _write_pointers(self, pointers: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.root / ACTIVE_FILE, {"lqmf_active": ACTIVE_FORMAT, "active": pointers})

    def activate(self, name: str) -> dict[str, Any]:
        """Make NAME the active adapter of its base model; returns {base_id, base_model, adapter, previous}."""
        with self.lock():
            entry = self.get(name)
            key = entry.base_id
            if key is None:
                raise InputError(f"{entry.path / MANIFEST} names no base_model")
            pointers = self.active_pointers(strict=False)
            previous = (pointers.get(key) or {}).get("adapter")
            base = entry.base_model
            pointers[key] = {"adapter": name, "base_model": base.get("alias") or base.get("reference"),
                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._write_pointers(pointers)
        return {"base_id": key, "base_model": pointers[key]["base_model"], "adapter": name,
                "previous": previous if previous != name else None}

    def deactivate(self, base: str | None = None, everything: bool = False) -> list[dict[str, Any]]:
        """Clear the active adapter of one base model (or of all); returns what was cleared.

        Without base, the single active adapter is cleared; several active ones need a base or everything.
        """
        with self.lock():
            if everything:
                pointers = self.active_pointers(strict=False)
                self._write_pointers({})
                return [{"base_id": k, **v} for k, v in pointers.items()]
            pointers = self.active_pointers()
            if base is None:
                keys = list(pointers)
                if len(keys) > 1:
                    listing = ", ".join(f"{v['adapter']} on {v.get('base_model') or k}" for k, v in pointers.items())
                    raise InputError(f"{len(keys)} adapters are active ({listing}); pass --base MODEL or --all")
            else:
                matches = self.base_selector(base)
                keys = [k for k in pointers if matches(k, pointers[k].get("base_model"))]
            if not keys:
                return []
            cleared = [{"base_id": k, **pointers[k]} for k in keys]
            self._write_pointers({k: v for k, v in pointers.items() if k not in keys})
        return cleared

    def base_selector(self, reference: str) -> Callable[..., bool]:
        """A test for "is base id `key` (known by `names`) the model the user calls reference?".

        The reference (alias, folder, hub id) is resolved once, so filtering many entries stays fast.
        """
        resolved = self.resolve_base_id(reference)

        def matches(key: str | None, *names: str | None) -> bool:
            return key is not None and (key == reference or key == resolved or reference in names)

        return matches

    def resolve_base_id(self, reference: str) -> str | None:
        from lqmf.core.models import ModelCatalogue

        try:
            resolved = ModelCatalogue(self.workspace).resolve(reference)
        except LqmfError:
            return None
        return base_id({"kind": resolved.kind, "source": resolved.source,
                        "path": str(resolved.path) if resolved.path else None})

    # ------------------------------------------------------------------ verification

    def resolve_base(self, entry: AdapterEntry) -> ResolvedModel:
        """The adapter's base model: the folder it was trained on if it is still there, else its reference."""
        from lqmf.core.models import ModelCatalogue

        catalogue = ModelCatalogue(self.workspace)
        recorded = entry.base_model.get("path")
        if recorded and (Path(recorded) / "config.json").is_file():
            return catalogue.resolve(str(recorded))
        reference = str(entry.base_model.get("reference") or "")
        try:
            resolved = catalogue.resolve(reference) if reference else None
        except LqmfError:
            resolved = None
        if resolved is not None and (resolved.available or resolved.kind == "hub"):
            return resolved
        raise NotFoundError(f"base model '{reference or '?'}' of adapter '{entry.name}' is not available "
                            "on this machine")

    def verify(self, entry: AdapterEntry) -> VerifyReport:
        """Check the files against the manifest's checksums and the LoRA modules against the base model."""
        leftover = entry.path.name.startswith(STAGING_PREFIX)  # named by its folder: NAME may be intact beside it
        report = VerifyReport(entry.path.name if leftover else entry.name, entry.path)
        if not entry.complete:
            report.problems.append(entry.problem or "incomplete")
            return report
        self._verify_files(entry, report)
        self._verify_base(entry, report)
        report.problems += [f"{line} in {MANIFEST}: its weights may be broken"
                            for line in nonfinite_metrics(entry.manifest or {})]
        return report

    @staticmethod
    def _verify_files(entry: AdapterEntry, report: VerifyReport) -> None:
        recorded = (entry.manifest or {}).get("files")
        if not isinstance(recorded, dict) or not recorded:
            report.problems.append(f"{MANIFEST} records no file checksums")
            return
        for rel, record in sorted(recorded.items()):
            path = contained_file(entry.path, rel)
            if path is None:
                report.problems.append(f"{MANIFEST} lists '{rel}', a path outside the adapter folder")
                continue
            if not _regular_file(path):
                report.problems.append(f"{rel}: missing" if not path.is_symlink() else f"{rel}: a symbolic link")
                continue
            size = path.stat().st_size
            if isinstance(record, dict) and record.get("size") not in (None, size):
                report.problems.append(f"{rel}: {size} bytes, the manifest recorded {record['size']}")
            elif isinstance(record, dict) and record.get("sha256") != file_sha256(path):
                report.problems.append(f"{rel}: sha256 differs from the manifest's")
        extra = sorted(p.relative_to(entry.path).as_posix() for p in entry.path.rglob("*")
                       if p.is_file() and p.relative_to(entry.path).as_posix() not in recorded and p.name != MANIFEST)
        if extra:
            report.notes.append(f"files not in the manifest: {', '.join(extra)}")

    def _verify_base(self, entry: AdapterEntry, report: VerifyReport) -> None:
        from lqmf.core import weights

        reference = entry.base_model.get("reference") or "?"
        try:
            resolved = self.resolve_base(entry)
        except LqmfError:
            resolved = None
        if resolved is None or not resolved.available or resolved.path is None:
            report.notes.append(f"base model '{reference}' is not available locally; target modules not checked")
            return
        folder = resolved.path
        try:
            config = json.loads((entry.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            base_tensors = weights.checkpoint_tensors(folder)
            adapter_tensors = weights.read_safetensors_header(entry.path / ADAPTER_WEIGHTS)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            report.problems.append(f"cannot read {ADAPTER_CONFIG}: {type(err).__name__}")
            return
        except InputError as err:
            report.problems.append(err.message)
            return
        if base_tensors is None:
            report.notes.append(f"{folder} has no safetensors weights; target modules not checked")
            return
        modules = weights.module_weights(base_tensors)
        report.problems += weights.check_target_modules(config.get("target_modules"), modules)
        report.problems += weights.check_lora_weights(adapter_tensors, modules, bool(config.get("fan_in_fan_out")))
