"""Continuous learning's records: the completions a server recorded, the feedback on them, and the
versions of an adapter learned from it (no torch).

Layout in the workspace (owner-only, append-only JSONL, one fsync per line):
  learning/completions.jsonl   {"id", "adapter", "task", "kind", "prompt", "answer", "labels"?, "time"}
  learning/feedback.jsonl      {"id", "adapter", "rating"?, "correction"?, "time"}: the last line for an id wins

A learned version is an ordinary adapter whose manifest carries
  "lineage": {"operation": "learn", "family": ROOT, "version": N, "parent": NAME, "feedback": [ids], ...}
so the registry, `adapters list/show`, serving and export treat it as any other adapter.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError, NotFoundError
from lqmf.core.fsutil import atomic_write_text
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace

LEARNING_DIR = "learning"
COMPLETIONS_FILE = "completions.jsonl"
FEEDBACK_FILE = "feedback.jsonl"
RATINGS = ("up", "down")
VERSION_SUFFIX = re.compile(r"-v(\d+)$")


def learning_dir(workspace: Workspace) -> Path:
    return workspace.root / LEARNING_DIR


class RecordLog:
    """An append-only JSONL file readable only by its owner: each append is on disk (fsync) before it
    returns, so a record acknowledged to a client survives a kill; a line cut short by a kill is skipped
    on reading and never swallows the next one."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # close a line a kill cut short
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a kill cut short
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records.append(record)
        return records


def completions_log(workspace: Workspace) -> RecordLog:
    return RecordLog(learning_dir(workspace) / COMPLETIONS_FILE)


def feedback_log(workspace: Workspace) -> RecordLog:
    return RecordLog(learning_dir(workspace) / FEEDBACK_FILE)


def completion_record(ident: str, adapter: str | None, task: str, kind: str, prompt: Any, answer: str,
                      labels: list[str] | None = None) -> dict[str, Any]:
    """What `lqmf serve --record` keeps of one answer. kind: chat | completion | classify."""
    record = {"id": ident, "adapter": adapter, "task": task, "kind": kind, "prompt": prompt, "answer": answer,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if labels:
        record["labels"] = labels
    return record


def check_feedback(item: Any, records: dict[str, dict[str, Any]], where: str = "feedback") -> dict[str, Any]:
    """One feedback item checked against the recorded completions; the line to append.

    An unknown id, a rating other than up/down, or a correction of the wrong type (a label the adapter
    does not have, or an empty text) is an InputError/NotFoundError naming what is wrong.
    """
    if not isinstance(item, dict):
        raise InputError(f"{where}: must be an object with 'id' and 'rating' and/or 'correction'")
    unknown = sorted(set(item) - {"id", "rating", "correction"})
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}' (expected id, rating, correction)")
    ident, rating, correction = item.get("id"), item.get("rating"), item.get("correction")
    if not isinstance(ident, str) or not ident:
        raise InputError(f"{where}: 'id' must be the id of a recorded completion (the response's id)")
    record = records.get(ident)
    if record is None:
        raise NotFoundError(f"{where}: no recorded completion has id '{ident}' (only a server started with "
                            "`lqmf serve --record` keeps them)")
    if rating is not None and rating not in RATINGS:
        raise InputError(f"{where}: rating must be 'up' or 'down', got {rating!r}")
    if rating is None and correction is None:
        raise InputError(f"{where}: give a rating ('up' or 'down') or a correction")
    if correction is not None:
        labels = record.get("labels")
        if record.get("task") == "classification":
            if not isinstance(correction, str) or correction not in (labels or []):
                raise InputError(f"{where}: the correction of a classification answer must be one of the adapter's "
                                 f"labels ({', '.join(labels or [])}), got {correction!r}")
        elif not isinstance(correction, str) or not correction.strip():
            raise InputError(f"{where}: the correction must be a non-empty text, got {correction!r}")
    entry = {"id": ident, "adapter": record.get("adapter")}
    if rating is not None:
        entry["rating"] = rating
    if correction is not None:
        entry["correction"] = correction
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return entry


def add_feedback(workspace: Workspace, items: Iterable[Any], source: str = "feedback") -> list[dict[str, Any]]:
    """Check every item first, then append them all: one bad item appends nothing."""
    records = {r["id"]: r for r in completions_log(workspace).read()}
    checked = [check_feedback(item, records, f"{source} item {i}" if source != "feedback" else source)
               for i, item in enumerate(items, 1)]
    log = feedback_log(workspace)
    for entry in checked:
        log.append(entry)
    return checked


