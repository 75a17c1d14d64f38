"""`lqmf bench` through a running `lqmf serve` (the real process on the tiny model), and `--local`."""

from __future__ import annotations

import json

from tests.helpers import running_server

OPTIONS = ["--max-new-tokens", "4", "--warmup", "0", "--eval-limit", "3"]


def bench(run_lqmf, workspace, *args):
    done = run_lqmf("bench", *args, *OPTIONS, "--json", cwd=workspace)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_bench_answers_through_the_running_server_unless_local(adapters_workspace, run_lqmf):
    with running_server(adapters_workspace, "--adapter", "chat-a") as server:
        served, stderr = bench(run_lqmf, adapters_workspace, "chat-a")
        assert f"benchmarking with the running server {server.url}" in stderr
        assert served["via"] == "server" and served["server"] == server.url
        run = served["adapter_run"]
        assert run["runtime"]["server"] == server.url and run["load_seconds"] is None
        assert run["memory"]["peak_gb"] is None and run["memory"]["measured"] is False  # a CPU server reports none
        assert any(note.startswith("peak memory not measured") for note in served["notes"])
        assert run["speed"]["prompts"] == 8 and run["speed"]["tokens_per_second"] > 0
        assert run["speed"]["first_token_avg_seconds"] > 0
        assert "rougeL" in run["quality"] and "perplexity" not in run["quality"]  # no logits over HTTP

        local, stderr = bench(run_lqmf, adapters_workspace, "chat-a", "--local")
        assert "running server" not in stderr and local["via"] == "local" and local["server"] is None
        assert local["adapter_run"]["load_seconds"] > 0 and local["adapter_run"]["memory"]["kind"] == "rss"

        human = run_lqmf("bench", "chat-a", "--max-new-tokens", "2", "--warmup", "0", "--eval-limit", "1",
                         cwd=adapters_workspace)
        assert human.returncode == 0, human.stderr
        assert f"through the running server {server.url}" in human.stdout
        not_held, stderr = bench(run_lqmf, adapters_workspace, "instr-b")  # the server does not hold it
        assert "running server" not in stderr and not_held["via"] == "local"
    # The same greedy answers through the server and in this process (the same base, the same adapter).
    assert [s["answer"] for s in served["adapter_run"]["quality"]["samples"]] == \
        [s["answer"] for s in local["adapter_run"]["quality"]["samples"]]
    assert served["adapter_run"]["quality"]["rougeL"] == local["adapter_run"]["quality"]["rougeL"]
    for there, here in zip(served["adapter_run"]["responses"], local["adapter_run"]["responses"], strict=True):
        assert there["prompt"] == here["prompt"] and there["prompt_tokens"] == here["prompt_tokens"]
        # Timed answers make exactly N tokens where the server honours min_tokens; else it may stop at end of text.
        assert here["output"].startswith(there["output"])



def test_classification_through_the_server_agrees_with_the_process(adapters_workspace, run_lqmf):
    with running_server(adapters_workspace, "--adapter", "sent") as server:
        served, _ = bench(run_lqmf, adapters_workspace, "sent", "--base")
        answer = run_lqmf("test", "sent", "Great value, I would buy it again.", "--json", cwd=adapters_workspace)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["server"] == server.url
    local, _ = bench(run_lqmf, adapters_workspace, "sent", "--base", "--local")
    assert served["via"] == "server" and served["base_run"]["runtime"]["server"] == server.url
    assert served["adapter_run"]["speed"]["texts_per_second"] > 0
    there, here = served["adapter_run"], local["adapter_run"]  # the same labels for every text
    assert [r["output"] for r in there["responses"]] == [r["output"] for r in here["responses"]]
    assert there["quality"]["confusion_matrix"] == here["quality"]["confusion_matrix"]
