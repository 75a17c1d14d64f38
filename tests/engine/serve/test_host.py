"""The served model in-process: classification over HTTP (FastAPI's TestClient), and how swaps
fall back when PEFT's in-place hot-swap does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lqmf.core.errors import ConflictError
from lqmf.core.registry import file_inventory
from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.serve.host import ModelHost
from lqmf.engine.serve.server import create_app

PROMPT = "How do I return an item?"


def derive_adapter(workspace: Path, source: str, name: str, *, keep: tuple[str, ...] | None = None,
                   dropout: float | None = None) -> None:
    """A copy of an adapter, limited to some target modules and/or with another dropout."""
    from safetensors.torch import load_file, save_file

    folder = workspace / "adapters" / name
    shutil.copytree(workspace / "adapters" / source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if keep is not None:
        config["target_modules"] = list(keep)
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in weights.items() if any(f".{m}." in k for m in keep)},
                  folder / "adapter_model.safetensors")
    if dropout is not None:
        config["lora_dropout"] = dropout
    (folder / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "lqmf.json").read_text())
    lora = {**manifest["lora"], "target_modules": config["target_modules"]}
    (folder / "lqmf.json").write_text(json.dumps({**manifest, "name": name, "lora": lora,
                                                  "files": file_inventory(folder)}))


def answer(host: ModelHost, model_id: str) -> str:
    return host.complete(model_id, PROMPT, max_new_tokens=8)[1].text


def reference(workspace: Path, adapter: str) -> str:
    model = inference.load_for_inference(Workspace(workspace), adapter)
    return inference.generate(model, inference.prompt_ids(model, PROMPT), max_new_tokens=8).text


def test_classification_route(cli, adapters_workspace):
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["sent"])
    texts = ["I love it, works perfectly.", "Broke after a day. Awful."]
    with TestClient(create_app(host)) as http:
        response = http.post("/v1/classify", json={"model": "sent", "input": texts})
        assert response.status_code == 200, response.text
        body = response.json()
        for text, row in zip(texts, body["data"], strict=True):
            report = json.loads(cli("test", "sent", text, "--json").stdout)
            assert row["label"] == report["label"]
            assert row["probabilities"] == pytest.approx(report["probabilities"], abs=1e-5)
        assert body["model"] == "sent" and body["usage"]["prompt_tokens"] > 0
        base = http.post("/v1/classify", json={"model": "minilm", "input": texts[0]}).json()
        assert base["model"] == "minilm" and len(base["data"]) == 1
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400 and "classify" in refused.json()["error"]["message"]
        mismatch = http.post("/admin/adapters/load", json={"adapter": "chat-a"})
        assert mismatch.status_code == 409 and "classification model" in mismatch.json()["error"]["message"]


def test_swaps_go_in_place_when_shapes_fit_and_fall_back_when_not(adapters_workspace, monkeypatch):
    """One-request-at-a-time serving (LQMF_FAST=0): adapters are PEFT slots, swapped in place."""
    monkeypatch.setenv("LQMF_FAST", "0")
    derive_adapter(adapters_workspace, "instr-b", "instr-qv", keep=("q_proj", "v_proj"))
    derive_adapter(adapters_workspace, "instr-b", "instr-drop", dropout=0.2)
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["chat-a"])
    assert host.scheduler is None
    result = host.switch("instr-drop")  # only the dropout differs, which inference ignores: in place
    assert (result.method, result.previous, result.resident) == ("hotswap", "chat-a", ["instr-drop"])
    assert answer(host, "default") == reference(adapters_workspace, "instr-b")
    result = host.switch("instr-qv")  # other target modules: a new slot, and the old one freed
    assert (result.method, result.resident) == ("load", ["instr-qv"])
    assert answer(host, "default") == reference(adapters_workspace, "instr-qv")
    unloaded = host.unload()
    assert (unloaded.adapter, unloaded.active, unloaded.resident) == ("instr-qv", None, [])
    assert host.load("chat-a").method == "load"  # the weights kept by the unload do not fit
    assert answer(host, "default") == reference(adapters_workspace, "chat-a")
    host.unload("chat-a")
    assert host.load("instr-b").method == "hotswap"  # these do
    assert answer(host, "instr-b") == answer(host, "default") == reference(adapters_workspace, "instr-b")
    assert host.unload("instr-b").resident == [] and answer(host, "default") == answer(host, "tiny-llama")


def test_adapter_names_cannot_shadow_model_ids(adapters_workspace):
    derive_adapter(adapters_workspace, "chat-a", "default")
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["chat-a"])
    with pytest.raises(ConflictError, match="rename the adapter"):
        host.load("default")


def test_a_request_whose_client_left_stops_generating(adapters_workspace):
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["chat-a"])
    pieces: list[str] = []
    _, generation = host.complete("default", PROMPT, max_new_tokens=64, on_text=pieces.append,
                                  cancelled=lambda: len(pieces) >= 3)
    assert generation.finish_reason == "cancelled" and generation.new_tokens < 64
    assert "".join(pieces) == generation.text