def read_feedback_file(path: Path) -> list[Any]:
    """The items of a JSONL file of feedback (one object a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number}: not JSON ({err.msg})") from None
    return items


# ----------------------------------------------------------------------------- families and versions


def family_root(registry: Registry, name: str) -> str:
    """The adapter a learned version descends from (itself when it was not learned)."""
    lineage = (registry.get(name).manifest or {}).get("lineage") or {}
    return lineage.get("family") if lineage.get("operation") == "learn" else name


def family_members(registry: Registry, root: str) -> list[dict[str, Any]]:
    """The root and its learned versions, oldest first: {name, version, parent, feedback, created, metrics}."""
    members = []
    for entry in registry.entries():
        manifest = entry.manifest or {}
        lineage = manifest.get("lineage") or {}
        if entry.name == root or (lineage.get("operation") == "learn" and lineage.get("family") == root):
            members.append({"name": entry.name, "version": lineage.get("version", 1) if entry.name != root else 1,
                            "parent": lineage.get("parent") if entry.name != root else None,
                            "feedback": lineage.get("feedback") or [] if entry.name != root else [],
                            "held_out_feedback": lineage.get("held_out_feedback") or [] if entry.name != root else [],
                            "created": manifest.get("created"), "state": entry.state,
                            "evaluation": lineage.get("evaluation") if entry.name != root else None})
    if not any(m["name"] == root for m in members):
        raise NotFoundError(f"no adapter named '{root}'")
    return sorted(members, key=lambda m: m["version"])


def next_version_name(registry: Registry, root: str, members: list[dict[str, Any]]) -> tuple[str, int]:
    """ROOT-vN after the family's newest version (and any other adapter of that name); a staging folder a
    killed run left is not a version: the next run takes its name, and removes it under the run lock."""
    version = max(m["version"] for m in members) + 1
    while registry.exists(f"{root}-v{version}"):
        version += 1
    return f"{root}-v{version}", version


def current_member(registry: Registry, members: list[dict[str, Any]]) -> str:
    """The family's active version, else its newest."""
    names = {m["name"] for m in members}
    active = [p["adapter"] for p in registry.active_pointers(strict=False).values() if p["adapter"] in names]
    return active[0] if active else members[-1]["name"]


def latest_feedback(workspace: Workspace) -> dict[str, dict[str, Any]]:
    """{completion id: its last feedback}."""
    return {entry["id"]: entry for entry in feedback_log(workspace).read()}


def pending_feedback(workspace: Workspace, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feedback on completions of the family's versions not yet used (trained on, or held out to score)
    by any of them, joined with
    its completion: {id, adapter, task, kind, prompt, answer, rating?, correction?}, oldest first."""
    names = {m["name"] for m in members}
    used = {ident for m in members for ident in (*m["feedback"], *m["held_out_feedback"])}
    records = {r["id"]: r for r in completions_log(workspace).read()}
    joined = []
    for ident, entry in latest_feedback(workspace).items():
        record = records.get(ident)
        if record is None or ident in used or record.get("adapter") not in names:
            continue
        joined.append({**record, **{k: entry[k] for k in ("rating", "correction") if k in entry}})
    return joined


def split_held_out(items: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split of feedback; no held-out part below 5 items."""
    items = list(items)
    if len(items) < 5 or fraction <= 0:
        return items, []
    random.Random(seed).shuffle(items)
    n_held = max(1, round(len(items) * fraction))
    return items[n_held:], items[:n_held]


# ----------------------------------------------------------------------------- listing and export


def feedback_rows(workspace: Workspace, adapter: str | None = None) -> list[dict[str, Any]]:
    """Feedback joined with its completion (for list/show/export), optionally of one adapter's family."""
    records = {r["id"]: r for r in completions_log(workspace).read()}
    names = None
    if adapter is not None:
        registry = Registry(workspace)
        names = {m["name"] for m in family_members(registry, family_root(registry, adapter))}
    rows = []
    for ident, entry in latest_feedback(workspace).items():
        record = records.get(ident) or {}
        if names is not None and entry.get("adapter") not in names:
            continue
        rows.append({**record, **entry})
    return rows


def user_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt of a recorded answer as chat messages."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return [m for m in prompt if isinstance(m, dict)]
    return [{"role": "user", "content": str(prompt)}]


def sft_example(row: dict[str, Any]) -> dict[str, Any]:
    """A correction as a training example in the task's dataset format."""
    if row.get("task") == "classification":
        return {"text": str(row["prompt"]), "label": row["correction"]}
    return {"messages": [*user_messages(row), {"role": "assistant", "content": row["correction"]}]}


def kto_example(row: dict[str, Any]) -> dict[str, Any]:
    """A rating as a TRL KTO row (conversational): prompt, completion, label (True: thumbs up)."""
    return {"prompt": user_messages(row), "completion": [{"role": "assistant", "content": row["answer"]}],
            "label": row["rating"] == "up"}


def export_feedback(workspace: Workspace, folder: Path, adapter: str | None = None) -> dict[str, Any]:
    """Write FOLDER/sft.jsonl (corrections) and FOLDER/kto.jsonl (ratings), TRL's dataset formats."""
    rows = feedback_rows(workspace, adapter)
    sft = [sft_example(r) for r in rows if r.get("correction") is not None and r.get("prompt") is not None]
    kto = [kto_example(r) for r in rows if r.get("rating") and r.get("answer") is not None]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in (("sft", sft), ("kto", kto)):
        paths[name] = folder / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return {"sft": {"path": str(paths["sft"]), "rows": len(sft)}, "kto": {"path": str(paths["kto"]), "rows": len(kto)}}


def purge_feedback(workspace: Workspace, adapter: str | None = None) -> dict[str, int]:
    """Remove the feedback (and, without adapter, the recorded completions too) of an adapter's family
    or of every adapter; rewritten atomically."""
    if adapter is None:
        counts = {"feedback": len(feedback_log(workspace).read()),
                  "completions": len(completions_log(workspace).read())}
        for log in (feedback_log(workspace), completions_log(workspace)):
            log.path.unlink(missing_ok=True)
        return counts
    registry = Registry(workspace)
    names = {m["name"] for m in family_members(registry, family_root(registry, adapter))}
    counts = {}
    for key, log in (("feedback", feedback_log(workspace)), ("completions", completions_log(workspace))):
        kept = [r for r in log.read() if r.get("adapter") not in names]
        counts[key] = len(log.read()) - len(kept)
        if log.path.exists():
            atomic_write_text(log.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), 0o600)
    return counts
