"""Several processes, one per GPU: the launcher and what the ranks exchange.

The launcher starts `torch.distributed.run` (the launcher `accelerate launch` wraps) in a session of
its own, one process per GPU, each running `python -m ENTRY FILE` (the caller's entry module, which
runs `run.run_launch_request`): the same training service as one process. Under the launcher
accelerate's `PartialState` sets up the process group (NCCL on GPUs, gloo on the CPU) and each rank's device.

Data parallel steps agree before they communicate: every step the ranks sum one small status
vector (out of memory, failed, stop asked), so an out-of-memory error, an exception or a Ctrl-C on
any rank turns into the same decision on all of them, never a rank waiting forever in an
all-reduce that its peer will not join. Then the LoRA gradients are summed in one flat all-reduce.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lqmf.core.distributed import Topology
from lqmf.core.errors import RuntimeFailure

CONSOLE_ENV = "LQMF_CONSOLE"  # /proc paths of the launcher's stdout and stderr, for the ranks


class Collective:
    """What one rank needs from the others; every method is a no-op (or the identity) alone."""

    def __init__(self, topology: Topology | None = None, device_type: str = "cuda"):
        self.topology = topology or Topology.from_environment()
        self.state = None
        if self.topology.distributed:
            from accelerate import PartialState

            cpu = device_type != "cuda"
            self.state = PartialState(cpu=cpu, backend="gloo" if cpu else "nccl")
            if not cpu:  # every "cuda" after this (loading, memory figures) means this rank's GPU
                import torch

                torch.cuda.set_device(self.topology.local_rank)

    @property
    def distributed(self) -> bool:
        return self.topology.distributed

    @property
    def is_main(self) -> bool:
        return self.topology.is_main

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def agree(self, *flags: float) -> list[float]:
        """The sums over ranks of a few numbers (each rank's flags or counts)."""
        if not self.distributed:
            return list(flags)
        import torch
        import torch.distributed as dist

        values = torch.tensor(flags, dtype=torch.float64, device=self.state.device)
        dist.all_reduce(values)
        return values.tolist()

    def sum_(self, tensor) -> Any:
        """Sum tensor over ranks, in place."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: list) -> None:
        """Sum the gradients of parameters over ranks in one flat all-reduce."""
        if not self.distributed:
            return
        import torch

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        for parameter, part in zip(parameters, flat.split([g.numel() for g in grads]), strict=True):
            parameter.grad = part.view_as(parameter).to(parameter.dtype)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            self.state.wait_for_everyone()

    def close(self) -> None:
        if self.state is not None:
            self.state.destroy_process_group()


# ----------------------------------------------------------------------------- launching


def use_launcher_console() -> None:
    """In a rank started by launch(): write to the launcher's own stdout and stderr, so the user sees
    rank 0's progress and any rank's error line, and not the process manager's reports."""
    paths = os.environ.get(CONSOLE_ENV)
    if not paths:
        return
    for fd, path in zip((1, 2), paths.split(os.pathsep), strict=True):
        try:
            target = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        sys.stdout.flush() if fd == 1 else sys.stderr.flush()
        os.dup2(target, fd)
        os.close(target)


def _console_paths() -> str | None:
    proc = Path(f"/proc/{os.getpid()}/fd")
    return os.pathsep.join(str(proc / str(fd)) for fd in (1, 2)) if proc.is_dir() else None


def launch(processes: int, request: dict[str, Any], device_type: str, entry_module: str) -> dict[str, Any]:
    """Run the training service in `processes` ranks (each `python -m entry_module REQUEST`) and return
    rank 0's result.

    Ctrl-C or SIGTERM here reaches the ranks once, as a Ctrl-C: they finish the step, checkpoint and
    stop together. Raises the ranks' error (with its exit code) when the run fails.
    """
    with tempfile.TemporaryDirectory(prefix="lqmf-launch-") as folder:
        result_path = Path(folder) / "result.json"
        request_path = Path(folder) / "request.json"
        request_path.write_text(json.dumps({**request, "result_path": str(result_path)}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", entry_module, str(request_path)]
        env = {**os.environ, "LOGLEVEL": os.environ.get("LOGLEVEL", "ERROR")}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        console = _console_paths()
        if console:
            env[CONSOLE_ENV] = console
        if device_type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        proc = subprocess.Popen(command, env=env, start_new_session=True,
                                stdout=subprocess.PIPE if console else None,
                                stderr=subprocess.PIPE if console else None, text=True)
        manager_output = _wait_forwarding_signals(proc)
        if result_path.is_file():
            return _outcome(json.loads(result_path.read_text()))
    detail = manager_output.strip().splitlines()[-1] if manager_output.strip() else f"exit code {proc.returncode}"
    raise RuntimeFailure(f"training failed in one of its {processes} processes (see its error above; "
                         f"the launcher said: {detail})")


def _wait_forwarding_signals(proc: subprocess.Popen) -> str:
    """Wait for the launcher process; each Ctrl-C or SIGTERM here is passed on to it as one Ctrl-C."""
    def forward(signum, frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        output = proc.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return "".join(part or "" for part in output)


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's result, or its error raised here with the same exit code."""
    if result.get("error") is None:
        return result
    from lqmf.core.errors import LqmfError

    raise LqmfError(result["error"], exit_code=result["exit_code"])
