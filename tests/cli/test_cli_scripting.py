"""The guide's words at the top level, `lqmf help`, --json on every verb, JSON errors, completion, plan's exit code."""

from __future__ import annotations

import json

import pytest
import typer

from lqmf.cli.app import VERBS, app, load_verb

GUIDE_LINES = [
    (["finetune", "mistral-7b", "data.csv", "chat"], "lqmf train mistral-7b data.csv chat"),
    (["list", "adapters"], "lqmf adapters list"),
    (["list", "models"], "lqmf models list"),
    (["load", "adapter", "finance-style"], "lqmf adapters load finance-style"),
    (["unload", "adapter"], "lqmf adapters unload"),
    (["switch", "adapter", "legal-style"], "lqmf adapters switch legal-style"),
    (["benchmark", "finance-style", "prompts.txt"], "lqmf bench finance-style prompts.txt"),
    (["list"], "lqmf adapters list` or `lqmf models list"),
    (["clear"], "lqmf shell"),
]


@pytest.mark.parametrize(("words", "hint"), GUIDE_LINES)
def test_guide_words_name_the_verb_in_one_line(cli, workspace, words, hint):
    result = cli(*words)
    assert result.exit_code == 2
    assert hint in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_a_typo_is_one_line_with_the_closest_verb(cli, workspace):
    result = cli("trian")
    assert result.exit_code == 2 and "did you mean 'train'" in result.stderr and result.stderr.count("\n") == 1


def test_a_verb_group_builds_only_the_subcommand_named(cli, workspace):
    group = load_verb("adapters")
    assert not group.commands and group.list_commands(None)[:3] == ["list", "show", "load"]
    assert group.get_command(None, "list").name == "list" and list(group.commands) == ["list"]
    typo = cli("adapters", "lst")  # Typer's suggestion still sees every subcommand
    assert typo.exit_code == 2 and "No such command 'lst'. Did you mean 'list'?" in typo.stderr


def test_help_verb(cli, workspace):
    assert cli("help").stdout == cli("--help").stdout
    shown = cli("help", "adapters", "list")
    assert shown.exit_code == 0 and "Usage: lqmf adapters list" in shown.stdout and "--task" in shown.stdout
    assert "Usage: lqmf train" in cli("help", "finetune").stdout  # the guide's word for it
    assert "Usage: lqmf adapters load" in cli("help", "load", "adapter").stdout
    missing = cli("help", "frobnicate")
    assert missing.exit_code == 2 and "no command 'frobnicate'" in missing.stderr


def test_every_verb_takes_json():
    """Every command under every verb has a --json option."""
    missing = []
    for name in VERBS:
        command = load_verb(name)
        groups = hasattr(command, "list_commands")  # a group builds each subcommand when asked for it
        for sub_name in command.list_commands(None) if groups else [name]:
            sub = command.get_command(None, sub_name) if groups else command
            if not any("--json" in param.opts for param in sub.params):
                missing.append(f"{name} {sub_name}")
    assert not missing, f"no --json on: {missing}"


def test_json_errors_carry_the_exit_code(cli, workspace):
    for args, code in ((["adapters", "show", "nope", "--json"], 3),   # an LqmfError in the command
                       (["adapters", "show", "--json"], 2),           # a usage error before it runs
                       (["finetune", "x", "--json"], 2),              # a guide word
                       (["config", "show", "nope", "--json"], 3)):
        result = cli(*args)
        assert result.exit_code == code, (args, result.output)
        error = json.loads(result.stdout)
        assert error["exit_code"] == code and error["error"], args
        assert result.stderr == ""


def test_errors_without_json_stay_one_line_on_stderr(cli, workspace):
    result = cli("adapters", "show", "nope")
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.startswith("error: adapter 'nope' not found") and result.stderr.count("\n") == 1


def test_json_on_config_and_models_verbs(cli, workspace, monkeypatch):
    created = json.loads(cli("config", "create", "mine", "--task", "chat", "--json").stdout)
    assert created["name"] == "mine" and (workspace / "configs" / "mine.yaml").is_file()
    assert created["path"] == str(workspace / "configs" / "mine.yaml")
    monkeypatch.setenv("EDITOR", "true")
    edited = json.loads(cli("config", "edit", "other", "--json").stdout)
    assert edited == {"path": str(workspace / "configs" / "other.yaml"), "created": True, "valid": True}
    added = json.loads(cli("models", "add", "local", str(workspace), "--json").stdout)
    assert added == {"alias": "local", "source": str(workspace), "file": str(workspace / "configs" / "models.yaml")}
    clash = cli("models", "add", "local", str(workspace), "--json")
    assert clash.exit_code == 4 and json.loads(clash.stdout)["exit_code"] == 4


def test_make_tiny_json(cli, workspace):
    result = cli("models", "make-tiny", "tiny", "--alias", "t", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"path": str(workspace / "tiny"), "alias": "t"}


def test_shell_completion(cli, run_lqmf, workspace):
    # A fresh process, as the user's shell runs it. `--show-completion` detects the calling shell (sh under
    # make, which Typer does not support), so the script for a named shell comes from click's source_SHELL.
    script = run_lqmf(env={"_LQMF_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_LQMF_COMPLETE=complete_bash" in script.stdout, script.stderr
    verbs = run_lqmf(env={"_LQMF_COMPLETE": "complete_bash", "COMP_WORDS": "lqmf adap", "COMP_CWORD": "1"})
    assert verbs.stdout.split() == ["adapters"]
    subcommands = run_lqmf(env={"_LQMF_COMPLETE": "complete_bash", "COMP_WORDS": "lqmf adapters s",
                                "COMP_CWORD": "2"})
    assert subcommands.stdout.split() == ["show", "switch"]


def test_plan_exits_5_when_nothing_fits(cli, workspace):
    fits = cli("plan", "mistral-7b", "--max-memory", "8GB")
    assert fits.exit_code == 0 and "fits" in fits.stdout
    nothing = cli("plan", "mistral-7b", "--no-4bit", "--max-memory", "8GB")
    assert nothing.exit_code == 5 and "largest micro-batch at 512 tokens: none" in nothing.stdout
    report = cli("plan", "mistral-7b", "--max-memory", "3GB", "--json")
    assert report.exit_code == 5
    assert json.loads(report.stdout)["largest_micro_batch"] == 0


def test_app_is_a_typer_app():
    assert isinstance(app, typer.Typer)
