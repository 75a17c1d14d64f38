"""Run `lqmf ARGS` in a forked copy of the test process: a real process (signals, exit codes, fds)
without paying for a fresh interpreter and torch import each time."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from lqmf.core.faults import FAULT_ENV


@dataclass
class Run:
    returncode: int  # the exit code, or -N when signal N killed the process
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode < 0

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def assert_clean_error(self, code: int) -> str:
        """Exactly one error line, the expected exit code and no traceback; returns the line."""
        assert self.returncode == code, (self.returncode, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        assert len(self.error_lines) == 1, self.stderr
        return self.error_lines[0]


@dataclass
class Child:
    pid: int
    out_path: Path
    err_path: Path

    status: int | None = None

    def running(self) -> bool:
        if self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = status
        return self.status is None

    def wait(self, timeout: float = 300) -> Run:
        status = self.status if self.status is not None else _wait(self.pid, timeout)[1]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return Run(code, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"))


def run_forked(args: list[str], workspace: Path, fault: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> Run:
    """lqmf ARGS in workspace, in a child forked from this process; fault: LQMF_FAULT_AT's value."""
    return start_forked(args, workspace, fault, env).wait(timeout)


def start_forked(args: list[str], workspace: Path, fault: str | None = None,
                 env: dict[str, str] | None = None) -> Child:
    from lqmf.cli.app import app

    out_path = workspace.parent / f".forked-{os.getpid()}-{id(args)}.out"
    err_path = out_path.with_suffix(".err")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(workspace)
            os.environ.update({"LQMF_HOME": str(workspace), **(env or {})})
            os.environ.pop("LQMF_DEBUG", None)
            if fault:
                os.environ[FAULT_ENV] = fault
            for fd, path in ((1, out_path), (2, err_path)):
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
                os.close(target)
            # pytest's capture replaced sys.stdout/err: point them at the real descriptors again
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                app(args=[str(a) for a in args], prog_name="lqmf")
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return Child(pid, out_path, err_path)


def _wait(pid: int, timeout: float) -> tuple[int, int]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return done, status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)
        time.sleep(0.02)
