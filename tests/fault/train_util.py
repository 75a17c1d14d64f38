"""A tiny training run and the checks that a kill left the workspace consistent."""

from __future__ import annotations

import json
from pathlib import Path

from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from tests.conftest import EXAMPLES

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
