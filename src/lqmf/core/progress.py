"""Phases of a slow start (importing, resolving, loading the base, loading an adapter), as they begin.

The engine (and core) call `phase("loading base model ...")` where a phase starts; a front end
installs a sink with `reporting(sink)` to show them (the CLI prints them on stderr with the
seconds elapsed). Without a sink a phase costs nothing. The sink is process-wide, not per thread,
so that phases reported from a server's worker threads reach it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[str, float], None]  # (phase, seconds since reporting began)

_sink: Sink | None = None
_started = 0.0


def phase(message: str) -> None:
    """Report that a phase starts now."""
    if _sink is not None:
        _sink(message, time.perf_counter() - _started)


@contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Send phases to sink while the body runs (None: keep them quiet)."""
    global _sink, _started
    previous = _sink, _started
    _sink, _started = sink, time.perf_counter()
    try:
        yield
    finally:
        _sink, _started = previous
