"""`lqmf shell`: the guide's command lines in one process, piped and on a terminal."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

import pytest
import typer

from lqmf.cli.app import app
from lqmf.cli.shell_cmd import LqmfShell
from lqmf.core.workspace import Workspace
from tests.helpers import copy_adapter, lqmf_env, run_shell


def json_documents(text: str) -> list:
    """The JSON values printed one after another."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        documents.append(value)
    return documents


def test_piped_guide_lines_without_a_model(adapters_workspace):
    script = "# the guide's words and lqmf's\nlist adapters\nfrobnicate\nhelp load adapter\n\nadapters show chat-a\n"
    result = run_shell(adapters_workspace, script)
    assert result.returncode == 2  # the exit code of the line that failed
    assert "FT>" not in result.stdout and "FT>" not in result.stderr
    assert result.stdout.index("chat-a") < result.stdout.index("Usage: lqmf adapters load")
    assert "name" in result.stdout.splitlines()[0] and "base model" in result.stdout.splitlines()[0]
    assert result.stderr.splitlines() == ["error: no command 'frobnicate'; lqmf --help lists them"]
    shown = result.stdout.split("Usage: lqmf adapters load")[1]  # adapters show ran after the error and the help
    assert "chat-a" in shown and "lora" in shown


def test_stop_on_error(adapters_workspace):
    result = run_shell(adapters_workspace, "adapters show nope\nlist adapters\n", "--stop-on-error")
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.startswith("error: adapter 'nope' not found") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_load_adapter_then_test_reuses_the_loaded_model(adapters_workspace, cli):
    copy_adapter(adapters_workspace, "chat-a", adapters_workspace, as_name="chat-b")  # the same base and task
    script = "\n".join([
        "load adapter chat-a",
        'test chat-a "What is AI?" --max-new-tokens 4',
        'test chat-b "What is AI?" --max-new-tokens 4',
        'test chat-a "What is AI?" --max-new-tokens 4',
        "frobnicate",
        "list adapters",
        "unload adapter",
        'test chat-a "What is AI?" --max-new-tokens 4',
    ]) + "\n"
    result = run_shell(adapters_workspace, script, "--json")
    assert result.returncode == 2, result.stderr
    loaded, first, other, again, error, listing, unloaded, reloaded = json_documents(result.stdout)
    assert loaded["adapter"] == "chat-a" and loaded["server"] is None
    assert error == {"error": "no command 'frobnicate'; lqmf --help lists them", "exit_code": 2}
    assert [row["name"] for row in listing if row["active"]] == ["chat-a"]
    assert unloaded["unloaded"][0]["adapter"] == "chat-a"
    phases = [line for line in result.stderr.splitlines() if "load" in line]
    assert phases[0] == "loading chat-a into this shell for test and benchmark ..."
    reuse = [line for line in phases if line.startswith("reusing the model loaded in this process")]
    # the three tests after `load adapter` load nothing: chat-b joins chat-a on the base already loaded
    assert [line.rsplit("(", 1)[1] for line in reuse] == ["1 load, 1 reuse)", "1 load, 2 reuses)",
                                                          "1 load, 3 reuses)"]
    assert "tiny-llama with chat-a, chat-b" in reuse[1]
    assert len(reuse) == 3, "the test after `unload adapter` loads the model afresh"
    one_shot = json.loads(cli("test", "chat-a", "What is AI?", "--max-new-tokens", "4", "--json").stdout)
    assert first["answer"] == again["answer"] == reloaded["answer"] == one_shot["answer"]
    assert other["adapter"] == "chat-b" and other["answer"] == first["answer"]  # a copy of chat-a


def test_tab_completion(adapters_workspace):
    root = typer.main.get_command(app)
    shell = LqmfShell(Workspace(adapters_workspace), root.run_line, root, interactive=False, json_output=False,
                      stop_on_error=False)
    assert shell.completenames("fin") == ["finetune "]
    assert "adapters " in shell.completenames("a") and "clear " in shell.completenames("cl")

    def complete(line: str) -> list[str]:
        text = line.rsplit(" ", 1)[1]
        return shell.completedefault(text, line, len(line) - len(text), len(line))

    assert complete("list ") == ["adapters ", "feedback ", "models "]
    assert complete("adapters s") == ["show ", "switch "]
    assert complete("load adapter ch") == complete("test ch") == ["chat-a ", "chat-q "]
    assert {"mistral-7b ", "mistral-7b-instruct "} <= set(complete("finetune mistral"))
    assert complete("adapters list --j") == ["--json "]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal as on Linux")
def test_terminal_prompt_history_ctrl_c_and_ctrl_d(adapters_workspace):
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: lqmf shell on the pseudo-terminal, Ctrl-C delivered as in a terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(adapters_workspace)
        env = lqmf_env({"LQMF_HOME": str(adapters_workspace)})
        os.execve(sys.executable, [sys.executable, "-m", "lqmf", "shell"], env)

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        seen, end = b"", time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([terminal], [], [], 0.2)[0]:
                seen += os.read(terminal, 4096)
        assert marker in seen, seen
        return seen

    try:
        read_until(b"FT> ")
        os.write(terminal, b"list adap\t")
        read_until(b"list adapters ")
        os.write(terminal, b"\n")
        assert b"chat-a" in read_until(b"FT> ")
        os.write(terminal, b"adapters show chat\x03")  # Ctrl-C cancels the line being typed
        read_until(b"FT> ")
        os.write(terminal, b"\x04")  # Ctrl-D leaves
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0
    history = (adapters_workspace / ".lqmf" / "shell_history").read_text().splitlines()
    assert history == ["list adapters "]
