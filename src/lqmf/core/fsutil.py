"""Crash-safe file writes: temp file + fsync + os.replace; which process owns a temporary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SAME_PROCESS_S = 1.0  # start times further apart than this are two processes given one pid


def process_started(pid: int) -> float | None:
    """The start time of process pid (to tell it from a later process given the same pid), None if gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def owner_tag() -> str:
    """'PIDpSTART' (start time in 1/100 s) naming this process in a temporary's name; see owner_alive."""
    pid = os.getpid()  # not cached: a forked child is another owner
    return f"{pid}p{round((process_started(pid) or 0.0) * 100)}"


def owner_alive(pid: int, started_cs: int) -> bool:
    """Whether the process an owner_tag names still runs (a pid reused by a later process is not it).

    A process this user may not inspect counts as alive: what it may be writing is left alone.
    """
    import psutil

    try:
        now = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return abs(now - started_cs / 100) <= SAME_PROCESS_S


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, mode: int = 0o666) -> None:
    """Write text so that readers see the old file or the new one, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write data so that readers see the old file or the new one; mode is masked by the umask
    (0o666: as any new file; 0o600: owner-only from the first byte)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush every file under folder, and the folders themselves, to disk."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(folder))


def file_sha256(path: Path) -> str:
    import hashlib  # only when hashing: `lqmf adapters list` starts without it (docs/cli.md)

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
