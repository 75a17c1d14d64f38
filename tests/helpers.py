"""Helpers shared by the tests (fixtures stay in conftest.py): paths and environments, a real
`lqmf serve` process, forked CLI runs, tiny training runs, a tiny LoRA model. Tests import helpers
from here only, never from another test module."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from lqmf.core.faults import FAULT_ENV
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace

# --------------------------------------------------------------------------------- Paths, environment and example files


REPO = Path(__file__).resolve().parents[1]

EXAMPLES = REPO / "examples" / "datasets"

def example_corpus() -> list[str]:
    """The sample datasets' text, so the tiny tokenizer splits it into words, not bytes."""
    return [path.read_text(encoding="utf-8") for path in sorted(EXAMPLES.iterdir())]

def lqmf_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(extra or {})}
    env.pop("LQMF_DEBUG", None)
    return env

def copy_example(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copy(EXAMPLES / name, target)
    return target

def copy_adapter(source_workspace: Path, name: str, workspace: Path, as_name: str | None = None) -> Path:
    """Copy a trained adapter folder into another workspace's registry."""
    target = workspace / "adapters" / (as_name or name)
    shutil.copytree(source_workspace / "adapters" / name, target)
    return target


def rewrite_adapter_weights(folder: Path, edit) -> None:
    """edit(state) changes the adapter's weights in folder (a {key: tensor} dict, in place); they are saved and
    the manifest's record of its files made true again, so the change is what a check finds, not the file."""
    from safetensors.torch import load_file, save_file

    from lqmf.core.registry import file_inventory

    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    manifest = json.loads((folder / "lqmf.json").read_text())
    manifest["files"] = file_inventory(folder)
    (folder / "lqmf.json").write_text(json.dumps(manifest))


# -------------------------------------------------------------------------------- Triton kernels on a CPU machine


def triton_interpreter_only(elsewhere: str) -> None:
    """Skip the calling test module (at import) unless Triton is installed and its CPU interpreter is on
    (conftest.py turns it on off a GPU machine); elsewhere says what checks the kernels on a GPU machine."""
    import pytest

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"Triton's interpreter is off (a GPU machine): {elsewhere}", allow_module_level=True)


def compiling_env() -> dict[str, str]:
    """The environment of a process that compiles Triton kernels (no interpreter), src/ and benchmarks/ importable."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'benchmarks'}"}
    env.pop("TRITON_INTERPRET", None)
    return env


def compiled_for_sm90(probe: str) -> list[str]:
    """What probe (Python that compiles kernels for sm_90 through benchmarks/nf4_sass_count.py) prints, split."""
    run = subprocess.run([sys.executable, "-c", probe], env=compiling_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


# -------------------------------------------------------------- A real `lqmf serve` process on loopback, always stopped


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


def answer_concurrently(host, jobs, new: int, minimum: int = 0, **options) -> dict:
    """Each (model id, prompt) in jobs answered by a ModelHost (greedily, or as options say), all at once
    from threads."""
    results: dict = {}

    def run(job):
        results[job] = host.complete(job[0], job[1], max_new_tokens=new, min_new_tokens=minimum, **options)[1].text

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def stop_asking(stop_event: threading.Event, threads: list[threading.Thread]) -> None:
    stop_event.set()
    for thread in threads:
        thread.join(timeout=120)


# ------------------------------------------------------- `lqmf ARGS` in a forked copy of the test process (tests/fault)


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


# ----------------------------------------- A tiny training run and the checks that a kill left the workspace consistent


STEPS = 3


def train_args(model: Path, name: str = "run", *extra: str) -> list[str]:
    return ["train", str(model), str(EXAMPLES / "chat_training.csv"), "chat", "--name", name,
            "--max-steps", str(STEPS), "--no-4bit", "--max-seq-length", "64", "--batch-size", "4",
            "--grad-accum", "1", "--lr", "5e-3", "--set", "save_steps=1", "--set", "eval_at_start=false", *extra]


def finished_ok(workspace: Path, name: str) -> bool:
    """Whether adapters/NAME is a complete adapter whose files match its manifest."""
    registry = Registry(Workspace(workspace))
    folder = workspace / "adapters" / name
    if not folder.is_dir():
        return False
    report = registry.verify(registry.inspect(folder))
    assert report.ok, report.problems
    return True


def train_steps_logged(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "train"]


# -------------------------------------------------------------------------------------------------- Workspace snapshots


def snapshot(root) -> list[tuple[str, int]]:
    """Every file under root with its size, except the checksum cache (a cache, rewritten freely)."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != ".lqmf/checksums.json")


