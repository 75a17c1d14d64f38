"""Model aliases, local folders, packaged models and `lqmf models`."""

from __future__ import annotations

import json

import pytest

from lqmf.core.errors import ConflictError, NotFoundError
from lqmf.core.models import ModelCatalogue
from lqmf.core.workspace import Workspace


def test_builtin_aliases_resolve(workspace):
    catalogue = ModelCatalogue(Workspace(workspace))
    mistral = catalogue.resolve("mistral-7b")
    assert mistral.kind == "hub" and mistral.source == "mistralai/Mistral-7B-v0.1"
    assert mistral.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert catalogue.resolve("bert-base").target_modules == ["query", "key", "value"]


def test_packaged_minilm_is_available(workspace, minilm):
    resolved = ModelCatalogue(Workspace(workspace)).resolve("minilm")
    assert resolved.kind == "package" and resolved.available and resolved.path == minilm
    assert resolved.family == "bert"


def test_local_folder_and_hub_id(workspace, tiny_model):
    catalogue = ModelCatalogue(Workspace(workspace))
    local = catalogue.resolve(str(tiny_model))
    assert local.kind == "local" and local.available and local.family == "llama"
    hub = catalogue.resolve("someorg/some-model")
    assert hub.kind == "hub" and not hub.available


def test_unknown_alias_suggests(workspace):
    with pytest.raises(NotFoundError, match="did you mean 'mistral-7b'"):
        ModelCatalogue(Workspace(workspace)).resolve("mistral7b")


def test_models_add_and_list(cli, workspace, tiny_model):
    added = cli("models", "add", "mine", str(tiny_model), "--description", "test model")
    assert added.exit_code == 0, added.output
    listed = json.loads(cli("models", "list", "--json").stdout)
    mine = next(r for r in listed if r["alias"] == "mine")
    assert mine["available"] and mine["origin"] == "workspace" and mine["family"] == "llama"
    with pytest.raises(ConflictError):
        ModelCatalogue(Workspace(workspace)).add("mine", str(tiny_model))
    assert cli("models", "add", "mine", str(tiny_model)).exit_code == 4
    assert cli("models", "add", "x/../y", str(tiny_model)).exit_code == 2
    assert cli("models", "add", "bad", "not a model").exit_code == 2
    table = cli("models", "list")
    assert "mine" in table.stdout and "mistral-7b" in table.stdout


def test_workspace_overrides_builtin(workspace, tiny_model):
    (workspace / "configs").mkdir()
    (workspace / "configs" / "models.yaml").write_text(f"models:\n  mistral-7b:\n    source: {tiny_model}\n")
    resolved = ModelCatalogue(Workspace(workspace)).resolve("mistral-7b")
    assert resolved.kind == "local" and resolved.available


def test_bad_models_yaml_names_the_key(cli, workspace):
    (workspace / "configs").mkdir()
    (workspace / "configs" / "models.yaml").write_text("modles: {}\n")
    result = cli("models", "list")
    assert result.exit_code == 2 and "did you mean 'models'" in result.output
