"""Config schema, files, precedence and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lqmf.core import config as cfg
from lqmf.core.errors import InputError, NotFoundError
from tests.helpers import REPO


def test_seed_defaults():
    c = cfg.TrainConfig()
    assert (c.lora_r, c.per_device_train_batch_size) == (16, 2)
    # chosen from the data set's size at prepare time (core/schedule.py) unless set
    assert c.gradient_accumulation_steps is None and c.num_train_epochs is None
    assert c.use_4bit_quantization and c.use_gradient_checkpointing


def test_task_dependent_learning_rate_default():
    chat = cfg.resolve_config({}, {"base_model": "m", "task_type": "chat", "dataset_path": "d"})
    cls = cfg.resolve_config({}, {"base_model": "m", "task_type": "classification", "dataset_path": "d"})
    cfg.check_complete(chat)
    cfg.check_complete(cls)
    assert chat.learning_rate == 2e-4 and cls.learning_rate == 1e-3
    assert chat.head_learning_rate is None and cls.head_learning_rate == 1e-2


def test_precedence_defaults_file_options(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 32\nlearning_rate: 1e-4\nnum_train_epochs: 5\n")
    file_values = cfg.read_config_file(path)
    overrides = {"lora_r": 8, **cfg.parse_set_options(["num_train_epochs=2"])}
    resolved = cfg.resolve_config(file_values, overrides)
    assert resolved.lora_r == 8  # option beats file
    assert resolved.num_train_epochs == 2.0  # --set beats file
    assert resolved.learning_rate == 1e-4  # file beats default
    assert resolved.lora_alpha == 32  # default


def test_unknown_key_names_closest(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 32\n")
    with pytest.raises(InputError, match=r"unknown key 'lora_rank'.*did you mean 'lora_r'"):
        cfg.read_config_file(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("lora_r: many\n", r"'lora_r' must be an integer"),
        ("lora_r: 0\n", r"'lora_r' must be from 1 to"),
        ("num_train_epochs: .nan\n", r"'num_train_epochs' must be a finite number"),
        ("num_train_epochs: .inf\n", r"'num_train_epochs' must be a finite number"),
        ("learning_rate: .nan\n", r"'learning_rate' must be a finite number"),
        ("learning_rate: 5\n", r"'learning_rate' must be greater than 0 and at most 1"),
        ("max_steps: -5\n", r"'max_steps' must be -1 \(train num_train_epochs\) or from 1"),
        ("max_steps: 0\n", r"'max_steps' must be -1"),
        ("warmup_ratio: -0.1\n", r"'warmup_ratio' must be in \[0, 1\)"),
        ("max_grad_norm: .inf\n", r"'max_grad_norm' must be a finite number"),
        ("per_device_train_batch_size: 1000000\n", r"'per_device_train_batch_size' must be from 1 to"),
        ("seed: -1\n", r"'seed' must be from 0"),
        ("use_4bit_quantization: maybe\n", r"must be true or false"),
        ("task_type: chatt\n", r"unknown task 'chatt'.*did you mean 'chat'"),
        ("lr_scheduler_type: cosin\n", r"did you mean 'cosine'"),
        ("lora_dropout: 1.5\n", r"'lora_dropout' must be in \[0, 1\)"),
        ("target_modules: []\n", r"must not be an empty list"),
        ("job_name: ../escape\n", r"'job_name'"),
        ("- just a list\n", r"expected a mapping"),
        ("lora_r: [1\n", r"line"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, pattern: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=pattern) as info:
        cfg.read_config_file(path)
    assert str(path) in info.value.message


def test_seed_json_config_is_accepted(tmp_path: Path):
    """The guide's JSON example loads as written."""
    path = tmp_path / "custom.json"
    path.write_text("""{
      "job_name": "custom_finance_model", "base_model": "mistral-7b", "task_type": "chat",
      "dataset_path": "./data/finance_chat.csv", "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.05,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learning_rate": 1e-4,
      "num_train_epochs": 5, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16
    }""")
    resolved = cfg.resolve_config(cfg.read_config_file(path), {})
    assert resolved.lora_r == 32 and resolved.gradient_accumulation_steps == 16


def test_set_option_errors():
    with pytest.raises(InputError, match="expected key=value"):
        cfg.parse_set_options(["lora_r"])
    with pytest.raises(InputError, match="did you mean 'lora_alpha'"):
        cfg.parse_set_options(["lora_alpah=3"])


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(NotFoundError):
        cfg.read_config_file(tmp_path / "nope.yaml")


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ ships at least one YAML file"
    for path in files:
        if path.name == "models.yaml":
            from lqmf.core.models import _read_yaml

            _read_yaml(path)
        else:
            cfg.resolve_config(cfg.read_config_file(path), {})


def test_config_cli_create_show_validate(cli, workspace):
    created = cli("config", "create", "finance", "--task", "instruction", "--model", "mistral-7b")
    assert created.exit_code == 0, created.output
    path = workspace / "configs" / "finance.yaml"
    text = path.read_text()
    assert "# LoRA rank" in text and "lora_r: 16" in text
    assert yaml.safe_load(text)["task_type"] == "instruction_following"
    assert cli("config", "create", "finance").exit_code == 4  # exists
    shown = cli("config", "show", "finance", "--json")
    assert shown.exit_code == 0
    import json

    assert json.loads(shown.stdout)["base_model"] == "mistral-7b"
    assert cli("config", "validate", "finance").exit_code == 0
    path.write_text(text + "lora_alpah: 3\n")
    bad = cli("config", "validate", "finance")
    assert bad.exit_code == 2 and "did you mean 'lora_alpha'" in bad.output
    assert cli("config", "show", "missing").exit_code == 3


def test_config_edit_uses_editor(cli, workspace, monkeypatch, tmp_path):
    script = tmp_path / "editor.sh"
    script.write_text("#!/bin/sh\nsed -i 's/^lora_r: 16/lora_r: 64/' \"$1\"\n")
    script.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(script))
    result = cli("config", "edit", "mine")
    assert result.exit_code == 0, result.output
    assert cfg.read_config_file(workspace / "configs" / "mine.yaml")["lora_r"] == 64


@pytest.mark.parametrize("option", [["--max-steps", "-5"], ["--lr", "nan"], ["--epochs", "inf"],
                                    ["--set", "num_train_epochs=nan"], ["--set", "eval_steps=-2"]])
def test_cli_refuses_bad_numbers_before_loading(cli, workspace, option):
    """Regression: these were accepted (or failed only after the model loaded)."""
    result = cli("train", "no-such-model", "no-such.csv", "chat", *option)
    assert result.exit_code == 2, result.output
    key = {"--max-steps": "max_steps", "--lr": "learning_rate", "--epochs": "num_train_epochs"}.get(
        option[0], option[1].split("=")[0])
    assert f"'{key}'" in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_strategy_steps_needs_eval_steps():
    config = cfg.resolve_config({}, {"base_model": "m", "task_type": "chat", "dataset_path": "d.csv",
                                     "eval_strategy": "steps"})
    with pytest.raises(InputError, match="eval_strategy=steps needs eval_steps"):
        cfg.check_complete(config)
