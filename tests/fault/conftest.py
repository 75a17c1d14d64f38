"""The fault suite forks `lqmf` from this process (tests/fault/forked.py); importing the heavy
libraries here once makes each forked run start at once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def warm_imports():
    from lqmf.engine.loading import quiet_libraries

    quiet_libraries()
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.optimization  # noqa: F401

    from lqmf.engine.train import loop as train  # noqa: F401


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory, tiny_model, warm_imports):
    """A workspace holding one small finished adapter, 'good', trained once for the suite."""
    from typer.testing import CliRunner

    from lqmf.cli.app import app
    from tests.helpers import train_args

    root = tmp_path_factory.mktemp("fault-trained")
    result = CliRunner().invoke(app, ["--workspace", str(root), *train_args(tiny_model, "good", "-q")])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def fault_ws(trained_once, tmp_path, monkeypatch):
    """A private copy of trained_once, also the current directory and $LQMF_HOME."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(trained_once, root)
    monkeypatch.setenv("LQMF_HOME", str(root))
    monkeypatch.chdir(root)
    return root


