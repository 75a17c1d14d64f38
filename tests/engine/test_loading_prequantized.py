"""Bases saved already quantized: a bitsandbytes 4-bit tiny Llama trains, answers, serves and benchmarks;
`models list` and the memory planner see its quantization; GPTQ without its library is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lqmf.core.config import TrainConfig
from lqmf.core.memory_plan import estimate, model_shape, settings_for
from lqmf.core.models import ModelCatalogue
from lqmf.core.workspace import Workspace
from tests.helpers import EXAMPLES, out_json

PROMPT = "How do I return an item?"


@pytest.fixture(scope="module")
def tiny_4bit(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama loaded with bitsandbytes NF4 on the CPU and saved that way (config.json says so)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    target = tmp_path_factory.mktemp("models") / "tiny-llama-bnb4"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=quant, device_map={"": "cpu"})
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def trained_on_4bit(tiny_4bit, tmp_path_factory) -> Path:
    """A workspace with adapter 'pq' trained on the pre-quantized base (asked for --no-4bit: it stays 4-bit)."""
    from typer.testing import CliRunner

    from lqmf.cli.app import app

    root = tmp_path_factory.mktemp("prequant-ws")
    runner = CliRunner()
    added = runner.invoke(app, ["--workspace", str(root), "models", "add", "tq", str(tiny_4bit)])
    assert added.exit_code == 0, added.output
    result = runner.invoke(app, ["--workspace", str(root), "train", "tq", str(EXAMPLES / "chat_training.csv"), "chat",
                                 "--name", "pq", "--no-4bit", "--max-steps", "2", "--batch-size", "4",
                                 "--grad-accum", "1", "--max-seq-length", "128"])
    assert result.exit_code == 0, result.output
    assert "loading it 4-bit as saved" in result.stderr
    return root


def test_models_list_and_the_planner_see_the_quantization(trained_on_4bit, tiny_model, cli):
    rows = {r["alias"]: r for r in out_json(cli("--workspace", trained_on_4bit, "models", "list", "--json"))}
    assert rows["tq"]["quantization"]["label"] == "bitsandbytes 4-bit nf4"
    table = cli("--workspace", trained_on_4bit, "models", "list").stdout
    assert "bitsandbytes 4-bit nf4" in table
    catalogue = ModelCatalogue(Workspace(trained_on_4bit))
    saved_4bit, plain = catalogue.resolve("tq"), catalogue.resolve(str(tiny_model))
    assert saved_4bit.prequantized_4bit and plain.quantization is None
    config = TrainConfig(task_type="chat", use_4bit_quantization=False)
    settings = settings_for(config, saved_4bit, device="cuda")
    assert settings.quantize_4bit  # the weights are 4-bit whatever the config asks
    shape, _ = model_shape(saved_4bit)
    assert estimate(shape, settings).total < estimate(shape, settings_for(config, plain, device="cuda")).total


def test_adapter_on_a_prequantized_base_trains_answers_and_benchmarks(trained_on_4bit, cli):
    manifest = json.loads((trained_on_4bit / "adapters" / "pq" / "lqmf.json").read_text())
    assert manifest["runtime"]["quantized_4bit"] is True
    answer = cli("--workspace", trained_on_4bit, "test", "pq", PROMPT, "--max-new-tokens", "4", "--json")
    assert answer.exit_code == 0, answer.output
    bench = out_json(cli("--workspace", trained_on_4bit, "bench", "pq", "--max-new-tokens", "4", "--warmup", "0",
                         "--eval-limit", "2", "--json"))
    assert bench["adapter_run"]["runtime"]["quantized_4bit"] is True


def test_serves_on_a_prequantized_base(trained_on_4bit):
    from fastapi.testclient import TestClient

    from lqmf.engine.serve.host import ModelHost
    from lqmf.engine.serve.server import create_app

    host = ModelHost.start(Workspace(trained_on_4bit), adapters=["pq"], device="cpu")
    assert host.describe()["quantized_4bit"]
    with TestClient(create_app(host)) as client:
        reply = client.post("/v1/chat/completions", json={"model": "pq", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": PROMPT}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None


def test_gptq_without_its_library_is_refused_in_one_line(tiny_model, workspace, cli):
    folder = workspace / "tiny-gptq"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("train", folder, EXAMPLES / "chat_training.csv", "chat", "--max-steps", "1", "--name", "g")
    assert result.exit_code == 5
    assert "is saved gptq 4-bit; loading it needs gptqmodel optimum: pip install gptqmodel optimum" in result.stderr
    problems = [line for line in result.stderr.splitlines()  # phase lines and notes aside
                if line.strip() and not line.startswith(("[", "note:"))]
    assert len(problems) == 1 and "Traceback" not in result.stderr
    assert not (workspace / "adapters" / "g").exists()
