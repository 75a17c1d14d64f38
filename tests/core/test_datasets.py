"""Dataset reading and validation: every error names the file and the row, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lqmf.core.datasets import load_task_dataset
from lqmf.core.errors import InputError, NotFoundError
from tests.helpers import EXAMPLES


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("file", "task", "rows"),
    [("sentiment.csv", "classification", 400), ("chat_training.csv", "chat", 120),
     ("instructions.jsonl", "instruction_following", 120), ("summarization.csv", "summarization", 80),
     ("chat_messages.jsonl", "chat", 60)],
)
def test_sample_datasets_load(file, task, rows):
    data = load_task_dataset(EXAMPLES / file, task)
    assert len(data.examples) == rows
    assert 50 <= rows <= 1000


def test_instruction_alias_and_empty_input(tmp_path):
    path = write(tmp_path, "i.jsonl", '{"instruction": "Say hi", "input": "", "output": "hi"}\n'
                 '{"instruction": "Translate", "input": "Hello", "output": "Bonjour"}\n')
    data = load_task_dataset(path, "instruction")
    assert data.task == "instruction_following"
    assert data.examples[0]["messages"][0]["content"] == "Say hi"
    assert data.examples[1]["messages"][0]["content"] == "Translate\n\nHello"


def test_json_list_file(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"text": "a", "summary": "b"}, {"text": "c", "summary": "d"}]))
    assert len(load_task_dataset(path, "summarization").examples) == 2


def test_misnamed_column_suggests_rename(tmp_path):
    path = write(tmp_path, "d.csv", "text,labels\ngood,positive\nbad,negative\n")
    with pytest.raises(InputError, match=r"missing column 'label'.*'labels' -> 'label'") as info:
        load_task_dataset(path, "classification")
    assert str(path) in info.value.message


def test_missing_columns_for_task(tmp_path):
    path = write(tmp_path, "d.csv", "question,answer\nq,a\n")
    with pytest.raises(InputError, match=r"missing columns 'input', 'output' for task chat"):
        load_task_dataset(path, "chat")


def test_empty_rows_are_listed(tmp_path):
    path = write(tmp_path, "d.csv", "input,output\nhello,hi\n,missing input\nok,\n\nfine,yes\n")
    with pytest.raises(InputError, match=r"lines 3, 4, 5: empty input or output \(3 of 5 rows\)"):
        load_task_dataset(path, "chat")


def test_malformed_json_line_has_line_number(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"input": "a", "output": "b"}\n\n{"input": "a", "output": }\n')
    with pytest.raises(InputError, match=r"d.jsonl: line 3: malformed JSON"):
        load_task_dataset(path, "chat")


def test_non_utf8_file(tmp_path):
    path = write(tmp_path, "d.csv", b"text,label\n" + "caf\xe9 ok,positive\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"line 2: not UTF-8"):
        load_task_dataset(path, "classification")


def test_single_label_class(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(InputError, match=r"every row has label 'pos'"):
        load_task_dataset(path, "classification")


def test_ragged_csv_row(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na,pos,extra\n")
    with pytest.raises(InputError, match=r"line 2: expected 2 fields"):
        load_task_dataset(path, "classification")


def test_messages_format_checks(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    path = write(tmp_path, "m.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=r"line 2: messages\[1\].role must be one of"):
        load_task_dataset(path, "chat")
    ends_with_user = {"messages": [{"role": "user", "content": "hi"}]}
    path = write(tmp_path, "m2.jsonl", json.dumps(ends_with_user) + "\n")
    with pytest.raises(InputError, match=r"last message must be the assistant"):
        load_task_dataset(path, "chat")


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="unsupported file type"):
        load_task_dataset(write(tmp_path, "d.txt", "x"), "chat")
    with pytest.raises(NotFoundError):
        load_task_dataset(tmp_path / "none.csv", "chat")
    with pytest.raises(InputError, match="empty"):
        load_task_dataset(write(tmp_path, "e.csv", ""), "chat")


def test_cli_reports_dataset_error_in_one_line(cli, workspace):
    (workspace / "d.csv").write_text("text,labels\ngood,positive\nbad,negative\n")
    result = cli("train", "minilm", "d.csv", "classification", "--dry-run")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "d.csv" in lines[0]


def test_pretokenized_rows(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    path = write(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_task_dataset(path, "chat")
    assert data.examples[0]["labels"] == [5, 6, 7, 8] and data.examples[1]["labels"] == [-100, 6, 7]
    bad = write(tmp_path, "b.jsonl", json.dumps({"input_ids": [1, 2], "labels": [1]}) + "\n")
    with pytest.raises(InputError, match=r"b.jsonl: line 1: 'labels' has 1 entries for 2 input_ids"):
        load_task_dataset(bad, "chat")
    bad = write(tmp_path, "c.jsonl", json.dumps({"input_ids": [1, "x"]}) + "\n")
    with pytest.raises(InputError, match=r"'input_ids' must be a non-empty list of integers"):
        load_task_dataset(bad, "chat")
