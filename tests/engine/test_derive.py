"""`lqmf adapters combine` and `compress`: PEFT-loadable results, lineage, the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lqmf.core.registry import MANIFEST
from lqmf.core.workspace import Workspace
from tests.helpers import out_json

PROMPT_IDS = [[1, 5, 9, 14, 3, 7, 22, 8]]


def lqmf_logits(workspace: Path, name: str):
    """Logits through LQMF's own loading path (as `lqmf test` and `lqmf serve` load an adapter)."""
    import torch

    from lqmf.engine.inference import load_for_inference

    model = load_for_inference(Workspace(workspace), name, device="cpu")
    with torch.no_grad():
        return model.model(input_ids=torch.tensor(PROMPT_IDS)).logits


def peft_logits(base: Path, folder: Path):
    """Logits through plain transformers + PEFT, nothing of LQMF."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROMPT_IDS)).logits


def payload_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes (its size less the JSON header, large beside tiny tensors)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def adapter_files(workspace: Path) -> list[str]:
    return sorted(p.name for p in (workspace / "adapters").iterdir() if not p.name.startswith(".registry"))


@pytest.mark.parametrize("method", ["linear", "svd", "cat", "ties", "dare_ties", "dare_linear"])
def test_combine_loads_in_plain_peft_as_in_lqmf(cli, adapters_workspace, tiny_model, method):
    import torch

    result = out_json(cli("adapters", "combine", "mix", "chat-a", "chat-q", "--method", method,
                          "--weights", "0.7,0.3", "--device", "cpu", "--json"))
    manifest = json.loads((adapters_workspace / "adapters" / "mix" / MANIFEST).read_text())
    assert manifest["lineage"]["method"] == method and manifest["lineage"]["weights"] == [0.7, 0.3]
    assert [s["name"] for s in manifest["lineage"]["sources"]] == ["chat-a", "chat-q"]
    assert manifest["quality"]["scores"]["loss"] == pytest.approx(manifest["metrics"]["eval_loss"])
    assert result["lora"]["r"] == (32 if method == "cat" else 16)
    ours = lqmf_logits(adapters_workspace, "mix")
    assert torch.allclose(ours, peft_logits(tiny_model, adapters_workspace / "adapters" / "mix"), atol=1e-5)
    assert not torch.allclose(ours, lqmf_logits(adapters_workspace, "chat-a"), atol=1e-4)


def test_linear_one_zero_is_the_first_adapter(cli, adapters_workspace):
    import torch

    out_json(cli("adapters", "combine", "first", "chat-a", "chat-q", "--weights", "1,0", "--device", "cpu",
                 "--json"))
    assert torch.allclose(lqmf_logits(adapters_workspace, "first"), lqmf_logits(adapters_workspace, "chat-a"),
                          atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["chat-a", "instr-b"], "only adapters of one task combine"),
    (["chat-a", "sent"], "only adapters of one base model combine"),
    (["chat-a", "chat-q", "--weights", "1"], "1 weight(s) for 2 adapters"),
    (["chat-a", "chat-q", "--method", "mean"], "--method must be one of"),
    (["chat-a", "chat-q", "--min-metric", "0.5"], "--min-metric applies to classification accuracy"),
])
def test_combine_refuses_in_one_line(cli, adapters_workspace, args, message):
    before = adapter_files(adapters_workspace)
    result = cli("adapters", "combine", "mix", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert adapter_files(adapters_workspace) == before


def test_quality_gate_refuses_and_leaves_nothing(cli, adapters_workspace):
    before = adapter_files(adapters_workspace)
    result = cli("adapters", "combine", "mix", "chat-a", "chat-q", "--max-loss", "0.001", "--device", "cpu")
    assert result.exit_code == 1
    assert "not registered: held-out loss" in result.stderr and "above --max-loss 0.001" in result.stderr
    assert adapter_files(adapters_workspace) == before
    result = cli("adapters", "compress", "sent", "--rank", "4", "--name", "s4", "--min-metric", "1.01",
                 "--device", "cpu")
    assert result.exit_code == 1 and "below --min-metric 1.01" in result.stderr
    assert adapter_files(adapters_workspace) == before


def test_compress_halves_size_and_reports_the_metric(cli, adapters_workspace, tiny_model):
    import torch

    weights = "adapter_model.safetensors"
    original = (adapters_workspace / "adapters" / "chat-a" / weights).stat().st_size
    original_payload = payload_bytes(adapters_workspace / "adapters" / "chat-a" / weights)
    full = out_json(cli("adapters", "compress", "chat-a", "--rank", "16", "--name", "same", "--device", "cpu",
                        "--json"))
    assert torch.allclose(lqmf_logits(adapters_workspace, "same"), lqmf_logits(adapters_workspace, "chat-a"),
                          atol=1e-5)  # the SVD at full rank is exact
    assert full["scores"]["after"]["loss"] == pytest.approx(full["scores"]["before"]["loss"], rel=1e-5)
    half = out_json(cli("adapters", "compress", "chat-a", "--rank", "8", "--name", "r8", "--device", "cpu",
                        "--json"))
    assert half["size_bytes"]["before"] == original
    assert half["size_bytes"]["after"] / original == pytest.approx(0.5, abs=0.02)
    assert payload_bytes(adapters_workspace / "adapters" / "r8" / weights) * 2 == original_payload
    assert half["rank"] == {"before": 16, "after": 8}
    assert half["scores"]["before"]["loss"] != half["scores"]["after"]["loss"]
    manifest = json.loads((adapters_workspace / "adapters" / "r8" / MANIFEST).read_text())
    assert manifest["lineage"]["operation"] == "compress" and manifest["lora"]["r"] == 8
    assert "compress of chat-a rank=8" in cli("adapters", "show", "r8").stdout
    assert "lora_r: 8\n" in (adapters_workspace / "adapters" / "r8" / "config.yaml").read_text()
    assert manifest["metrics"]["eval_loss"] == half["scores"]["after"]["loss"]
    result = cli("adapters", "compress", "r8", "--dtype", "bf16", "--in-place", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "held-out: loss" in result.stdout and "size:" in result.stdout
    quarter = adapters_workspace / "adapters" / "r8" / weights
    assert payload_bytes(quarter) * 4 == original_payload
    assert quarter.stat().st_size / original < 0.3
    folder = adapters_workspace / "adapters" / "r8"
    assert torch.allclose(lqmf_logits(adapters_workspace, "r8"), peft_logits(tiny_model, folder), atol=1e-4)
    assert not any(p.name.startswith(".staging") for p in (adapters_workspace / "adapters").iterdir())


def test_compress_by_energy_on_a_classifier(cli, adapters_workspace):
    result = out_json(cli("adapters", "compress", "sent", "--energy", "0.9", "--dtype", "bf16", "--name", "slim",
                          "--device", "cpu", "--json"))
    assert result["size_bytes"]["after"] < result["size_bytes"]["before"]
    assert {"accuracy", "loss"} <= set(result["scores"]["after"])
    ranks = json.loads((adapters_workspace / "adapters" / "slim" / MANIFEST).read_text())["lineage"]["module_ranks"]
    assert max(ranks.values()) <= 16 and min(ranks.values()) >= 1
    shown = cli("adapters", "list", "--json")
    assert any(row["name"] == "slim" and row["metric"]["name"] == "eval_accuracy" for row in out_json(shown))
