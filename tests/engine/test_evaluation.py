"""`lqmf bench`: speed, memory and quality of real tiny adapters and a MiniLM adapter against their bases;
saved results, `bench compare`, the guide's Python API, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, bench_json, invoke

# Enough training for MiniLM to learn the sample sentiment set (one epoch, ~25 s on 2 cores).
STRONG_SENTIMENT = ["--epochs", "1", "--batch-size", "16", "--grad-accum", "1", "--lr", "6e-3",
                    "--no-gradient-checkpointing", "--max-seq-length", "64", "--no-4bit", "-q"]
TINY = ["--max-new-tokens", "6", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench_ws(trained_workspace, tmp_path_factory) -> Path:
    """The trained adapters plus 'sent-strong', a MiniLM adapter trained long enough to beat its base."""
    root = tmp_path_factory.mktemp("bench") / "ws"
    shutil.copytree(trained_workspace, root)
    trained = invoke(root, "train", "minilm", EXAMPLES / "sentiment.csv", "classification", "--name", "sent-strong",
                     *STRONG_SENTIMENT)
    assert trained.exit_code == 0, trained.output
    return root


@pytest.fixture(scope="module")
def benched(bench_ws) -> dict[str, dict]:
    """One saved benchmark per adapter, each exercising different options."""
    prompts = bench_ws / "prompts.txt"
    prompts.write_text("Write a haiku about rain.\n\n  List two colours.  \n")
    runs = {
        "chat-a": bench_json(bench_ws, "chat-a", "--base", "--eval-limit", "0", *TINY),
        "sent-strong": bench_json(bench_ws, "sent-strong", "--base"),
        "instr-b": bench_json(bench_ws, "instr-b", prompts, "--eval-file", EXAMPLES / "instructions.jsonl",
                              "--eval-limit", "4", *TINY),
    }
    human = invoke(bench_ws, "bench", "run", "chat-q", "--max-new-tokens", "3", "--eval-limit", "3", "--warmup", "0")
    assert human.exit_code == 0, human.output
    runs["chat-q-output"] = {"stdout": human.stdout, "stderr": human.stderr}
    return runs


def manifest(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "adapters" / name / "lqmf.json").read_text())


RUN_KEYS = {"model", "runtime", "load_seconds", "speed", "memory", "quality", "responses"}
TOP_KEYS = {"lqmf_benchmark", "adapter", "task", "base_model", "created", "options", "quality_data", "hardware",
            "versions", "notes", "adapter_run", "base_run", "deltas", "source_file"}


def test_causal_bench_result_has_every_field(benched, bench_ws):
    result = benched["chat-a"]
    assert TOP_KEYS <= set(result) and result["adapter"] == "chat-a" and result["task"] == "chat"
    assert result["options"] == {"prompts_file": None, "prompt_count": 8, "max_new_tokens": 6, "warmup": 1,
                                 "eval_file": None, "eval_limit": 0, "base": True, "device": "auto"}
    assert {"device", "cpu", "cpu_cores", "ram_gb", "platform", "python", "gpu"} <= set(result["hardware"])
    assert result["versions"]["torch"] and result["versions"]["rouge-score"]
    for run in (result["adapter_run"], result["base_run"]):
        assert set(run) == RUN_KEYS
        speed = run["speed"]
        assert speed["prompts"] == 8 and speed["warmup_runs"] == 1 and speed["generated_tokens"] == 8 * 6
        latency = speed["response_seconds"]
        assert set(latency) == {"avg", "min", "max", "p50", "p95"}
        assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["max"]
        assert latency["min"] <= latency["avg"] <= latency["max"]
        assert speed["tokens_per_second"] > 0 and speed["first_token_avg_seconds"] > 0 and run["load_seconds"] > 0
        assert run["memory"]["kind"] == "rss" and run["memory"]["peak_gb"] >= run["memory"]["after_load_gb"] > 0
        quality = run["quality"]
        assert {"examples", "loss", "perplexity", "rouge1", "rouge2", "rougeL", "samples"} <= set(quality)
        assert 0 <= quality["rougeL"] <= 1 and len(quality["samples"]) == 3
        assert [r["new_tokens"] for r in run["responses"]] == [6] * 8
    assert result["adapter_run"]["model"].startswith("adapter 'chat-a'")
    assert result["base_run"]["model"].startswith("base model")
    assert set(result["deltas"]) >= {"load_seconds", "tokens_per_s", "perplexity", "rougeL", "peak_memory_gb"}
    saved = json.loads(Path(result["source_file"]).read_text())
    assert Path(result["source_file"]).parent == bench_ws / "benchmarks" / "chat-a"
    assert saved == {k: v for k, v in result.items() if k not in ("source_file", "report")}


def test_quality_is_measured_on_the_training_split(benched, bench_ws):
    """The re-created split is the one training held out: the same examples give the same loss."""
    for name, key in (("chat-a", "loss"), ("sent-strong", "accuracy")):
        trained = manifest(bench_ws, name)
        result = benched[name]
        assert result["quality_data"]["kind"] == "validation_split"
        assert result["quality_data"]["examples"] == trained["dataset"]["validation_examples"]
        assert result["adapter_run"]["quality"][key] == pytest.approx(trained["metrics"][f"eval_{key}"], rel=1e-4)
    assert benched["chat-a"]["notes"] == []


def test_trained_minilm_adapter_beats_its_base(benched):
    result = benched["sent-strong"]
    adapter, base = result["adapter_run"]["quality"], result["base_run"]["quality"]
    assert adapter["accuracy"] >= 0.75 and adapter["accuracy"] > base["accuracy"] + 0.15, (adapter, base)
    assert adapter["macro_f1"] > base["macro_f1"]
    assert result["deltas"]["accuracy"] == pytest.approx(adapter["accuracy"] - base["accuracy"])
    assert adapter["labels"] == ["negative", "positive"]
    matrix = adapter["confusion_matrix"]
    assert sum(map(sum, matrix)) == adapter["examples"] == 40
    assert (matrix[0][0] + matrix[1][1]) / 40 == adapter["accuracy"]
    assert any("randomly initialised" in note for note in result["notes"])
    speed = result["adapter_run"]["speed"]
    assert speed["texts_per_second"] > 0 and "tokens_per_second" not in speed
    assert {r["output"] for r in result["adapter_run"]["responses"]} <= {"negative", "positive"}


def test_prompts_file_and_eval_file(benched):
    result = benched["instr-b"]
    assert result["options"]["prompt_count"] == 2 and result["options"]["prompts_file"].endswith("prompts.txt")
    assert [r["prompt"] for r in result["adapter_run"]["responses"]] == ["Write a haiku about rain.",
                                                                        "List two colours."]
    assert result["quality_data"]["kind"] == "eval_file" and result["quality_data"]["available"] == 120
    assert result["adapter_run"]["quality"]["examples"] == 4
    assert result["base_run"] is None and result["deltas"] is None
    assert any("first 4 of 120" in note for note in result["notes"])


def test_human_output_is_a_table(benched):
    out = benched["chat-q-output"]
    assert "chat-q (chat) on cpu (4-bit NF4)" in out["stdout"]
    assert "generated tokens/s" in out["stdout"] and "perplexity" in out["stdout"]
    assert "saved " in out["stderr"] and "benchmarks/chat-q/" in out["stderr"]


def test_compare_newest_results_of_three_adapters(benched, bench_ws):
    result = invoke(bench_ws, "bench", "compare", "chat*", "instr-b", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["adapter"] for r in rows] == ["chat-a", "chat-q", "instr-b"]
    chat_a = rows[0]
    run = benched["chat-a"]["adapter_run"]
    assert chat_a["tokens_per_s"] == run["speed"]["tokens_per_second"]
    assert chat_a["perplexity"] == run["quality"]["perplexity"]
    assert chat_a["main_metric"] == "rougeL" and chat_a["main_metric_vs_base"] == benched["chat-a"]["deltas"]["rougeL"]
    table = invoke(bench_ws, "bench", "compare", "*")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert "tok/s" in lines[0] and "accuracy" in lines[0] and "vs base" in lines[0]
    assert {line.split()[0] for line in lines[2:]} == {"chat-a", "chat-q", "instr-b", "sent-strong"}


def test_compare_takes_the_newest_run_unless_all(adapters_workspace):
    for tokens in ("2", "3"):
        bench_json(adapters_workspace, "chat-a", "--max-new-tokens", tokens, "--eval-limit", "1", "--warmup", "0")
    newest = bench_json(adapters_workspace, "compare", "chat-a")
    assert len(newest) == 1
    assert json.loads(Path(newest[0]["source_file"]).read_text())["options"]["max_new_tokens"] == 3
    assert len(bench_json(adapters_workspace, "compare", "chat-a", "--all")) == 2


def test_the_guides_python_api(benched, bench_ws, monkeypatch):
    from lqmf.agents.benchmark_agent import BenchmarkAgent as GuidePath
    from lqmf.bench import BenchmarkAgent

    assert GuidePath is BenchmarkAgent
    monkeypatch.setenv("LQMF_HOME", str(bench_ws))
    agent = BenchmarkAgent()
    results = agent.load_benchmark_results("chat*")
    assert [r["adapter"] for r in results] == ["chat-a", "chat-q"]
    assert results[0]["adapter_run"] == benched["chat-a"]["adapter_run"]
    comparison_table = agent.compare_models(results)
    assert isinstance(comparison_table, str)
    assert "chat-a" in comparison_table and "chat-q" in comparison_table and "perplexity" in comparison_table
    assert "<table>" in agent.compare_models(results, tablefmt="html")
    assert agent.load_benchmark_results("finance*") == []  # no match: an empty result, as the guide's loop expects


def test_python_api_benchmarks_too(adapters_workspace):
    from lqmf.bench import BenchmarkAgent

    result = BenchmarkAgent(adapters_workspace).benchmark("sent", eval_limit=8, warmup=0, save=False)
    assert result["adapter_run"]["quality"]["examples"] == 8 and "source_file" not in result
    assert not (adapters_workspace / "benchmarks").exists()


def test_changed_or_missing_dataset_is_reported(adapters_workspace):
    path = adapters_workspace / "adapters" / "chat-a" / "lqmf.json"
    data = json.loads(path.read_text())
    data["dataset"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    changed = bench_json(adapters_workspace, "chat-a", "--max-new-tokens", "2", "--eval-limit", "2", "--warmup", "0")
    assert any(note.startswith("warning:") and "changed since 'chat-a' was trained" in note
               for note in changed["notes"])
    assert changed["adapter_run"]["quality"]["examples"] == 2
    data["config"]["dataset_path"] = str(adapters_workspace / "gone.csv")
    path.write_text(json.dumps(data))
    missing = bench_json(adapters_workspace, "chat-a", "--max-new-tokens", "2", "--warmup", "0")
    assert missing["adapter_run"]["quality"] is None and missing["quality_data"] is None
    assert any("no longer exists; pass --eval-file" in note for note in missing["notes"])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr


def test_bad_input_is_one_clear_line(bench_ws, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_line_error(invoke(bench_ws, "bench", "chat-a", empty), 2, "empty.txt: no prompts")
    one_line_error(invoke(bench_ws, "bench", "chat-a", tmp_path / "nope.txt"), 3, "nope.txt' not found")
    one_line_error(invoke(bench_ws, "bench", "sent", "--eval-file", EXAMPLES / "chat_training.csv"), 2,
                   "missing columns 'text', 'label' for task classification")
    labels = tmp_path / "labels.csv"
    labels.write_text("text,label\ngreat,positive\nmeh,neutral\n")
    one_line_error(invoke(bench_ws, "bench", "sent", "--eval-file", labels), 2,
                   "label(s) 'neutral' unknown to adapter 'sent'")
    one_line_error(invoke(bench_ws, "bench", "compare", "finance*"), 3, "no benchmark results match 'finance*'")
    one_line_error(invoke(bench_ws, "bench", "chat-x"), 3, "adapter 'chat-x' not found")
    one_line_error(invoke(bench_ws, "bench", "chat-a", "--device", "tpu"), 2, "device must be one of")
    assert invoke(bench_ws, "bench", "chat-a", "--max-new-tokens", "0").exit_code == 2
