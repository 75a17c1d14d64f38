"""`lqmf train --gpus 2` on the CPU: two gloo processes train exactly what one process trains.

Two processes, each taking half of every step's examples, must give the loss curve of one process
with the same effective batch; rank 0 alone writes the adapter and the metrics log; a Ctrl-C on
one rank stops both at the same step with a checkpoint, and the resumed run ends on the same curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES

pytestmark = pytest.mark.slow

# Dropout off: two processes draw other random numbers than one does; everything else is the same.
RUN = ["--max-seq-length", "128", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--lr", "5e-3",
       "--device", "cpu", "--no-4bit", "--set", "lora_dropout=0", "--set", "validation_split=0.2",
       "--set", "save_steps=1", "--set", "eval_strategy=steps", "--set", "eval_steps=2", "-q"]


def records(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_two_processes_match_one_and_resume(cli, run_lqmf, workspace, tiny_model):
    data = EXAMPLES / "chat_training.csv"
    single = cli("train", tiny_model, data, "chat", "--name", "one", *RUN)
    assert single.exit_code == 0, single.output

    # Rank 0 signals itself as it finishes its second checkpoint: both ranks agree on it in the next
    # step and stop after it.
    first = run_lqmf("train", tiny_model, data, "chat", "--name", "two", "--gpus", "2", *RUN,
                     env={"LQMF_FAULT_AT": "checkpoint.replaced#2:SIGINT"})
    assert first.returncode == 130, first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("error: training interrupted after step 3/4")
    assert "Traceback" not in first.stderr and first.stderr.count("error:") == 1
    resumed = run_lqmf("train", "--resume", "two", "--gpus", "2", "--json")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["runtime"]["processes"] == 2 and result["runtime"]["strategy"] == "ddp"
    assert result["resumed_from_step"] == 3

    one, two = workspace / "adapters" / "one", workspace / "adapters" / "two"
    curve_one = [r["loss"] for r in records(one, "train")]
    curve_two = [r["loss"] for r in records(two, "train")]
    assert [r["step"] for r in records(two, "train")] == [1, 2, 3, 4]  # one log, no step twice
    assert curve_two == pytest.approx(curve_one, rel=1e-4)
    assert curve_one[-1] < curve_one[0]
    evals = [(r["step"], r["eval_loss"]) for r in records(two, "eval")]
    assert evals == [(s, pytest.approx(v, rel=1e-4)) for s, v in ((r["step"], r["eval_loss"])
                                                                  for r in records(one, "eval"))]
    adapters = sorted(p.name for p in (workspace / "adapters").iterdir() if not p.name.startswith("."))
    assert adapters == ["one", "two"]
    assert not any(p.name.startswith(".staging") for p in (workspace / "adapters").iterdir())
    assert (two / "adapter_model.safetensors").is_file() and not (two / "checkpoint").exists()

    from safetensors.torch import load_file

    weights_one = load_file(one / "adapter_model.safetensors")
    weights_two = load_file(two / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, tensor in weights_one.items():
        assert weights_two[key].allclose(tensor, rtol=1e-3, atol=1e-5), key


def test_train_from_python(workspace, tiny_model):
    from lqmf import train
    from lqmf.engine.train.loop import Events

    seen = []

    class Steps(Events):
        def on_step(self, record):
            seen.append(record["step"])

    result = train({"base_model": str(tiny_model), "dataset_path": str(EXAMPLES / "chat_training.csv"),
                    "task_type": "chat", "job_name": "py", "max_steps": 2, "max_seq_length": 128,
                    "use_4bit_quantization": False, "validation_split": 0}, workspace=workspace, events=Steps())
    assert result.path == workspace / "adapters" / "py" and (result.path / "adapter_model.safetensors").is_file()
    assert seen == [1, 2] and result.metrics["steps"] == 2 and result.runtime["processes"] == 1


def test_fsdp_two_processes_train_what_one_process_trains(cli, run_lqmf, workspace, tiny_model):
    """FSDP-QLoRA (4-bit base sharded over two gloo processes) against one process on the 4-bit base:
    the same curve, and an adapter with the same weights under PEFT's own names."""
    data = EXAMPLES / "chat_training.csv"
    run = ["--max-seq-length", "128", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--lr", "5e-3",
           "--device", "cpu", "--4bit", "--set", "lora_dropout=0", "--set", "validation_split=0", "-q"]
    assert cli("train", tiny_model, data, "chat", "--name", "one", *run).exit_code == 0
    sharded = run_lqmf("train", tiny_model, data, "chat", "--name", "two", "--gpus", "2", "--strategy", "fsdp",
                       *run, "--json")
    assert sharded.returncode == 0, sharded.stderr
    assert json.loads(sharded.stdout)["runtime"]["strategy"] == "fsdp"
    one, two = workspace / "adapters" / "one", workspace / "adapters" / "two"
    assert [r["loss"] for r in records(two, "train")] == pytest.approx([r["loss"] for r in records(one, "train")],
                                                                       rel=1e-4)
    from safetensors.torch import load_file

    weights_one = load_file(one / "adapter_model.safetensors")
    weights_two = load_file(two / "adapter_model.safetensors")
    assert weights_one and weights_one.keys() == weights_two.keys()
    for key, tensor in weights_one.items():
        assert weights_two[key].allclose(tensor, rtol=1e-3, atol=1e-5), key


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_node_rehearsal_matches_one_process(cli, workspace, tiny_model):
    """Two machines, rehearsed on one: two torchrun launches (--nnodes 2, node ranks 0 and 1, one
    process each, one rendezvous endpoint) of the ordinary `lqmf train` give one process's loss curve
    and adapter; node 0 alone writes."""
    import subprocess
    import sys

    from tests.helpers import lqmf_env

    data = EXAMPLES / "chat_training.csv"
    run = ["--max-seq-length", "128", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--lr", "5e-3",
           "--device", "cpu", "--no-4bit", "--set", "lora_dropout=0", "--set", "validation_split=0", "-q"]
    single = cli("train", tiny_model, data, "chat", "--name", "one", *run)
    assert single.exit_code == 0, single.output
    endpoint = f"localhost:{_free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "-m", "lqmf", "train", str(tiny_model), str(data),
         "chat", "--name", "nodes", *run],
        cwd=workspace, env=lqmf_env({"OMP_NUM_THREADS": "1"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    one, two = workspace / "adapters" / "one", workspace / "adapters" / "nodes"
    assert [r["loss"] for r in records(two, "train")] == pytest.approx([r["loss"] for r in records(one, "train")],
                                                                       rel=1e-4)
    manifest = json.loads((two / "lqmf.json").read_text())
    assert manifest["runtime"]["processes"] == 2

    from safetensors.torch import load_file

    weights_one = load_file(one / "adapter_model.safetensors")
    weights_two = load_file(two / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, tensor in weights_one.items():
        assert weights_two[key].allclose(tensor, rtol=1e-3, atol=1e-5), key
