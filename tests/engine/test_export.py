"""`lqmf export` (and `lqmf adapters export`): PEFT folders, merged models, archives, path checks."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from lqmf.core.workspace import Workspace
from tests.helpers import copy_adapter

PROMPTS = ["What is AI?", "How do I return an item?"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sums(folder: Path) -> set[str]:
    """Check SHA256SUMS like `sha256sum -c`; returns the files it covers."""
    covered = set()
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert sha256(folder / name) == digest, name
        covered.add(name)
    return covered


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith((".lqmf-tmp", ".lqmf-old"))]


def lqmf_loaded(workspace: Path, adapter: str, task: str = "chat", labels=None, quantize_4bit: bool = False):
    """The adapter as LQMF's inference path loads it: engine/loading.py's base + PeftModel on adapters/NAME."""
    from peft import PeftModel

    from lqmf.core.registry import Registry
    from lqmf.engine.loading import load_model

    registry = Registry(Workspace(workspace))
    entry = registry.get(adapter)
    loaded = load_model(registry.resolve_base(entry), task=task, device_preference="cpu",
                        quantize_4bit=quantize_4bit, labels=labels)
    return PeftModel.from_pretrained(loaded.model, str(entry.path)), loaded.tokenizer


def logits(model, tokenizer):
    import torch

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_peft_export_loads_with_plain_peft_and_matches(cli, workspace, trained_workspace, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/exports/", "--json").stdout)
    folder = tmp_path / "exports" / "chat-a"
    assert out["path"] == str(folder) and out["format"] == "peft"
    assert set(out["files"]) == {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md",
                                 "SHA256SUMS", "lqmf.json", "lqmf-export.json"}
    assert check_sums(folder) == set(out["files"]) - {"SHA256SUMS", "lqmf-export.json"}
    manifest = json.loads((folder / "lqmf.json").read_text())
    assert manifest["name"] == "chat-a" and manifest["export"]["format"] == "peft"
    assert "PeftModel.from_pretrained" in (folder / "README.md").read_text()

    expected_model, tokenizer = lqmf_loaded(workspace, "chat-a")
    expected = logits(expected_model, tokenizer)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder))
    assert torch.allclose(logits(plain.eval(), tokenizer), expected, atol=1e-6)
    with plain.disable_adapter():
        base = logits(plain, tokenizer)
    assert not torch.allclose(base, expected, atol=1e-5), "the adapter changes the output (the test can fail)"


def test_merged_export_of_a_4bit_adapter_loads_without_peft(cli, workspace, trained_workspace, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy_adapter(trained_workspace, "chat-q", workspace)
    result = cli("adapters", "export", "chat-q", tmp_path / "merged", "--merge")
    assert result.exit_code == 0, result.output
    assert "trained on the 4-bit (NF4) quantized base" in result.stderr and "unquantized float32" in result.stderr
    folder = tmp_path / "merged"
    assert result.stdout.strip() == str(folder)
    assert not (folder / "adapter_config.json").exists()
    manifest = json.loads((folder / "lqmf.json").read_text())
    assert manifest["export"]["format"] == "merged" and manifest["export"]["trained_quantized_4bit"] is True
    check_sums(folder)

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    unmerged, _ = lqmf_loaded(workspace, "chat-q", quantize_4bit=False)
    expected = logits(unmerged, tokenizer)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert not torch.allclose(logits(base, tokenizer), expected, atol=1e-4), "the merge changed the weights"


def test_merged_classification_export_matches(cli, workspace, trained_workspace, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    copy_adapter(trained_workspace, "sent", workspace)
    out = json.loads(cli("export", "sent", f"{tmp_path}/", "--merge", "--json").stdout)
    folder = tmp_path / "sent-merged"
    assert out["path"] == str(folder) and out["trained_quantized_4bit"] is False and "note" not in out
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unmerged, _ = lqmf_loaded(workspace, "sent", task="classification", labels=["negative", "positive"])
    expected = logits(unmerged, tokenizer)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-4)
    with unmerged.disable_adapter():
        assert not torch.allclose(logits(unmerged, tokenizer), expected, atol=1e-4)


def test_archive_holds_the_folder_and_its_checksums(cli, workspace, trained_workspace, tmp_path):
    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/", "--archive", "--json").stdout)
    archive = tmp_path / "chat-a.tar.gz"
    assert out["path"] == str(archive) and out["sha256"] == sha256(archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all(n == "chat-a" or n.startswith("chat-a/") for n in names)
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert check_sums(tmp_path / "unpacked" / "chat-a") >= {"adapter_model.safetensors", "lqmf.json"}
    assert leftovers(tmp_path) == []

    named = cli("export", "chat-a", tmp_path / "named.tgz", "--archive")
    assert named.exit_code == 0 and (tmp_path / "named.tgz").is_file()
    assert cli("export", "chat-a", tmp_path / "named.zip", "--archive").exit_code == 2


def test_overwrites_need_force_and_never_clobber_other_folders(cli, workspace, trained_workspace, tmp_path):
    copy_adapter(trained_workspace, "chat-a", workspace)
    target = tmp_path / "out"
    assert cli("export", "chat-a", target).exit_code == 0
    again = cli("export", "chat-a", target)
    assert again.exit_code == 4 and "--force" in again.output
    record = json.loads((target / "lqmf-export.json").read_text())
    assert sorted(record["files"]) == sorted(p.name for p in target.iterdir() if p.name != "lqmf-export.json")
    (target / "README.md").write_text("edited")  # a file the export wrote: still its own
    replaced = cli("export", "chat-a", target, "--force")
    assert replaced.exit_code == 0 and "LoRA adapter" in (target / "README.md").read_text()
    assert json.loads((target / "lqmf-export.json").read_text())["export_id"] != record["export_id"]
    (target / "notes.txt").write_text("added by hand")
    added = cli("export", "chat-a", target, "--force")
    assert added.exit_code == 4 and "files its export did not write (notes.txt)" in added.stderr
    assert len(added.stderr.strip().splitlines()) == 1 and (target / "notes.txt").is_file()

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    refused = cli("export", "chat-a", precious, "--force")
    assert refused.exit_code == 4 and "not an LQMF export" in refused.output
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    into = cli("export", "chat-a", f"{precious}/")
    assert into.exit_code == 0 and (precious / "chat-a" / "lqmf.json").is_file()
    assert leftovers(tmp_path) == [] and leftovers(precious) == []


def test_force_never_replaces_an_adapter_of_another_registry(cli, workspace, trained_workspace, tmp_path):
    """Regression (issue 20): an adapter folder has lqmf.json like an export; only the export's record counts."""
    copy_adapter(trained_workspace, "chat-a", workspace)
    other = tmp_path / "other-ws"
    theirs = copy_adapter(trained_workspace, "instr-b", other, as_name="chat-a")
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()}
    refused = cli("export", "chat-a", theirs, "--force")
    assert refused.exit_code == 4, refused.output
    assert refused.stderr.count("\n") == 1 and "it is an adapter folder" in refused.stderr
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()} == before
    assert cli("--workspace", other, "adapters", "verify", "chat-a").exit_code == 0
    for tampered in ("{", '{"export_id": 1, "files": []}'):  # an unreadable or forged-looking record
        (theirs / "lqmf-export.json").write_text(tampered)
        assert cli("export", "chat-a", theirs, "--force").exit_code == 4
    assert leftovers(theirs.parent) == []


