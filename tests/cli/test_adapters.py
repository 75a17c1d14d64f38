"""`lqmf adapters`: the registry verbs, the active pointer, crash safety, concurrency, name checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lqmf.core.fsutil import atomic_write_json
from lqmf.core.registry import ACTIVE_FILE, MANIFEST, Registry, file_inventory
from lqmf.core.workspace import Workspace
from tests.helpers import copy_adapter, logged_steps, lqmf_env, modules_after, out_json, start_training, wait_for

BASE_A = "/models/base-a"  # base models that need not exist for registry bookkeeping
BASE_B = "/models/base-b"


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A valid safetensors file of zero-filled F32 tensors."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(offset))


def make_adapter(workspace: Path, name: str, base: str = BASE_A, task: str = "chat", rank: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), width: int = 64, **metrics: float) -> Path:
    """A small but complete adapter folder (PEFT files, manifest with checksums), made without torch."""
    folder = workspace / "adapters" / name
    folder.mkdir(parents=True)
    shapes = {}
    for module in targets:
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        shapes[f"{key}.lora_A.weight"] = [rank, width]
        shapes[f"{key}.lora_B.weight"] = [width, rank]
    write_safetensors(folder / "adapter_model.safetensors", shapes)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
         "task_type": "SEQ_CLS" if task == "classification" else "CAUSAL_LM"}))
    manifest = {"lqmf_manifest": 1, "name": name, "task": task, "created": "2026-01-01T00:00:00+00:00",
                "base_model": {"reference": base, "alias": None, "source": base, "kind": "local", "path": base},
                "lora": {"r": rank, "alpha": 2 * rank, "target_modules": list(targets)},
                "config": {"job_name": name, "lora_r": rank}, "metrics": metrics,
                "runtime": {"quantized_4bit": False}, "files": file_inventory(folder)}
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def registry(workspace: Path) -> Registry:
    return Registry(Workspace(workspace))


# ----------------------------------------------------------------------------- list / show


def test_list_marks_broken_folders_and_filters(cli, workspace):
    make_adapter(workspace, "chat-a", eval_loss=1.5, train_loss=2.0)
    make_adapter(workspace, "cls-b", base=BASE_B, task="classification", eval_accuracy=0.9)
    make_adapter(workspace, "instr-c", task="instruction_following")
    (workspace / "adapters" / "half").mkdir()
    (workspace / "adapters" / "half" / "adapter_config.json").write_text("{}")
    (workspace / "adapters" / ".staging-crashed").mkdir()
    (workspace / "adapters" / "no-manifest").mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (workspace / "adapters" / "no-manifest" / file).write_text("x")

    rows = {r["name"]: r for r in out_json(cli("adapters", "list", "--json"))}
    assert set(rows) == {"chat-a", "cls-b", "instr-c", "half", "crashed", "no-manifest"}
    assert {n for n, r in rows.items() if r["state"] == "ok"} == {"chat-a", "cls-b", "instr-c"}
    assert "missing adapter_model.safetensors, lqmf.json" in rows["half"]["problem"]
    assert rows["no-manifest"]["problem"] == "missing lqmf.json"
    assert rows["crashed"]["state"] == "broken" and "unfinished training run" in rows["crashed"]["problem"]
    a = rows["chat-a"]
    assert (a["base_id"], a["task"], a["rank"], a["active"]) == (BASE_A, "chat", 4, False)
    assert a["metric"] == {"name": "eval_loss", "value": 1.5}
    assert rows["cls-b"]["metric"] == {"name": "eval_accuracy", "value": 0.9}
    assert a["size_bytes"] == sum(f.stat().st_size for f in (workspace / "adapters" / "chat-a").iterdir()
                                  if f.name != MANIFEST)

    assert [r["name"] for r in out_json(cli("adapters", "list", "--task", "classification", "--json"))] == ["cls-b"]
    assert [r["name"] for r in out_json(cli("adapters", "list", "--task", "instruction", "--json"))] == ["instr-c"]
    assert [r["name"] for r in out_json(cli("adapters", "list", "--base", BASE_B, "--json"))] == ["cls-b"]
    assert out_json(cli("adapters", "list", "--base", "/models/none", "--json")) == []
    assert cli("adapters", "list", "--task", "poetry").exit_code == 2

    table = cli("adapters", "list")
    assert table.exit_code == 0
    assert "broken: missing lqmf.json" in table.stdout and "eval_accuracy" not in table.stdout
    assert "accuracy 0.9" in table.stdout


def test_list_on_an_empty_workspace(cli, workspace):
    assert out_json(cli("adapters", "list", "--json")) == []
    result = cli("adapters", "list")
    assert result.exit_code == 0 and "no adapters" in result.output
    assert not (workspace / "adapters").exists(), "reading the registry creates nothing"


def test_show(cli, workspace):
    make_adapter(workspace, "chat-a", eval_loss=1.25)
    shown = out_json(cli("adapters", "show", "chat-a", "--json"))
    assert shown["name"] == "chat-a" and shown["active"] is False
    files = shown["manifest"]["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    assert shown["manifest"]["config"]["lora_r"] == 4 and shown["manifest"]["metrics"] == {"eval_loss": 1.25}

    human = cli("adapters", "show", "chat-a")
    assert human.exit_code == 0
    assert files["adapter_model.safetensors"]["sha256"] in human.stdout and "lora_r" in human.stdout

    missing = cli("adapters", "show", "chat-b")
    assert missing.exit_code == 3 and "did you mean 'chat-a'" in missing.output
    (workspace / "adapters" / "chat-a" / "adapter_model.safetensors").unlink()
    broken = cli("adapters", "show", "chat-a")
    assert broken.exit_code == 3 and "broken: missing adapter_model.safetensors" in broken.output


# ----------------------------------------------------------------------------- active pointer


def test_load_switch_unload(cli, workspace):
    for name in ("a1", "a2"):
        make_adapter(workspace, name, base=BASE_A)
    make_adapter(workspace, "b1", base=BASE_B)

    assert out_json(cli("adapters", "load", "a1", "--json")) == {
        "base_id": BASE_A, "base_model": BASE_A, "adapter": "a1", "previous": None, "server": None}
    switched = cli("adapters", "switch", "a2")
    assert switched.exit_code == 0 and "a2 is now the active adapter" in switched.stdout and "was a1" in switched.stdout
    assert out_json(cli("adapters", "load", "b1", "--json"))["previous"] is None
    active = {r["name"] for r in out_json(cli("adapters", "list", "--json")) if r["active"]}
    assert active == {"a2", "b1"}
    assert cli("adapters", "show", "a2", "--json").stdout.count('"active": true') == 1

    ambiguous = cli("adapters", "unload")
    assert ambiguous.exit_code == 2 and "--base" in ambiguous.output
    cleared = out_json(cli("adapters", "unload", "--base", BASE_A, "--json"))["unloaded"]
    assert [(c["adapter"], c["base_id"]) for c in cleared] == [("a2", BASE_A)]
    assert out_json(cli("adapters", "unload", "--base", BASE_A, "--json")) == {"unloaded": [], "server": None}
    only_one = cli("adapters", "unload")
    assert only_one.exit_code == 0 and "unloaded b1" in only_one.stdout
    pointer = json.loads((workspace / "adapters" / ACTIVE_FILE).read_text())
    assert pointer == {"lqmf_active": 1, "active": {}}

    assert cli("adapters", "load", "nope").exit_code == 3
    cli("adapters", "load", "a1")
    (workspace / "adapters" / ACTIVE_FILE).write_text("{not json")
    damaged = cli("adapters", "unload", "--base", BASE_A)
    assert damaged.exit_code == 2 and "unload --all" in damaged.output
    assert out_json(cli("adapters", "unload", "--all", "--json")) == {"unloaded": [], "server": None}
    assert out_json(cli("adapters", "load", "a1", "--json"))["adapter"] == "a1"


def test_active_pointer_follows_a_real_adapter_by_model_alias(cli, workspace, trained_workspace, tiny_model):
    copy_adapter(trained_workspace, "chat-a", workspace)
    assert cli("models", "add", "tiny", tiny_model).exit_code == 0
    assert cli("adapters", "load", "chat-a").exit_code == 0
    assert [r["name"] for r in out_json(cli("adapters", "list", "--base", "tiny", "--json"))] == ["chat-a"]
    assert out_json(cli("adapters", "unload", "--base", "tiny", "--json"))["unloaded"][0]["adapter"] == "chat-a"


# ----------------------------------------------------------------------------- rename / remove


def test_rename(cli, workspace):
    make_adapter(workspace, "old")
    make_adapter(workspace, "other")
    cli("adapters", "load", "old")
    assert out_json(cli("adapters", "rename", "old", "new", "--json"))["new"] == "new"
    assert not (workspace / "adapters" / "old").exists()
    assert json.loads((workspace / "adapters" / "new" / MANIFEST).read_text())["name"] == "new"
    assert [r["name"] for r in out_json(cli("adapters", "list", "--json")) if r["active"]] == ["new"]

    assert cli("adapters", "rename", "new", "other").exit_code == 4
    assert cli("adapters", "rename", "gone", "x").exit_code == 3
    assert cli("adapters", "rename", "new", "new").exit_code == 2
    (workspace / "adapters" / ".staging-running").mkdir()
    assert cli("adapters", "rename", "new", "running").exit_code == 4
    assert (workspace / "adapters" / "new" / MANIFEST).is_file()


def test_remove(cli, workspace):
    make_adapter(workspace, "keep")
    make_adapter(workspace, "drop")
    (workspace / "adapters" / "broken-one").mkdir()
    (workspace / "adapters" / ".staging-crashed").mkdir()
    (workspace / "adapters" / ".staging-drop").mkdir()
    cli("adapters", "load", "drop")

    refused = cli("adapters", "remove", "drop")
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert (workspace / "adapters" / "drop").is_dir()
    assert cli("adapters", "remove").exit_code == 2
    assert cli("adapters", "remove", "drop", "--broken").exit_code == 2

    # Regression: with an unfinished run beside it (a failed --force re-run), `remove drop` removed both.
    ambiguous = cli("adapters", "remove", "drop", "--yes")
    assert ambiguous.exit_code == 4 and "remove --broken" in ambiguous.output
    assert (workspace / "adapters" / "drop").is_dir() and (workspace / "adapters" / ".staging-drop").is_dir()
    listed = out_json(cli("adapters", "list", "--json"))
    assert any("lqmf adapters remove --broken" in (r["problem"] or "") for r in listed if r["name"] == "drop")

    assert out_json(cli("adapters", "remove", "--broken", "-y", "--json"))["removed"] == [
        "broken-one", ".staging-crashed", ".staging-drop"]
    assert (workspace / "adapters" / "drop").is_dir()
    removed = out_json(cli("adapters", "remove", "drop", "--yes", "--json"))["removed"]
    assert removed == ["drop"]
    assert not (workspace / "adapters" / "drop").exists()
    assert not any(r["active"] for r in out_json(cli("adapters", "list", "--json")))
    assert cli("adapters", "remove", "drop", "--yes").exit_code == 3
    assert [(r["name"], r["state"]) for r in out_json(cli("adapters", "list", "--json"))] == [("keep", "ok")]
    assert not [p for p in (workspace / "adapters").iterdir() if p.name.startswith(".trash-")]


# ----------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", "..", "x" * 101, "/abs"])
def test_names_that_escape_the_workspace_are_refused(cli, workspace, bad):
    make_adapter(workspace, "fine")
    (workspace.parent / "escape").mkdir(exist_ok=True)
    for args in (["show", bad], ["load", bad], ["remove", bad, "--yes"], ["rename", "fine", bad],
                 ["rename", bad, "fine2"], ["verify", bad], ["export", bad, str(workspace.parent / "out")]):
        result = cli("adapters", *args)
        assert result.exit_code == 2, (args, result.output)
    assert (workspace.parent / "escape").is_dir() and (workspace / "adapters" / "fine").is_dir()
    assert not (workspace.parent / "out").exists()


def test_symlinked_and_odd_folders_are_broken_and_removable(cli, workspace, tmp_path):
    outside = tmp_path / "outside"
    make_adapter(outside, "real")
    make_adapter(workspace, "fine")
    (workspace / "adapters" / "linked").symlink_to(outside / "adapters" / "real")
    (workspace / "adapters" / "has space").mkdir()
    rows = {r["name"]: r for r in out_json(cli("adapters", "list", "--json"))}
    assert rows["linked"]["state"] == "broken" and "symbolic link" in rows["linked"]["problem"]
    assert rows["has space"]["state"] == "broken"
    assert cli("adapters", "load", "linked").exit_code == 3
    assert out_json(cli("adapters", "remove", "linked", "--yes", "--json"))["removed"] == ["linked"]
    assert out_json(cli("adapters", "remove", "has space", "--yes", "--json"))["removed"] == ["has space"]
    assert (outside / "adapters" / "real" / MANIFEST).is_file(), "only the link went, not what it pointed to"


# ----------------------------------------------------------------------------- verify


def test_verify_checksums_and_base_modules(cli, workspace, trained_workspace, tiny_model):
    copy_adapter(trained_workspace, "chat-a", workspace)
    report = out_json(cli("adapters", "verify", "chat-a", "--json"))
    assert report["ok"] is True and report["adapters"][0]["problems"] == []

    base = str(tiny_model)
    make_adapter(workspace, "wrong-targets", base=base, targets=("q_proj", "nonexistent_proj"))
    make_adapter(workspace, "wrong-shape", base=base, width=128)
    make_adapter(workspace, "no-base", base="/models/absent")
    weights = workspace / "adapters" / "chat-a" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    result = cli("adapters", "verify", "--json")
    assert result.exit_code == 1
    reports = {r["name"]: r for r in json.loads(result.stdout)["adapters"]}
    assert reports["chat-a"]["problems"] == ["adapter_model.safetensors: sha256 differs from the manifest's"]
    assert any("nonexistent_proj not in the base model" in p for p in reports["wrong-targets"]["problems"])
    assert any("do not fit the base model" in p and "in=128" in p for p in reports["wrong-shape"]["problems"])
    assert reports["no-base"]["ok"] and "not available locally" in reports["no-base"]["notes"][0]

    human = cli("adapters", "verify", "wrong-shape")
    assert human.exit_code == 1 and "FAILED" in human.stdout
    assert cli("adapters", "verify", "no-base").exit_code == 0
    assert cli("adapters", "verify", "missing").exit_code == 3


def test_verify_refuses_manifest_paths_outside_the_adapter(cli, workspace):
    folder = make_adapter(workspace, "sneaky")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    report = json.loads(cli("adapters", "verify", "sneaky", "--json").stdout)["adapters"][0]
    assert any("outside the adapter folder" in p for p in report["problems"])


# ----------------------------------------------------------------------------- crashes and concurrency


def test_killed_training_run_is_never_listed_as_usable(cli, workspace, tiny_model):
    make_adapter(workspace, "done")
    proc = start_training(workspace, tiny_model, "killed", steps=400)
    staging = workspace / "adapters" / ".staging-killed"
    try:
        wait_for(lambda: logged_steps(staging) >= 1)
        rows = {r["name"]: r for r in out_json(cli("adapters", "list", "--json"))}
        assert rows["killed"]["state"] == "training" and rows["done"]["state"] == "ok"
        busy = cli("adapters", "remove", "killed", "--yes")
        assert busy.exit_code == 4 and "in progress" in busy.output
        assert out_json(cli("adapters", "remove", "--broken", "--yes", "--json"))["removed"] == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    rows = {r["name"]: r for r in out_json(cli("adapters", "list", "--json"))}
    assert rows["killed"]["state"] == "broken" and rows["done"]["state"] == "ok"
    assert cli("adapters", "load", "killed").exit_code == 3
    assert out_json(cli("adapters", "remove", "--broken", "--yes", "--json"))["removed"] == [".staging-killed"]
    assert [r["name"] for r in out_json(cli("adapters", "list", "--json"))] == ["done"]


def test_an_adapter_renamed_while_its_integrity_is_checked_is_not_found_rather_than_corrupt(workspace):
    from lqmf.core.errors import NotFoundError

    make_adapter(workspace, "moving")
    reg = registry(workspace)
    entry = reg.get("moving")
    entry.path.rename(entry.path.with_name("moved"))  # another process's rename, between lookup and check
    with pytest.raises(NotFoundError, match="renamed or removed while being checked"):
        reg.check_intact(entry)


def test_a_file_gone_while_it_is_read_for_the_integrity_check_is_not_found(workspace, monkeypatch):
    import lqmf.core.registry as registry_module
    from lqmf.core.errors import NotFoundError

    make_adapter(workspace, "moving")
    reg = registry(workspace)
    entry = reg.get("moving")

    def renamed_mid_read(name, folder, manifest, cache):  # the rename lands between listing and reading a file
        folder.rename(folder.with_name("moved"))
        raise FileNotFoundError(2, "No such file or directory", str(folder / "adapter_config.json"))

    monkeypatch.setattr(registry_module, "ensure_intact", renamed_mid_read)
    with pytest.raises(NotFoundError, match="renamed or removed while being checked"):
        reg.check_intact(entry)


def test_a_file_gone_between_its_stat_and_its_checksum_is_missing_not_an_error(workspace, monkeypatch):
    from lqmf.core import integrity

    folder = make_adapter(workspace, "racing")
    manifest = json.loads((folder / MANIFEST).read_text())

    def vanished(self, path, compute):  # a concurrent rename lands between the lstat and the hashing
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(integrity.ChecksumCache, "digest", vanished)
    problems = integrity.adapter_problems(folder, manifest, full=True)
    assert problems and all(problem.endswith(" is missing") for problem in problems)


def test_concurrent_switches_and_renames_leave_the_registry_consistent(workspace):
    switchers = [f"s{i}" for i in range(8)]
    renamed = [f"r{i}" for i in range(6)]
    for name in (*switchers, *renamed, "shared"):
        make_adapter(workspace, name)
    commands = ([["switch", n] for n in switchers] + [["rename", "shared", f"shared-{i}"] for i in range(6)]
                + [["switch", "shared"] for _ in range(3)] + [["rename", n, f"done-{n}"] for n in renamed])
    procs = [subprocess.Popen([sys.executable, "-m", "lqmf", "--workspace", str(workspace), "adapters", *cmd],
                              env=lqmf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outcomes = [(cmd, proc.communicate(timeout=180), proc.returncode)
                for cmd, proc in zip(commands, procs, strict=True)]
    assert len(procs) >= 20
    codes = {}
    for cmd, (_, err), code in outcomes:
        codes.setdefault(tuple(cmd[:2]), []).append(code)
        assert code in (0, 3), (cmd, code, err)
    assert all(code == 0 for cmd, _, code in outcomes if cmd[0] == "switch" and cmd[1] != "shared")
    assert all(code == 0 for cmd, _, code in outcomes if cmd[0] == "rename" and cmd[1] != "shared")
    assert sorted(codes[("rename", "shared")]) == [0, 3, 3, 3, 3, 3], "exactly one rename of 'shared' wins"

    entries = registry(workspace).entries()
    names = {e.name for e in entries}
    winner = [n for n in names if n.startswith("shared-")]
    assert len(winner) == 1
    assert names == {*switchers, *(f"done-{n}" for n in renamed), winner[0]}
    assert all(e.complete and e.manifest["name"] == e.name for e in entries)
    pointer = json.loads((workspace / "adapters" / ACTIVE_FILE).read_text())["active"]
    assert list(pointer) == [BASE_A] and pointer[BASE_A]["adapter"] in names
    leftovers = [p.name for p in (workspace / "adapters").iterdir() if p.name.startswith((".trash-", ".active.json."))]
    assert leftovers == []


# ----------------------------------------------------------------------------- startup cost


def test_registry_verbs_do_not_import_torch(workspace):
    make_adapter(workspace, "a1")
    ws = ["--workspace", str(workspace), "adapters"]
    for args in (["list", "--json"], ["list"], ["show", "a1"], ["show", "a1", "--json"], ["switch", "a1"]):
        heavy = {"torch", "transformers", "peft", "bitsandbytes", "datasets"} & modules_after(ws + args)
        assert not heavy, f"lqmf adapters {' '.join(args)} imported {heavy}"
