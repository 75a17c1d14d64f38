"""`lqmf test ADAPTER PROMPT`: streamed answers, --base side by side, classification, --json, errors."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, lqmf_env

PROMPT = "How do I return an item?"


def run(cli, workspace, *args: str):
    return cli("--workspace", workspace, "test", *args)


def test_streams_the_answer_that_json_reports(cli, trained_workspace):
    streamed = run(cli, trained_workspace, "chat-a", PROMPT, "--max-new-tokens", "6")
    assert streamed.exit_code == 0, streamed.output
    report = json.loads(run(cli, trained_workspace, "chat-a", PROMPT, "--max-new-tokens", "6", "--json").stdout)
    assert streamed.stdout == report["answer"] + "\n"
    assert "tokens/s" in streamed.stderr
    assert report["new_tokens"] <= 6 and report["task"] == "chat" and report["adapter"] == "chat-a"
    raw = json.loads(run(cli, trained_workspace, "chat-a", PROMPT, "--max-new-tokens", "6", "--raw", "--json").stdout)
    assert raw["prompt_tokens"] < report["prompt_tokens"]  # no chat template around it


def test_base_answers_side_by_side(cli, trained_workspace):
    report = json.loads(run(cli, trained_workspace, "instr-b", PROMPT, "--max-new-tokens", "6", "--base",
                            "--json").stdout)
    assert report["answer"] != report["base"]["answer"]
    shown = run(cli, trained_workspace, "instr-b", PROMPT, "--max-new-tokens", "6", "--base")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == (f"=== instr-b ===\n{report['answer']}\n"
                            f"=== base (tiny-llama) ===\n{report['base']['answer']}\n")


def test_sampling_follows_the_seed_and_stdin_prompt(cli, trained_workspace):
    def sample(seed: str) -> str:
        result = cli("--workspace", trained_workspace, "test", "chat-a", "-", "--temperature", "1.0", "--seed", seed,
                     "--max-new-tokens", "12", "--json", input=PROMPT + "\n")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["prompt"] == PROMPT
        return report["answer"]

    assert sample("1") == sample("1") != sample("2")


def test_classification_prints_label_and_probability(cli, trained_workspace):
    report = json.loads(run(cli, trained_workspace, "sent", "I love it, works perfectly.", "--base", "--json").stdout)
    assert set(report["probabilities"]) == {"negative", "positive"}
    assert abs(sum(report["probabilities"].values()) - 1) < 1e-5
    assert report["label"] == max(report["probabilities"], key=report["probabilities"].get)
    assert report["probability"] == report["probabilities"][report["label"]]
    assert set(report["base"]) == {"label", "probability", "probabilities"}
    table = run(cli, trained_workspace, "sent", "I love it, works perfectly.")
    assert table.exit_code == 0, table.output
    assert report["label"] in table.stdout and f"{report['probability']:.4f}" in table.stdout


def test_errors(cli, trained_workspace):
    unknown = run(cli, trained_workspace, "chat-x", PROMPT)
    assert unknown.exit_code == 3 and "did you mean 'chat-" in unknown.stderr
    empty = run(cli, trained_workspace, "chat-a", "  ")
    assert empty.exit_code == 2 and "empty" in empty.stderr


def test_help_of_test_and_serve_imports_nothing_heavy():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom lqmf.cli.app import app\n"
            "for verb in ('test', 'serve'):\n"
            "    assert CliRunner().invoke(app, [verb, '--help']).exit_code == 0\n"
            "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=lqmf_env(), cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert not {"torch", "transformers", "peft", "fastapi", "uvicorn"} & set(out.stdout.split())
