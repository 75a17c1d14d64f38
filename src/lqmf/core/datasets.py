"""Dataset files: reading CSV/JSONL/JSON with exact error locations, and task schemas.

Files are parsed here with the standard library so that every error names the file and the
line or row (the `datasets` CSV/JSON builders report neither, and cast values silently);
the engine then hands the checked rows to `datasets.Dataset` for splitting and tokenising.
Every task is normalised to one of three shapes:
  generative: {"messages": [{"role": ..., "content": ...}, ...]}  (loss on assistant turns)
  pre-tokenized generative: {"input_ids": [...], "labels": [...]}  (labels default to input_ids;
      -100 masks a position; for data tokenized elsewhere and for benchmarks)
  classification: {"text": ..., "label": ...}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core.config import normalize_task
from lqmf.core.errors import InputError, NotFoundError

SCHEMAS: dict[str, tuple[str, ...]] = {
    "chat": ("input", "output"),
    "instruction_following": ("instruction", "input", "output"),
    "classification": ("text", "label"),
    "summarization": ("text", "summary"),
}
OPTIONAL_COLUMNS = {"instruction_following": {"input"}}
ROLES = ("system", "user", "assistant")
SUMMARIZE_PROMPT = "Summarize the following text.\n\n"
MAX_LISTED_ROWS = 5


@dataclass
class Row:
    number: int  # line number in the file (CSV: the header is line 1)
    values: dict[str, Any]


@dataclass
class TaskDataset:
    """Checked, normalised examples of one task, ready for the engine."""

    path: Path
    task: str
    examples: list[dict[str, Any]]
    sha256: str
    labels: list[str] = field(default_factory=list)
    format: str = "csv"

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(Counter(e["label"] for e in self.examples)) if self.labels else {}


def _rows_listing(numbers: list[int], word: str = "line") -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_LISTED_ROWS])
    more = f" and {len(numbers) - MAX_LISTED_ROWS} more" if len(numbers) > MAX_LISTED_ROWS else ""
    return f"{word}{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from None


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    raise InputError(f"{path}: unsupported file type '{suffix or '(none)'}'; use .csv, .jsonl or .json")


def read_rows(path: Path) -> tuple[list[Row], str, str]:
    """(rows, format, sha256) of a dataset file, with errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"dataset '{path}' not found")
    fmt = detect_format(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = _decode(path, raw)
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    if fmt in ("csv", "tsv"):
        rows = _read_csv(path, text, "\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        rows = _read_jsonl(path, text)
    else:
        rows = _read_json(path, text)
    if not rows:
        raise InputError(f"{path}: no data rows")
    return rows, fmt, digest


def _read_csv(path: Path, text: str, delimiter: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
        header = [h.strip() for h in header]
        rows = []
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                rows.append(Row(line, {}))
                continue
            if len(record) != len(header):
                raise InputError(
                    f"{path}: line {line}: expected {len(header)} fields ({','.join(header)}), got {len(record)}"
                    " (quote fields that contain the delimiter)"
                )
            rows.append(Row(line, dict(zip(header, record, strict=True))))
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV: {err}") from None
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise InputError(f"{path}: line 1: column '{dup}' appears twice in the header")
    return rows


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path}: line {number}: expected a JSON object, got {type(value).__name__}")
        rows.append(Row(number, value))
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    rows = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {index}: expected a JSON object, got {type(item).__name__}")
        rows.append(Row(index, item))
    return rows


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool | int | float):
        return str(value)
    return ""


def _missing_columns_error(path: Path, task: str, present: set[str], missing: list[str]) -> InputError:
    import difflib

    hints = []
    for column in missing:
        close = difflib.get_close_matches(column, sorted(present - set(SCHEMAS[task])), n=1, cutoff=0.5)
        if close:
            hints.append(f"'{close[0]}' -> '{column}'?")
    hint = f"; rename {', '.join(hints)}" if hints else ""
    found = ", ".join(sorted(present)) or "none"
    return InputError(
        f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
        f"for task {task} (expects {','.join(SCHEMAS[task])}; found {found}){hint}"
    )


def load_task_dataset(path: Path, task: str, known_labels: list[str] | None = None) -> TaskDataset:
    """Read and check a dataset for a task; raise InputError naming the first problem.

    known_labels: classification's label set decided elsewhere (a federated site may hold one class);
    every row's label must be one of them.
    """
    task = normalize_task(task)
    rows, fmt, digest = read_rows(path)
    word = "line" if fmt != "json" else "item"
    present = set().union(*(row.values.keys() for row in rows))
    if task != "classification" and "messages" in present:
        examples = _messages_examples(path, rows, word)
        return TaskDataset(path, task, examples, digest, format=fmt)
    if task != "classification" and "input_ids" in present:
        return TaskDataset(path, task, _token_examples(path, rows, word), digest, format=fmt)
    required = [c for c in SCHEMAS[task] if c not in OPTIONAL_COLUMNS.get(task, set())]
    missing = [c for c in required if c not in present]
    if missing:
        raise _missing_columns_error(path, task, present, missing)
    empty = [r.number for r in rows if any(not _text(r.values.get(c)) for c in required)]
    if empty:
        raise InputError(
            f"{path}: {_rows_listing(empty, word)}: empty {' or '.join(required)} "
            f"({len(empty)} of {len(rows)} rows); fill or remove them"
        )
    examples = [_normalise(task, r.values) for r in rows]
    labels: list[str] = []
    if task == "classification" and known_labels:
        unknown = sorted({e["label"] for e in examples} - set(known_labels))
        if unknown:
            raise InputError(f"{path}: labels {unknown} are not among {known_labels}")
        labels = list(known_labels)
    elif task == "classification":
        labels = sorted({e["label"] for e in examples})
        if len(labels) < 2:
            raise InputError(
                f"{path}: every row has label '{labels[0]}'; classification needs at least two label classes"
            )
    return TaskDataset(path, task, examples, digest, labels=labels, format=fmt)


def _normalise(task: str, values: dict[str, Any]) -> dict[str, Any]:
    if task == "classification":
        return {"text": _text(values["text"]), "label": _text(values["label"])}
    if task == "chat":
        prompt, answer = _text(values["input"]), _text(values["output"])
    elif task == "instruction_following":
        instruction, extra = _text(values["instruction"]), _text(values.get("input"))
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        answer = _text(values["output"])
    else:
        prompt, answer = SUMMARIZE_PROMPT + _text(values["text"]), _text(values["summary"])
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def prompt_messages(task: str, text: str) -> list[dict[str, str]]:
    """The messages that ask a generative adapter for an answer to a raw prompt."""
    content = SUMMARIZE_PROMPT + text if normalize_task(task) == "summarization" else text
    return [{"role": "user", "content": content}]


def _messages_examples(path: Path, rows: list[Row], word: str) -> list[dict[str, Any]]:
    examples = []
    for row in rows:
        where = f"{path}: {word} {row.number}"
        messages = row.values.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        clean = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InputError(f"{where}: messages[{index}] must be an object with role and content")
            role, content = message.get("role"), _text(message.get("content"))
            if role not in ROLES:
                raise InputError(f"{where}: messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
            if not content:
                raise InputError(f"{where}: messages[{index}].content is empty")
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "assistant":
            raise InputError(f"{where}: the last message must be the assistant's answer to learn")
        if not any(m["role"] == "user" for m in clean):
            raise InputError(f"{where}: no user message")
        examples.append({"messages": clean})
    return examples


def _token_examples(path: Path, rows: list[Row], word: str) -> list[dict[str, Any]]:
    examples = []
    for row in rows:
        where = f"{path}: {word} {row.number}"
        ids, labels = row.values.get("input_ids"), row.values.get("labels", row.values.get("input_ids"))
        for key, value in (("input_ids", ids), ("labels", labels)):
            if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
                raise InputError(f"{where}: '{key}' must be a non-empty list of integers")
        if any(v < 0 for v in ids):
            raise InputError(f"{where}: 'input_ids' has a negative token id")
        if len(labels) != len(ids):
            raise InputError(f"{where}: 'labels' has {len(labels)} entries for {len(ids)} input_ids")
        examples.append({"input_ids": ids, "labels": labels})
    return examples