# ---------------------------------------------------------------------------------- A tiny LoRA model and its gradients


def lora_for_training(model, target_modules, lean: bool):
    """model (a loaded base) with r=8 LoRA on target_modules as `lqmf train` holds it: fp32 LoRA weights,
    B drawn (so gradients reach A), dropout 0 (no random masks); lean: of our layer classes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lqmf.engine import compat
    from lqmf.engine.lora.lean import build_lean_layers

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules)
    if lean:
        build_lean_layers(config)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    for parameter in model.parameters():
        if parameter.requires_grad:
            compat.repoint(parameter, parameter.data.float())  # as loop.setup_model: fp32 LoRA weights
    model.train()
    return model


def lora_model(lean: bool = False, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")):
    """A tiny Llama with r=4 LoRA on targets (q/k/v/o); lean: of our LoRA layer classes
    (lora.lean.build_lean_layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return with_lora(model, targets, lean)


def with_lora(model, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), lean: bool = False):
    """model with r=4 LoRA (dropout 0.1) on targets, lora_B drawn at random (not zero) so that every LoRA
    weight gets a gradient, in training mode; lean: of our LoRA layer classes (lora.lean.build_lean_layers)."""
    from peft import LoraConfig, get_peft_model

    from lqmf.engine.lora.lean import build_lean_layers

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(targets))
    if lean:
        build_lean_layers(lora)
    model = get_peft_model(model, lora)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    model.train()
    return model


def kernel_masked_dropouts(model) -> None:
    """Put in place of every LoRA dropout of model (a torch Dropout) one that draws its seed and mask as
    engine/lora/dropout.py's kernels do: PEFT's layers with the masks of the fused dropout."""
    import torch

    from lqmf.engine.lora import dropout

    class KernelMaskedDropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            mask = dropout.mask(x.numel() // x.shape[-1], x.shape[-1], self.p, dropout.draw_seed(), x.device)
            return x * mask.view(x.shape).to(x.dtype) * (1.0 / (1.0 - self.p))

    for module in model.modules():
        for name, old in getattr(module, "lora_dropout", {}).items():
            module.lora_dropout[name] = KernelMaskedDropout(old.p)


def gradients(model, ids, offload=None) -> dict:
    import contextlib

    import torch

    torch.manual_seed(1)  # the same LoRA dropout masks in both runs
    model.zero_grad(set_to_none=True)
    with offload or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------- Training runs in a subprocess


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")

def start_training(workspace: Path, model: Path, name: str, steps: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "lqmf", "train", str(model), str(EXAMPLES / "chat_training.csv"), "chat",
            "--name", name, "--max-steps", str(steps), "--no-4bit", "--max-seq-length", "128", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "5e-3", "--set", "save_steps=1"]
    return subprocess.Popen(args, cwd=workspace, env=lqmf_env({"LQMF_HOME": str(workspace)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def logged_steps(staging: Path) -> int:
    log = staging / "metrics.jsonl"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"type": "train"' in line)


# ---------------------------------------------------------------------------------------------------------- CLI results


def out_json(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------- What a command imports


def modules_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lqmf.cli.app import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=lqmf_env(), cwd=REPO, capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


# ----------------------------------------------------------------------------------------------- Shapes and CLI calls


MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 32768, "tie_word_embeddings": False}

def invoke(workspace: Path, *args):
    from lqmf.cli.app import app

    return CliRunner().invoke(app, ["--workspace", str(workspace), *map(str, args)])

def bench_json(workspace: Path, *args) -> dict:
    result = invoke(workspace, "bench", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------- lqmf shell


def run_shell(workspace: Path, script: str, *options: str, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lqmf", "shell", *options], input=script, cwd=workspace,
                          env=lqmf_env({"LQMF_HOME": str(workspace), **(env or {})}), capture_output=True, text=True,
                          timeout=timeout)


def sentences_csv(path: Path, topics: dict[str, tuple[list[str], list[str]]], n: int, seed: int) -> Path:
    """A classification CSV of n made-up sentences, labels taking turns over topics' keys; each topic
    is (subjects, predicates) and a row's text one random subject plus one random predicate."""
    rng = random.Random(seed)
    labels = list(topics)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            subjects, predicates = topics[label]
            writer.writerow([f"{rng.choice(subjects)} {rng.choice(predicates)}.", label])
    return path
