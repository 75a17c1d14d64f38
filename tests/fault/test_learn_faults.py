"""`lqmf learn` under kills: the active adapter stays, no half version is registered, and the next run
learns as if the killed one never happened."""

from __future__ import annotations

import json
import signal

import pytest

from lqmf.core import learning
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from tests.helpers import run_forked

LEARN = ["learn", "chat-a", "--epochs", "1", "--hold-out", "0", "--max-drop", "1"]


def _corrections(root, count: int = 6) -> None:
    ws = Workspace.resolve(root)
    log = learning.completions_log(ws)
    for i in range(count):
        log.append(learning.completion_record(f"c{i}", "chat-a", "chat", "chat",
                                              [{"role": "user", "content": f"Where is my order {i}?"}], "No idea."))
    learning.add_feedback(ws, [{"id": f"c{i}", "correction": "It ships tomorrow."} for i in range(count)])


@pytest.mark.parametrize(("point", "signame"), [("learn.trained", "SIGKILL"), ("learn.before_finalize", "SIGKILL"),
                                                ("learn.trained", "SIGTERM")])
def test_kill_during_learn_changes_nothing(adapters_workspace, cli, point, signame):
    root = adapters_workspace
    assert cli("adapters", "load", "chat-a").exit_code == 0
    _corrections(root)
    run = run_forked(LEARN, root, fault=f"{point}:{signame}")
    if signame == "SIGKILL":
        assert run.returncode == -signal.SIGKILL, run.stderr
    else:
        line = run.assert_clean_error(143)
        assert "nothing registered, the active adapter is unchanged" in line
    registry = Registry(Workspace.resolve(root))
    assert not registry.exists("chat-a-v2")
    assert [p["adapter"] for p in registry.active_pointers().values()] == ["chat-a"]
    listed = {row["name"]: row for row in json.loads(cli("adapters", "list", "--json").stdout)}
    assert listed.get("chat-a-v2", {}).get("state") != "ready"
    assert len(learning.pending_feedback(Workspace.resolve(root), learning.family_members(registry, "chat-a"))) == 6
    again = run_forked([*LEARN, "--json"], root)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["version"] == "chat-a-v2"
    assert registry.get_intact("chat-a-v2").manifest["lineage"]["parent"] == "chat-a"
    assert not registry.staging_path("chat-a-v2").exists()
