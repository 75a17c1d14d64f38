"""The rows `adapters list` and `status` show, kept in WORKSPACE/.lqmf/listing.json between runs.

With 1,000 adapters, reading every manifest and weights header on each `adapters list` costs more than
starting Python. A cached row is reused while its files are unchanged: the manifest, the PEFT files
and every file the manifest lists keep their size and mtime, and the checksum cache says the same of
them (so a digest computed since, by `adapters verify`, is taken into account). Anything else, or a
row that is not a complete adapter (broken, training), is computed afresh. A lost update between two
processes only costs a recomputation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lqmf.core.fsutil import atomic_write_json

LISTING_CACHE = Path(".lqmf") / "listing.json"
VERSION = 2


class ListingCache:
    """{adapter folder name: {"files": [[file, size, mtime_ns, cached digest entry]], "state", "problem",
    "base_id", "body": the rest of the row as JSON text}}."""

    def __init__(self, workspace_root: Path, checksums: dict[str, Any]):
        self.path = workspace_root / LISTING_CACHE
        self.checksums = checksums
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = {}
        ok = isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("rows"), dict)
        self.rows: dict[str, Any] = data["rows"] if ok else {}
        self.kept: dict[str, Any] = {}
        self.changed = False

    def row(self, folder: str, name: str) -> dict[str, Any] | None:
        """The cached row of folder (its path and name) when none of its files changed since, else None."""
        cached = self.rows.get(name)
        if not isinstance(cached, dict) or not isinstance(cached.get("files"), list) or not isinstance(
                cached.get("body"), str) or not isinstance(cached.get("state"), str):
            return None
        prefix = folder + os.sep
        for item in cached["files"]:
            try:
                file, size, mtime, digest = item
                path = prefix + file
                stat = os.stat(path)
            except (OSError, TypeError, ValueError):
                return None
            if stat.st_size != size or stat.st_mtime_ns != mtime or self.checksums.get(path) != digest:
                return None
        self.kept[name] = cached
        return cached

    def put(self, folder: Path, files: list[str], row: dict[str, Any]) -> None:
        """Remember folder's row with the state of files (names inside folder), taken now."""
        base, signature = str(folder), []
        for name in files:
            path = os.path.join(base, name)
            try:
                stat = os.stat(path)
            except OSError:
                return
            signature.append([name, stat.st_size, stat.st_mtime_ns, self.checksums.get(path)])
        self.kept[folder.name] = {"files": signature, **row}
        self.changed = True

    def save(self) -> None:
        """Write the rows of this listing (those of removed adapters drop out)."""
        if not (self.changed or len(self.kept) != len(self.rows)) or not self.path.parent.parent.is_dir():
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
            atomic_write_json(self.path, {"version": VERSION, "rows": self.kept})
        except OSError:
            pass  # a read-only workspace: computed again next time
