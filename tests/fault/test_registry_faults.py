"""Registry writes and exports under kills, and concurrent mutations of one registry."""

from __future__ import annotations

import json
import os
import signal

import pytest

from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from tests.helpers import finished_ok, run_forked, snapshot, start_forked


def listing(workspace) -> list[tuple[str, str]]:
    registry = Registry(Workspace(workspace))
    return [(row["name"], row["state"]) for row in map(registry.summary, registry.entries())]


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_kill_while_removing(fault_ws, signame):
    run_forked(["adapters", "load", "good"], fault_ws)
    run = run_forked(["adapters", "remove", "good", "--yes"], fault_ws, fault=f"remove.trashed:{signame}")
    assert run.returncode == -getattr(signal, signame)
    assert listing(fault_ws) == []  # gone as a whole, not half
    assert not Registry(Workspace(fault_ws)).active_pointers()
    assert run_forked(["adapters", "remove", "--broken", "--yes"], fault_ws).returncode == 0
    assert not [p for p in (fault_ws / "adapters").iterdir() if p.name.startswith(".trash-")]


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_kill_while_renaming(fault_ws, signame):
    run = run_forked(["adapters", "rename", "good", "better"], fault_ws, fault=f"rename.moved:{signame}")
    assert run.returncode == -getattr(signal, signame)
    assert listing(fault_ws) == [("better", "ok")]
    assert finished_ok(fault_ws, "better")
    assert run_forked(["adapters", "show", "better"], fault_ws).returncode == 0


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_kill_while_exporting(fault_ws, tmp_path, signame, archive):
    target = tmp_path / ("out.tar.gz" if archive else "out")
    before = snapshot(fault_ws)
    run = run_forked(["export", "good", target, *(["--archive"] if archive else [])], fault_ws,
                     fault=f"export.written:{signame}")
    assert run.returncode == -getattr(signal, signame)
    assert not target.exists(), "no half export at the target"
    assert snapshot(fault_ws) == before
    assert leftovers(tmp_path), "the killed export left its hidden temporary"
    done = run_forked(["export", "good", target, *(["--archive"] if archive else []), "--json"], fault_ws)
    assert done.returncode == 0, done.stderr
    assert target.exists()
    assert leftovers(tmp_path) == [], "the next export removes what the killed one left"
    assert json.loads(done.stdout)["stale_removed"]


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".lqmf-tmp", ".lqmf-old")))


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_kill_while_replacing_an_export(fault_ws, tmp_path, signame):
    target = tmp_path / "out"
    assert run_forked(["export", "good", target], fault_ws).returncode == 0
    previous = sorted(p.name for p in target.iterdir())
    run = run_forked(["export", "good", target, "--force"], fault_ws, fault=f"export.old_moved_aside:{signame}")
    assert run.returncode == -getattr(signal, signame)
    assert not target.exists()
    [aside] = [name for name in leftovers(tmp_path) if name.endswith(".lqmf-old")]  # the previous export, whole
    assert sorted(p.name for p in (tmp_path / aside).iterdir()) == previous
    done = run_forked(["export", "good", target], fault_ws)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == previous and leftovers(tmp_path) == []
    assert "temporary file(s) left beside it by killed exports" in done.stderr


def test_an_export_keeps_the_temporaries_of_running_exports(fault_ws, tmp_path):
    from lqmf.core.fsutil import owner_tag

    live = tmp_path / f".out.{owner_tag()}.abc123.lqmf-tmp"  # this test process: alive
    unnamed = tmp_path / ".out.abc123.lqmf-tmp"  # says no owner: not ours to judge
    reused = tmp_path / f".out.{os.getpid()}p100.abc123.lqmf-tmp"  # this pid, but a process started in 1970
    for folder in (live, unnamed, reused):
        folder.mkdir()
    done = run_forked(["export", "good", tmp_path / "out", "--json"], fault_ws)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stale_removed"] == [reused.name]
    assert live.is_dir() and unnamed.is_dir() and not reused.exists()


def test_racing_removes_of_one_adapter(fault_ws):
    """Regression: the losers of a race to remove one adapter exited 0; the docs say 3."""
    children = [start_forked(["adapters", "remove", "good", "--yes"], fault_ws) for _ in range(6)]
    codes = sorted(child.wait(120).returncode for child in children)
    assert codes == [0, 3, 3, 3, 3, 3], codes
    assert listing(fault_ws) == []


ROUNDS = 3
ACTORS = 8


def test_concurrent_mutations_keep_the_registry_whole(fault_ws):
    """Processes renaming, activating, copying and removing adapters at once: every adapter ends
    complete or gone, never broken, duplicated or half-renamed; the active pointer stays valid."""
    import shutil

    adapters = fault_ws / "adapters"
    for i in range(ACTORS):
        shutil.copytree(adapters / "good", adapters / f"a{i}")
    mutations = 0
    for round_ in range(ROUNDS):
        children = []
        for i in range(ACTORS):
            name = f"a{i}" if round_ == 0 else f"a{i}-r{round_ - 1}" if i % 2 == 0 else f"a{i}"
            if i % 2 == 0:
                args = ["adapters", "rename", name, f"a{i}-r{round_}"]
            elif i % 4 == 1:
                args = ["adapters", "load", name]
            else:
                args = ["adapters", "remove", "good" if round_ == 0 else "a3", "--yes"]
            children.append(start_forked(args, fault_ws))
        for child in children:
            run = child.wait(120)
            assert run.returncode in (0, 3), run.stderr
            assert "Traceback" not in run.stderr
            mutations += 1
    states = listing(fault_ws)
    assert all(state == "ok" for _, state in states), states
    names = [name for name, _ in states]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(["a0-r2", "a1", "a2-r2", "a4-r2", "a5", "a6-r2", "a7"])
    active = json.loads((adapters / ".active.json").read_text())["active"]
    assert all(pointer["adapter"] in names for pointer in active.values())
    assert mutations == ROUNDS * ACTORS
