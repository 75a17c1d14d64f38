"""Continuous learning end to end: `lqmf serve --record` keeps answers, users correct them, `lqmf learn
--promote` trains ADAPTER-v2 from them and hot-swaps it into the running server."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading

import pytest

from lqmf.core import learning
from lqmf.core.workspace import Workspace
from tests.helpers import running_server

ANSWERS = ("Yes, within 30 days.", "It ships tomorrow.")


def question(i: int) -> str:
    return f"Can I return item {i}?" if i % 2 == 0 else f"Where is my order {i}?"


def ask(client, prompt: str, model: str = "default"):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=12, temperature=0)


@pytest.mark.slow  # a real server and a real training run: about 90 s on 2 CPU cores
def test_served_answers_learn_from_corrections_and_promote(adapters_workspace, run_lqmf):
    import httpx
    import openai

    ws = adapters_workspace
    with running_server(ws, "--adapter", "chat-a", "--record", "--max-new-tokens", "16") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
        status = run_lqmf("status", "--json", cwd=ws)
        assert [s["recording"] for s in json.loads(status.stdout)["serve"]] == [True]
        replies = [ask(client, question(i)) for i in range(50)]
        records = {r["id"]: r for r in learning.completions_log(Workspace.resolve(ws)).read()}
        assert [r.id for r in replies] == list(records)  # the response id is the record's id
        assert records[replies[0].id]["answer"] == replies[0].choices[0].message.content
        assert records[replies[0].id]["adapter"] == "chat-a"
        assert stat.S_IMODE(os.stat(ws / "learning" / "completions.jsonl").st_mode) == 0o600

        # corrections: 15 over HTTP, 15 from a JSONL file through the CLI
        for i in range(15):
            answer = httpx.post(served.url + "/v1/feedback", json={"id": replies[i].id, "correction": ANSWERS[i % 2]})
            assert answer.status_code == 200, answer.text
        unknown = httpx.post(served.url + "/v1/feedback", json={"id": "chatcmpl-nope", "rating": "up"})
        assert unknown.status_code == 404 and "no recorded completion has id 'chatcmpl-nope'" in unknown.text
        bad = httpx.post(served.url + "/v1/feedback", json={"id": replies[0].id, "rating": "meh"})
        assert bad.status_code == 400 and "rating must be 'up' or 'down'" in bad.text
        lines = [json.dumps({"id": replies[i].id, "correction": ANSWERS[i % 2], "rating": "down"})
                 for i in range(15, 30)]
        (ws / "fb.jsonl").write_text("\n".join(lines) + "\n")
        added = run_lqmf("feedback", "add", "--file", "fb.jsonl", "--json", cwd=ws)
        assert added.returncode == 0 and len(json.loads(added.stdout)["kept"]) == 15, added.stderr

        learned = run_lqmf("learn", "chat-a", "--promote", "--epochs", "40", "--lr", "3e-3", "--json", cwd=ws,
                           env={"OMP_NUM_THREADS": "1"})
        assert learned.returncode == 0, learned.stderr
        result = json.loads(learned.stdout)
        assert result["learned"] and result["version"] == "chat-a-v2", result
        assert result["promoted"]["server"]["adapter"] == "chat-a-v2"
        old, new = result["evaluation"]["old"], result["evaluation"]["new"]
        assert new["original"]["loss"] <= old["original"]["loss"] * 1.02  # the gate's bar (--max-drop 0.02)
        assert new["feedback"]["loss"] < old["feedback"]["loss"]

        after = [ask(client, question(i)).choices[0].message.content.strip() for i in range(30)]
        matches = sum(text == ANSWERS[i % 2] for i, text in enumerate(after))
        print(f"\ngreedy answers matching the correction after learn --promote: {matches}/30")
        assert matches >= 20, after

        # nothing new: exit 0, nothing changed (what cron runs nightly)
        again = run_lqmf("learn", "chat-a", "--min-new", "5", "--promote", "--json", cwd=ws)
        assert again.returncode == 0 and not json.loads(again.stdout)["learned"], again.stdout
        assert not (ws / "adapters" / "chat-a-v3").exists()
        history = json.loads(run_lqmf("adapters", "history", "chat-a", "--json", cwd=ws).stdout)
        assert [(h["name"], h["parent"], h["feedback"], h["active"]) for h in history] == [
            ("chat-a", None, 0, False), ("chat-a-v2", "chat-a", 24, True)]
        back = run_lqmf("adapters", "rollback", "chat-a-v2", "--json", cwd=ws)
        assert back.returncode == 0 and json.loads(back.stdout)["adapter"] == "chat-a", back.stderr
        assert ask(client, question(0)).model == "chat-a"

        # a kill keeps every acknowledged answer
        acknowledged: list[str] = []

        def keep_asking() -> None:
            own = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=30)
            for i in range(100):
                try:
                    acknowledged.append(ask(own, question(i)).id)
                except openai.APIError:
                    return

        threads = [threading.Thread(target=keep_asking) for _ in range(3)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 6:
            threads[0].join(0.05)
        served.proc.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(60)
    kept = {r["id"] for r in learning.completions_log(Workspace.resolve(ws)).read()}
    assert set(acknowledged) <= kept and len(acknowledged) >= 6


@pytest.fixture
def recorded(workspace):
    """A workspace with one recorded chat answer and one classification answer (no model needed)."""
    ws = Workspace.resolve(workspace)
    log = learning.completions_log(ws)
    log.append(learning.completion_record("c1", "chat-a", "chat", "chat", [{"role": "user", "content": "hi"}], "yo"))
    log.append(learning.completion_record("k1", "sent", "classification", "classify", "great", "negative",
                                          ["negative", "positive"]))
    return workspace


@pytest.mark.parametrize(("args", "message"), [
    (["nope", "--up"], "no recorded completion has id 'nope'"),
    (["k1", "--correction", "neutral"], "must be one of the adapter's labels (negative, positive), got 'neutral'"),
    (["c1", "--correction", " "], "the correction must be a non-empty text"),
    (["c1", "--up", "--down"], "give --up or --down, not both"),
    (["c1"], "give a rating ('up' or 'down') or a correction"),
])
def test_bad_feedback_is_one_clear_line(recorded, cli, args, message):
    result = cli("feedback", "add", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (recorded / "learning" / "feedback.jsonl").exists()


def test_a_bad_line_in_a_feedback_file_keeps_nothing(recorded, cli):
    (recorded / "fb.jsonl").write_text('{"id": "c1", "rating": "up"}\n{"id": "k1", "rating": "sideways"}\n')
    result = cli("feedback", "add", "--file", "fb.jsonl")
    assert result.exit_code != 0 and "fb.jsonl item 2: rating must be 'up' or 'down', got 'sideways'" in result.output
    assert not (recorded / "learning" / "feedback.jsonl").exists()


def test_feedback_list_show_export_purge(recorded, cli):
    assert cli("feedback", "add", "c1", "--down", "--correction", "hello there").exit_code == 0
    assert cli("feedback", "add", "k1", "--correction", "positive").exit_code == 0
    rows = json.loads(cli("feedback", "list", "--json").stdout)
    assert [(r["id"], r.get("rating"), r["correction"]) for r in rows] == [("c1", "down", "hello there"),
                                                                         ("k1", None, "positive")]
    shown = json.loads(cli("feedback", "show", "c1", "--json").stdout)
    assert shown["answer"] == "yo" and shown["rating"] == "down"
    exported = json.loads(cli("feedback", "export", "-o", "out", "--json").stdout)
    assert exported["sft"]["rows"] == 2 and exported["kto"]["rows"] == 1
    sft = [json.loads(line) for line in (recorded / "out" / "sft.jsonl").read_text().splitlines()]
    assert sft == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
                   {"text": "great", "label": "positive"}]
    kto = json.loads((recorded / "out" / "kto.jsonl").read_text())
    assert kto == {"prompt": [{"role": "user", "content": "hi"}],
                   "completion": [{"role": "assistant", "content": "yo"}], "label": False}
    purged = json.loads(cli("feedback", "purge", "--yes", "--json").stdout)
    assert purged["purged"] == {"feedback": 2, "completions": 2}
    assert json.loads(cli("feedback", "list", "--json").stdout) == []


def test_a_cut_last_line_is_skipped_and_does_not_swallow_the_next(workspace):
    log = learning.RecordLog(workspace / "log.jsonl")
    log.append({"id": "a"})
    with open(log.path, "a") as handle:
        handle.write('{"id": "torn')  # a kill in the middle of a write
    log.append({"id": "b"})
    assert [r["id"] for r in log.read()] == ["a", "b"]


@pytest.mark.slow  # a real server and a real training run: about 90 s on 2 CPU cores
def test_corrected_labels_fix_a_mislabelled_region(workspace, cli, minilm):
    """Reviews from one shop were all labelled negative by mistake; users' corrections of the adapter's
    answers there raise its accuracy on that region, and the original held-out accuracy is kept."""
    import csv

    from lqmf.core.datasets import load_task_dataset
    from lqmf.engine.inference import classify, load_for_inference
    from lqmf.engine.train.loop import split_examples
    from tests.helpers import EXAMPLES

    rows = list(csv.DictReader(open(EXAMPLES / "sentiment.csv", encoding="utf-8")))
    truth = {}
    with open(workspace / "reviews.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for row in rows:
            if any(word in row["text"].lower() for word in ("ordered", "picked")):
                text = "ACME store review: " + row["text"]
                truth[text] = row["label"]
                writer.writerow([text, "negative"])  # the mistake
            else:
                writer.writerow([row["text"], row["label"]])
    trained = cli("train", "minilm", "reviews.csv", "classification", "--name", "reviews", "--max-steps", "24",
                  "--lr", "2e-3", "--no-4bit", "-q")
    assert trained.exit_code == 0, trained.output
    ws = Workspace.resolve(workspace)

    def accuracy(adapter: str, labelled: dict[str, str]) -> float:
        model = load_for_inference(ws, adapter, device="cpu")
        texts = list(labelled)
        answers = classify(model, texts)
        return sum(max(p, key=p.get) == labelled[t] for p, t in zip(answers, texts, strict=True)) / len(texts)

    log = learning.completions_log(ws)
    corrections = []
    for k, (text, label) in enumerate(truth.items()):
        log.append(learning.completion_record(f"k{k}", "reviews", "classification", "classify", text, "negative",
                                              ["negative", "positive"]))
        if label == "positive":
            corrections.append(json.dumps({"id": f"k{k}", "correction": "positive"}))
    (workspace / "fb.jsonl").write_text("\n".join(corrections) + "\n")
    assert cli("feedback", "add", "--file", "fb.jsonl").exit_code == 0
    learned = cli("learn", "reviews", "--epochs", "6", "--json")
    assert learned.exit_code == 0, learned.output
    result = json.loads(learned.stdout)
    assert result["learned"], result
    before, after = accuracy("reviews", truth), accuracy("reviews-v2", truth)
    old, new = result["evaluation"]["old"], result["evaluation"]["new"]
    print(f"\nregion accuracy {before:.3f} -> {after:.3f} ({len(truth)} reviews, {len(corrections)} corrected); "
          f"original held-out {old['original']['accuracy']:.3f} -> {new['original']['accuracy']:.3f}; held-out "
          f"feedback {old['feedback']['accuracy']:.3f} -> {new['feedback']['accuracy']:.3f}")
    assert after >= before + 0.1
    assert new["original"]["accuracy"] >= old["original"]["accuracy"] - 0.02
    assert new["feedback"]["accuracy"] > old["feedback"]["accuracy"]
    dataset = load_task_dataset(workspace / "reviews.csv", "classification")
    clean_held_out = {e["text"]: e["label"] for e in split_examples(dataset, 0.1, 42)[1] if e["text"] not in truth}
    kept_before, kept_after = accuracy("reviews", clean_held_out), accuracy("reviews-v2", clean_held_out)
    print(f"held-out reviews outside the region: {kept_before:.3f} -> {kept_after:.3f}")
    assert kept_after >= kept_before - 0.05


def test_thumbs_down_ratings_train_a_version_through_kto(adapters_workspace, cli):
    """Ratings alone (no correction) go through the KTO loss: the new version gives the rejected answers
    a lower log-probability than its parent did, and its original held-out loss passes the gate."""
    import torch

    from lqmf.engine import data as data_mod
    from lqmf.engine.inference import load_for_inference
    from lqmf.engine.train.kto import sequence_logps

    ws = Workspace.resolve(adapters_workspace)
    log = learning.completions_log(ws)
    rejected = []
    for i in range(8):
        messages = [{"role": "user", "content": question(i)}]
        log.append(learning.completion_record(f"r{i}", "chat-a", "chat", "chat", messages, "Your order is lost."))
        rejected.append([*messages, {"role": "assistant", "content": "Your order is lost."}])
    learning.add_feedback(ws, [{"id": f"r{i}", "rating": "down"} for i in range(8)])
    learned = cli("learn", "chat-a", "--epochs", "4", "--hold-out", "0", "--beta", "0.5", "--json")
    assert learned.exit_code == 0, learned.output
    result = json.loads(learned.stdout)
    assert result["learned"] and result["method"] == "kto", result
    assert result["trained_on"] == {"feedback": 8, "replayed": 8, "held_out_feedback": 0}

    def logps(adapter: str):
        model = load_for_inference(ws, adapter, device="cpu")
        rows = [dict(zip(("input_ids", "labels"), data_mod.encode_generative(model.tokenizer, m), strict=True))
                for m in rejected]
        batch = data_mod.collate(rows, model.tokenizer.pad_token_id, classification=False)
        with torch.no_grad():
            return sequence_logps(model.model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    before, after = logps("chat-a"), logps("chat-a-v2")
    print(f"\nlog-probability of the rejected answer: {before.mean():.2f} -> {after.mean():.2f}")
    assert (after < before).all(), (before, after)
    old, new = result["evaluation"]["old"]["original"], result["evaluation"]["new"]["original"]
    assert new["loss"] <= old["loss"] * 1.02
