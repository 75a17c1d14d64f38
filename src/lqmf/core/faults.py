"""Named danger points, where a kill must leave the workspace consistent, and a test-only hook.

TEST ONLY: with LQMF_FAULT_AT=POINT[#N][:SIGNAL] in the environment, the process sends SIGNAL
(default SIGKILL) to itself the N-th time (default the first) it reaches POINT. The fault-injection
suite (tests/fault/) uses it to kill `lqmf` at each file-system step that matters; in normal use
the variable is unset and fault_point() returns at once.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LQMF_FAULT_AT"

# Every point the code registers, with what has happened on disk when it is reached.
POINTS = {
    "checkpoint.written": "a new checkpoint is complete in staging/checkpoint.tmp, the old one still in place",
    "checkpoint.moved_aside": "the old checkpoint was renamed to checkpoint.old, the new one not yet in place",
    "checkpoint.replaced": "the new checkpoint is in place, checkpoint.old not yet removed",
    "train.final_checkpoint": "the last step's checkpoint is saved, the adapter files not yet written",
    "train.adapter_saved": "the adapter files are in staging, no manifest yet",
    "finalize.manifest_written": "lqmf.json is in staging, staging not yet renamed into place",
    "finalize.old_trashed": "with --force: the old adapter moved to trash, staging not yet renamed",
    "finalize.renamed": "the adapter is in place, its training checkpoint not yet removed",
    "export.written": "the export is complete in its temporary folder, not yet renamed into place",
    "export.old_moved_aside": "with --force: the previous export renamed aside, the new one not yet in place",
    "remove.trashed": "the adapter was moved to trash, the trash not yet emptied",
    "rename.moved": "the adapter folder has its new name, its manifest still the old name",
    "learn.trained": "a learned version is trained in staging, not yet evaluated nor registered",
    "learn.before_finalize": "a learned version passed the gate, its staging not yet renamed into place",
}

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: signal this process here when LQMF_FAULT_AT names this point (see the module doc)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, signal_name = spec.partition(":")
    point, _, nth = target.partition("#")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))
