"""The CLI skeleton: help, version, exit codes, and no torch import on the light verbs."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, lqmf_env

VERBS = ["train", "adapters", "bench", "export", "status", "models", "config", "test", "serve"]


def test_help_lists_every_verb_group(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("lqmf ")


def _modules_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lqmf.cli.app import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=lqmf_env(), cwd=REPO, capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


def test_help_and_models_list_do_not_import_torch():
    for args in (["--help"], ["models", "list"], ["models", "list", "--json"], ["config", "show", "--help"]):
        loaded = _modules_after(args)
        heavy = {"torch", "transformers", "peft", "bitsandbytes", "datasets"} & loaded
        assert not heavy, f"lqmf {' '.join(args)} imported {heavy}"


def test_unknown_command_is_a_usage_error(cli):
    result = cli("frobnicate")
    assert result.exit_code == 2
