"""The CLI skeleton: help, version, exit codes, and no torch import on the light verbs."""

from __future__ import annotations

from tests.helpers import modules_after

VERBS = ["train", "adapters", "bench", "export", "status", "models", "config", "test", "serve"]


def test_help_lists_every_verb_group(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("lqmf ")


def test_help_and_models_list_do_not_import_torch():
    for args in (["--help"], ["models", "list"], ["models", "list", "--json"], ["config", "show", "--help"]):
        loaded = modules_after(args)
        heavy = {"torch", "transformers", "peft", "bitsandbytes", "datasets"} & loaded
        assert not heavy, f"lqmf {' '.join(args)} imported {heavy}"


def test_unknown_command_is_a_usage_error(cli):
    result = cli("frobnicate")
    assert result.exit_code == 2
