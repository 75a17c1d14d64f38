"""Issue 22's cases, one test each: what a new user following the guide hit (cases numbered as in the issue)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import EXAMPLES, REPO, lqmf_env, run_shell

FAST = ["--max-seq-length", "256", "--batch-size", "4", "--grad-accum", "2", "--lr", "5e-3", "-q"]


def manifest(workspace, name: str) -> dict:
    return json.loads((workspace / "adapters" / name / "lqmf.json").read_text())


def _evals(workspace, name: str) -> list[dict]:
    log = workspace / "adapters" / name / "metrics.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "eval"]


def test_3_a_run_cut_between_evaluations_evaluates_its_final_weights(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "cut", "--max-steps", "3",
                 "--no-4bit", "--set", "eval_strategy=steps", "--set", "eval_steps=2", *FAST)
    assert result.exit_code == 0, result.output
    evals = _evals(workspace, "cut")
    assert [r["step"] for r in evals] == [0, 2, 3]  # before training, every 2 steps, and the shipped weights
    assert manifest(workspace, "cut")["metrics"]["eval_loss"] == evals[-1]["eval_loss"]


def test_11_resume_below_the_checkpoint_step_is_refused(workspace, tiny_model, run_lqmf):
    args = ["train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "over", "--max-steps", "3",
            "--no-4bit", *FAST]
    killed = run_lqmf(*args, cwd=workspace, env={"LQMF_FAULT_AT": "train.final_checkpoint"})
    assert killed.returncode != 0 and (workspace / "adapters" / ".staging-over" / "checkpoint").is_dir()
    refused = run_lqmf("train", "--resume", "over", "--max-steps", "2", cwd=workspace)
    assert refused.returncode == 2, refused.stderr
    assert "is at step 3, past this run's 2 steps" in refused.stderr and "Traceback" not in refused.stderr
    assert (workspace / "adapters" / ".staging-over" / "checkpoint").is_dir()  # nothing lost: resume still works
    finished = run_lqmf("train", "--resume", "over", cwd=workspace)
    assert finished.returncode == 0, finished.stderr
    assert manifest(workspace, "over")["metrics"]["steps"] == 3




# ------------------------------------------------------------------ 1, 7: the guide's FT> lines in lqmf shell

def test_1_clear_and_an_eof_line_do_not_end_the_shell(adapters_workspace):
    result = run_shell(adapters_workspace, "clear\nEOF\nFT> adapters list\n")
    assert "chat-a" in result.stdout  # the lines after `clear` and `EOF` ran
    assert result.returncode == 2 and result.stderr.splitlines() == ["error: no command 'EOF'; lqmf --help lists them"]


def test_7_shell_help_lists_the_guide_words(adapters_workspace):
    result = run_shell(adapters_workspace, "FT> help\n")
    assert result.returncode == 0, result.stderr
    for words in ("finetune", "list adapters", "load adapter", "switch adapter", "unload adapter", "benchmark",
                  "export adapter", "test NAME", "clear", "exit", "config"):
        assert f"\n  {words}" in result.stdout, words


GUIDE_WALKTHROUGH = """\
FT> finetune {tiny} {chat} chat --name support-chat --max-steps 1 --no-4bit --max-seq-length 128
FT> load adapter support-chat
FT> benchmark support-chat prompts.txt --max-new-tokens 2 --eval-limit 2 --warmup 0
FT> config create my_training
FT> config edit my_training
FT> load adapter chat-a
FT> switch adapter chat-q
FT> benchmark chat-a prompts.txt --max-new-tokens 2 --eval-limit 2 --warmup 0
FT> config create small_batch
FT> status
FT> list adapters
FT> list models
FT> test chat-a "How do I return an item?" --max-new-tokens 2
FT> benchmark sent prompts.txt --eval-limit 4 --warmup 0
FT> export adapter sent ./production/
FT> unload adapter
FT> clear
FT> help
"""


@pytest.mark.slow
def test_7_the_guides_walkthrough_pasted_with_its_prompts(adapters_workspace, tiny_model):
    (adapters_workspace / "prompts.txt").write_text("How do I return an item?\n")
    script = GUIDE_WALKTHROUGH.format(tiny=tiny_model, chat=EXAMPLES / "chat_training.csv")
    result = run_shell(adapters_workspace, script, "--stop-on-error", env={"EDITOR": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (adapters_workspace / "adapters" / "support-chat" / "lqmf.json").is_file()
    assert (adapters_workspace / "configs" / "my_training.yaml").is_file()
    assert (adapters_workspace / "production" / "sent" / "lqmf.json").is_file()
    assert "The guide's words" in result.stdout  # help, the last line, ran


def test_7_export_adapter_at_the_top_level_gets_the_verb_to_type(cli, adapters_workspace):
    result = cli("export", "adapter", "chat-a", "./production/")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: `lqmf export adapter chat-a ./production/` is the guide's spelling: did "
                                     "you mean `lqmf export chat-a ./production/`?")


def test_7_config_edit_without_editor_uses_the_systems(cli, workspace, monkeypatch, tmp_path):
    editor = tmp_path / "bin" / "nano"
    editor.parent.mkdir()
    editor.write_text("#!/bin/sh\necho edited-by-nano >> \"$1.log\"\n")
    editor.chmod(0o755)
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("PATH", str(editor.parent))
    result = cli("config", "edit", "mine")
    assert result.exit_code == 0, result.output
    assert (workspace / "configs" / "mine.yaml.log").read_text() == "edited-by-nano\n"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = cli("config", "edit", "mine")
    assert result.exit_code == 2 and "no editor found: set $EDITOR" in result.stderr


def test_7_config_show_fills_the_task_learning_rates(cli, workspace):
    assert cli("config", "create", "c", "--task", "classification").exit_code == 0
    shown = json.loads(cli("config", "show", "c", "--json").stdout)
    assert shown["learning_rate"] == 1e-3 and shown["head_learning_rate"] == 1e-2
    text = cli("config", "show", "c").stdout
    assert text.rstrip().splitlines()[-1] == ("# chosen when training starts: gradient_accumulation_steps from the "
                                              "data set's size (the small-data schedule); num_train_epochs from "
                                              "the data set's size (the small-data schedule)")


# ------------------------------------------------------------------ 4, 5, 6: offline, the estimate, Python imports

def test_4_offline_a_model_not_in_the_cache_fails_at_once(workspace, run_lqmf, tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # a closed port: refused at once
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lqmf", "train", "mistral-7b", EXAMPLES / "chat_training.csv",
                             "chat", "--dry-run"], cwd=workspace, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in lqmf_env(env).items()
                                 if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")})
    assert time.monotonic() - started < 20  # the hub client's retries took about 50 s
    assert result.returncode == 5
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 'mistral-7b' (mistralai/Mistral-7B-v0.1) is not in the Hugging Face cache and cannot be downloaded: "
        "127.0.0.1:9 cannot be reached (Connection refused); connect and retry, or give a local folder (offline, "
        "`lqmf plan mistral-7b` estimates memory from the catalogue's shape)")


def test_5_the_dry_run_estimate_is_within_2x_of_the_run(workspace, tiny_model, run_lqmf):
    args = ["train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "timed", "--max-steps", "24",
            "--no-4bit", "--max-seq-length", "128"]
    plan = json.loads(run_lqmf(*args, "--dry-run", "--json", cwd=workspace, env={"LQMF_DRY_RUN_PROBE": "1"}).stdout)
    assert plan["estimate"]["source"].endswith("training steps timed on this machine")
    started = time.monotonic()
    assert run_lqmf(*args, "-q", cwd=workspace).returncode == 0
    took = time.monotonic() - started
    assert took / 2 <= plan["estimated_seconds"]["this machine"] <= took * 2, (plan["estimate"], took)


def test_6_the_guides_benchmark_agent_returns_nothing_on_no_match(workspace):
    from lqmf.agents.benchmark_agent import BenchmarkAgent

    agent = BenchmarkAgent()
    assert agent.load_benchmark_results("finance*") == []
    assert "adapter" in agent.compare_models([])


def test_6_the_readme_gives_a_working_import_for_each_of_the_guides():
    rows = [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| `from ") and "import" in line]
    guide = {"from utils.memory_optimizer import MemoryOptimizer", "from agents.benchmark_agent import BenchmarkAgent"}
    assert {row.split("`")[1] for row in rows} == guide
    for row in rows:
        for statement in row.split("|")[2].split("`")[1::2]:
            exec(statement, {})  # noqa: S102 - the README's own import lines


# ------------------------------------------------------------------ 8, 9, 10: output and messages

def test_8_make_tiny_prints_only_the_path(workspace, run_lqmf):
    result = run_lqmf("models", "make-tiny", "tiny", cwd=workspace)
    assert result.returncode == 0 and result.stdout == f"{workspace / 'tiny'}\n"


def test_8_demo_script_puts_a_relative_workspace_beside_the_caller(tmp_path):
    stub = tmp_path / "lqmf-stub"
    stub.write_text("#!/bin/sh\necho \"$LQMF_HOME\"\n")
    stub.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    for given, expected in (("demo-ws", caller / "demo-ws"), (str(tmp_path / "abs-ws"), tmp_path / "abs-ws")):
        result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), given], cwd=caller, text=True,
                                capture_output=True, env={**lqmf_env(), "LQMF": str(stub)}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"workspace: {expected})" in result.stdout and expected.is_dir()
        assert str(expected) in result.stdout.splitlines()[2]


def test_9_merge_json_prints_no_phase_line(cli, adapters_workspace):
    result = cli("export", "chat-a", "merged/", "--merge", "--json")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict)
    assert result.stderr == ""  # no "merging ..." line, no phases


def test_9_compress_prints_no_dataset_progress_bars(cli, adapters_workspace):
    result = cli("adapters", "compress", "sent", "--rank", "4", "--name", "sent4")
    assert result.exit_code == 0, result.output
    assert "Casting the dataset" not in result.stderr and "%|" not in result.stderr


def test_10_an_unknown_task_lists_the_four(cli, workspace):
    result = cli("train", "minilm", EXAMPLES / "sentiment.csv", "nonsense", "--dry-run")
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: the TASK argument: unknown task 'nonsense'; choose one of chat, instruction_following, "
        "classification, summarization")


def test_10_unknown_options_get_only_close_suggestions(cli, workspace):
    far = cli("adapters", "list", "--bogus")
    assert far.exit_code == 2 and "Possible options" not in far.output and "No such option: --bogus" in far.output
    near = cli("adapters", "list", "--jsn")
    assert near.exit_code == 2 and "(Possible options: --json)" in near.output


def test_10_plan_says_when_not_even_one_sequence_fits(cli, workspace):
    text = cli("plan", "mistral-7b", "--max-memory", "5GB").stdout
    line = [row for row in text.splitlines() if row.startswith("serving")][0]
    assert "at most 0" not in line and line.endswith("not even one sequence of 1024 tokens fits the budget (5GB)")
    assert "allocator slack" in line and "CUDA context" in line


def test_10_a_combination_naming_an_adapter_of_another_base_says_why(cli, adapters_workspace,
                                                                      tiny_model_no_template):
    from lqmf.core.errors import ConflictError
    from lqmf.core.workspace import Workspace
    from lqmf.engine.serve.host import ModelHost

    result = cli("train", tiny_model_no_template, EXAMPLES / "chat_training.csv", "chat", "--name", "other",
                 "--max-steps", "1", "--no-4bit", *FAST)
    assert result.exit_code == 0, result.output
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["chat-a"], device="cpu")
    try:
        with pytest.raises(ConflictError, match="adapter 'other' was trained on base model"):
            host.combinations.check("chat-a+other")
    finally:
        host.close()


def test_10_loading_a_prequantized_base_does_not_say_quantizing():
    from lqmf.engine.loading import load_description

    saved = {"method": "bitsandbytes", "bits": 4, "kind": "nf4", "label": "4-bit NF4 (bitsandbytes)"}
    assert load_description(saved, True, "torch.float32") == "saved 4-bit NF4 (bitsandbytes), loading as saved"
    assert load_description(None, True, "torch.float32") == "quantizing to 4-bit NF4"


# ------------------------------------------------------------------ 12: cold start with 1,000 adapters

def test_12_listing_1000_adapters_reuses_rows_until_a_file_changes(cli, workspace, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from cold_start import fake_adapters
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from lqmf.core.registry import Registry

    fake_adapters(workspace, 1000)
    first = cli("adapters", "list", "--json").stdout
    inspected = []
    real = Registry.inspect
    monkeypatch.setattr(Registry, "inspect", lambda self, *a, **k: inspected.append(1) or real(self, *a, **k))
    assert cli("adapters", "list", "--json").stdout == first and inspected == []  # no manifest read again
    status = json.loads(cli("status", "--json").stdout)
    assert status["adapters"]["count"] == 1000 and inspected == []
    config = workspace / "adapters" / "demo-7" / "adapter_config.json"
    config.write_text("{}")  # changed in place: that adapter's row is computed again
    rows = json.loads(cli("adapters", "list", "--json").stdout)
    assert len(inspected) == 1 and len(rows) == 1000
    (workspace / "adapters" / "demo-8" / "lqmf.json").unlink()
    rows = {r["name"]: r for r in json.loads(cli("adapters", "list", "--json").stdout)}
    before = {r["name"]: r for r in json.loads(first)}
    assert rows["demo-8"]["state"] == "broken" and rows["demo-9"] == before["demo-9"]
