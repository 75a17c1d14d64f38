"""The rows `adapters list` and `status` show, kept in WORKSPACE/.lqmf/listing.json between runs.

With 1,000 adapters, reading every manifest and weights header on each `adapters list` costs more than
starting Python. A cached row is reused while its files are unchanged: the manifest, the PEFT files
and every file the manifest lists keep their size and mtime, and the checksum cache says the same of
them (so a digest computed since, by `adapters verify`, is taken into account). Anything else, or a
row that is not a complete adapter (broken, training), is computed afresh. A lost update between two
processes only costs a recomputation.

The file is read on every listing, so it is laid out to decode fast: a list per row rather than an
object, and no spaces (about half the size and the decoding time of indented objects with 1,000 rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lqmf.core.fsutil import atomic_write_text

LISTING_CACHE = Path(".lqmf") / "listing.json"
VERSION = 3

# What a row holds besides its files: (state, problem, base id, body: the rest of the row as JSON text).
Row = tuple[str, str | None, str | None, str]


class ListingCache:
    """{"version": 3, "rows": {adapter folder name: [state, problem, base id, body, files]}}, files being
    [[file, size, mtime_ns, cached digest entry], ...]. Use it in a `with` block: inside, the files'
    `stat` calls are made relative to the adapters folder (about a fifth cheaper than from the root)."""

    def __init__(self, workspace_root: Path, adapters_root: Path, checksums: dict[str, Any]):
        self.path = workspace_root / LISTING_CACHE
        self.adapters_root = adapters_root
        self.checksums = checksums
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = {}
        ok = isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("rows"), dict)
        self.rows: dict[str, Any] = data["rows"] if ok else {}
        self.kept: dict[str, Any] = {}
        self.changed = False
        self.folders_fd: int | None = None

    def __enter__(self) -> ListingCache:
        if os.stat in os.supports_dir_fd:
            try:
                self.folders_fd = os.open(self.adapters_root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                pass  # no adapters folder (nothing to list) or unreadable: stat by full path
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folders_fd is not None:
            os.close(self.folders_fd)
            self.folders_fd = None

    def row(self, folder: str, name: str) -> Row | None:
        """The cached row of folder (its path, and its name under the adapters folder) when none of its
        files changed since, else None."""
        try:
            state, problem, base_id, body, files = self.rows[name]
            if not (isinstance(state, str) and isinstance(body, str) and isinstance(files, list)):
                return None
            prefix = folder + os.sep
            where, fd = (name + os.sep, self.folders_fd) if self.folders_fd is not None else (prefix, None)
            for file, size, mtime, digest in files:
                stat = os.stat(where + file, dir_fd=fd)
                if stat.st_size != size or stat.st_mtime_ns != mtime or self.checksums.get(prefix + file) != digest:
                    return None
        except (KeyError, OSError, TypeError, ValueError):
            return None
        self.kept[name] = self.rows[name]
        return state, problem, base_id, body

    def put(self, folder: Path, files: list[str], row: Row) -> None:
        """Remember folder's row with the state of files (names inside folder), taken now."""
        base, signature = str(folder), []
        for name in files:
            path = os.path.join(base, name)
            try:
                stat = os.stat(path)
            except OSError:
                return
            signature.append([name, stat.st_size, stat.st_mtime_ns, self.checksums.get(path)])
        self.kept[folder.name] = [*row, signature]
        self.changed = True

    def save(self) -> None:
        """Write the rows of this listing (those of removed adapters drop out)."""
        if not (self.changed or len(self.kept) != len(self.rows)) or not self.path.parent.parent.is_dir():
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
            text = json.dumps({"version": VERSION, "rows": self.kept}, separators=(",", ":"), default=str)
            atomic_write_text(self.path, text + "\n")
        except OSError:
            pass  # a read-only workspace: computed again next time
