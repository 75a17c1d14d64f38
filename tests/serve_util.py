"""Starting a real `lqmf serve` process on loopback for tests, and always stopping it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import lqmf_env

START_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    info: dict[str, Any]
    workspace: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _ready_info(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextmanager
def running_server(workspace: Path, *args: str, api_key: str | None = None) -> Iterator[ServerProcess]:
    """`lqmf serve --port 0 --json ARGS` in workspace, yielded once it answers; terminated on exit."""
    # One intra-op thread: the server shares a small CPU with the test process, and two torch
    # thread pools spinning against each other stall every matrix product for a time slice.
    env = lqmf_env({"OMP_NUM_THREADS": "1", **({"LQMF_API_KEY": api_key} if api_key else {})})
    if not api_key:
        env.pop("LQMF_API_KEY", None)
    out, log = workspace / "serve.out", workspace / "serve.log"
    command = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "serve", "--host", "127.0.0.1",
               "--port", "0", "--json", "--log-level", "warning", *args]
    with open(out, "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info = None
        while info is None:
            if proc.poll() is not None:
                raise AssertionError(f"lqmf serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"lqmf serve was not ready in {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.2)
            info = _ready_info(out)
        yield ServerProcess(proc, info["url"], info, workspace, log)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it does not end in time; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def wait_for_answers(results: list, errors: list, count: int, pause: threading.Event, timeout: float = 60) -> None:
    """Wait until `count` answers have come back from the asking threads (or one of them failed)."""
    deadline = time.monotonic() + timeout
    while len(results) < count and not errors:
        assert time.monotonic() < deadline, "requests stopped coming back"
        pause.wait(0.05)


def stop_asking(stop_event: threading.Event, threads: list[threading.Thread]) -> None:
    stop_event.set()
    for thread in threads:
        thread.join(timeout=120)