@pytest.mark.parametrize("where", ["adapters/inside", "adapters/", ".", ".."])
def test_export_paths_into_the_registry_or_over_the_workspace_are_refused(cli, workspace, trained_workspace, where):
    copy_adapter(trained_workspace, "chat-a", workspace)
    before = sorted(p.name for p in (workspace / "adapters").iterdir())
    result = cli("export", "chat-a", where, "--force")
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in (workspace / "adapters").iterdir()) == before
    assert (workspace / "adapters" / "chat-a" / "lqmf.json").is_file()


def test_export_refuses_a_corrupted_adapter(cli, workspace, trained_workspace, tmp_path):
    folder = copy_adapter(trained_workspace, "chat-a", workspace)
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    result = cli("export", "chat-a", tmp_path / "out")
    assert result.exit_code == 2 and "adapters verify chat-a" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert cli("export", "missing", tmp_path / "out").exit_code == 3


def test_merge_needs_the_base_model(cli, workspace, trained_workspace, tmp_path):
    folder = copy_adapter(trained_workspace, "chat-a", workspace)
    manifest = json.loads((folder / "lqmf.json").read_text())
    manifest["base_model"] = {"reference": "/models/gone", "source": "/models/gone", "kind": "local",
                              "path": "/models/gone"}
    (folder / "lqmf.json").write_text(json.dumps(manifest))
    result = cli("export", "chat-a", tmp_path / "merged", "--merge")
    assert result.exit_code == 3 and "not available" in result.output
    assert not (tmp_path / "merged").exists()
