"""CPU memory figures, catalogue models in --dry-run offline, deterministic auto-names."""

from __future__ import annotations

import json

from tests.helpers import EXAMPLES


def test_cpu_estimate_counts_the_process_and_max_memory_applies(cli, workspace, minilm):
    data = EXAMPLES / "sentiment.csv"
    plan = cli("train", "minilm", data, "classification", "--device", "cpu", "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    estimate = json.loads(plan.stdout)["memory"]["estimate"]
    baseline = estimate["details"]["process_baseline_gb"]
    assert baseline > 0.05  # python + torch + transformers are in this process already
    assert estimate["total_gb"] >= baseline + estimate["weights_gb"]
    tight = cli("train", "minilm", data, "classification", "--device", "cpu", "--dry-run", "--max-memory", "1.5MB")
    assert tight.exit_code != 0
    assert "more than the 1.5 MB of max_memory" in tight.stderr and "Traceback" not in tight.output


def test_catalogue_model_dry_run_offline_names_what_is_missing(cli, workspace):
    result = cli("train", "mistral-7b", EXAMPLES / "chat_training.csv", "chat", "--dry-run")
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'mistral-7b' (mistralai/Mistral-7B-v0.1) is not in the Hugging Face cache" in \
        errors[0] and "lqmf plan mistral-7b" in errors[0]  # offline (HF_HUB_OFFLINE): said before torch loads


def test_auto_name_is_shared_by_dry_run_and_run(cli, workspace, tiny_model):
    data = EXAMPLES / "chat_training.csv"
    common = ["train", tiny_model, data, "chat", "--max-steps", "1", "--max-seq-length", "64", "--no-4bit"]
    announced = json.loads(cli(*common, "--dry-run", "--json").stdout)["adapter"]
    assert announced == json.loads(cli(*common, "--dry-run", "--json").stdout)["adapter"]
    trained = cli(*common, "-q")
    assert trained.exit_code == 0, trained.output
    assert trained.stdout.strip() == announced
    again = json.loads(cli(*common, "--dry-run", "--json").stdout)["adapter"]
    assert again == f"{announced}-2"
