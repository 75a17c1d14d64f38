"""Benchmark results on disk: prompts, figures, deltas, saving, finding and comparing.

`lqmf bench` writes one JSON file per run under benchmarks/<adapter>/<timestamp>.json; this
module reads and writes them and turns them into tables. Running models is the engine's part
(engine/evaluation.py); nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError, NotFoundError, did_you_mean
from lqmf.core.fsutil import atomic_write_json
from lqmf.core.names import validate_name
from lqmf.core.workspace import Workspace

RESULT_VERSION = 1
GLOB_CHARS = "*?["

# Used when no prompts file is given: short, varied prompts in the shape each task trains on.
BUILTIN_PROMPTS: dict[str, list[str]] = {
    "chat": [
        "How do I return an item?",
        "What is machine learning?",
        "Can you explain what a portfolio is?",
        "My order has not arrived yet. What should I do?",
        "Give me three tips for writing a clear email.",
        "What is the difference between a loan and a lease?",
        "How can I reset my password?",
        "Explain compound interest in simple terms.",
    ],
    "instruction_following": [
        "Summarize this text in one sentence.\n\nThe meeting covered the budget, hiring plans and the new office.",
        "Translate to French.\n\nGood morning, how are you?",
        "Write a short, polite email declining a meeting invitation.",
        "List three uses of a spreadsheet.",
        "Rewrite this sentence in the passive voice.\n\nThe team finished the report on Friday.",
        "Classify the sentiment of this review.\n\nThe delivery was late and the box was damaged.",
        "Explain what an API is to a beginner.",
        "Give a title for an article about saving energy at home.",
    ],
    "classification": [
        "Absolutely love it, works exactly as described.",
        "Terrible quality, it broke after two days.",
        "The delivery was fast and the packaging was neat.",
        "Not worth the money. Very disappointed.",
        "Great value, I would buy it again.",
        "The instructions were confusing and support never answered.",
        "Comfortable, sturdy and looks good.",
        "It stopped working after a week.",
    ],
    "summarization": [
        "The city council approved a plan to add 20 kilometres of bike lanes over the next two years. "
        "Supporters say it will cut traffic and pollution; some shop owners worry about losing parking.",
        "The company reported a 12% rise in quarterly revenue, driven by strong sales of its new phone. "
        "Profits fell slightly because of higher marketing costs.",
        "Researchers found that people who walk for 30 minutes a day sleep better and report less stress. "
        "The study followed 2,000 adults for a year.",
        "Heavy rain caused flooding in several villages on Sunday. Roads were closed and schools shut, "
        "but no one was hurt. Water levels are expected to fall by Tuesday.",
        "The library will extend its opening hours during exam season and add 50 study desks. "
        "Students asked for the change in a survey last spring.",
        "A new train line will link the airport to the city centre in 18 minutes. "
        "Tickets will cost the same as the bus, and trains will run every ten minutes.",
    ],
}

# (key, label, higher is better) for every figure a run reports, in display order.
FIGURES: list[tuple[str, str, bool]] = [
    ("load_seconds", "load time (s)", False),
    ("response_avg_s", "response avg (s)", False),
    ("response_min_s", "response min (s)", False),
    ("response_max_s", "response max (s)", False),
    ("response_p50_s", "response p50 (s)", False),
    ("response_p95_s", "response p95 (s)", False),
    ("first_token_avg_s", "first token avg (s)", False),
    ("tokens_per_s", "generated tokens/s", True),
    ("texts_per_s", "texts/s", True),
    ("peak_memory_gb", "peak memory (GB)", False),
    ("accuracy", "accuracy", True),
    ("macro_f1", "macro-F1", True),
    ("loss", "eval loss", False),
    ("perplexity", "perplexity", False),
    ("rouge1", "ROUGE-1", True),
    ("rouge2", "ROUGE-2", True),
    ("rougeL", "ROUGE-L", True),
]
FIGURE_LABELS = {key: label for key, label, _ in FIGURES}
HIGHER_IS_BETTER = {key: higher for key, _, higher in FIGURES}
QUALITY_KEYS = ("accuracy", "macro_f1", "loss", "perplexity", "rouge1", "rouge2", "rougeL")
# The one quality figure that sums a task up (used for "vs base" and bar charts).
MAIN_METRIC = {"classification": "accuracy", "summarization": "rougeL", "chat": "rougeL",
               "instruction_following": "rougeL"}


def builtin_prompts(task: str) -> list[str]:
    return list(BUILTIN_PROMPTS[task])


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped. An empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"prompts file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte offset {err.start}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty); write one prompt per line")
    return prompts


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"avg": sum(seconds) / len(seconds), "min": min(seconds), "max": max(seconds),
            "p50": percentile(seconds, 50), "p95": percentile(seconds, 95)}


def run_figures(run: dict[str, Any] | None) -> dict[str, float]:
    """The flat numeric figures of one model's run (adapter or base), keyed as in FIGURES."""
    if not run:
        return {}
    speed = run.get("speed") or {}
    latency = speed.get("response_seconds") or {}
    values: dict[str, Any] = {
        "load_seconds": run.get("load_seconds"),
        **{f"response_{k}_s": latency.get(k) for k in ("avg", "min", "max", "p50", "p95")},
        "first_token_avg_s": speed.get("first_token_avg_seconds"),
        "tokens_per_s": speed.get("tokens_per_second"),
        "texts_per_s": speed.get("texts_per_second"),
        "peak_memory_gb": (run.get("memory") or {}).get("peak_gb"),
        **{key: (run.get("quality") or {}).get(key) for key in QUALITY_KEYS},
    }
    return {key: float(values[key]) for key, _, _ in FIGURES if isinstance(values.get(key), int | float)}


def deltas(adapter_run: dict[str, Any], base_run: dict[str, Any] | None) -> dict[str, float] | None:
    """adapter - base for every figure both runs have."""
    if not base_run:
        return None
    a, b = run_figures(adapter_run), run_figures(base_run)
    return {key: a[key] - b[key] for key in a if key in b}


# ----------------------------------------------------------------------------- files


def result_stamp(moment: datetime | None = None) -> str:
    """A file-name-safe UTC timestamp that sorts in time order (microseconds keep runs apart)."""
    moment = moment or datetime.now(timezone.utc)
    return moment.strftime("%Y%m%dT%H%M%S.%fZ")


def save_result(workspace: Workspace, result: dict[str, Any]) -> Path:
    """Write a result atomically to benchmarks/<adapter>/<timestamp>.json and return the path."""
    folder = workspace.benchmarks_dir / validate_name(result["adapter"])
    path = folder / f"{result_stamp()}.json"
    atomic_write_json(path, result)
    return path


def _result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def read_result(path: Path) -> dict[str, Any]:
    """A saved result, with the file it came from under 'source_file'."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable benchmark result ({type(err).__name__})") from None
    if not isinstance(data, dict) or data.get("lqmf_benchmark") is None or "adapter_run" not in data:
        raise InputError(f"{path}: not an LQMF benchmark result (no 'lqmf_benchmark' / 'adapter_run' keys)")
    data["source_file"] = str(path)
    return data


def benchmarked_adapters(workspace: Workspace) -> list[str]:
    root = workspace.benchmarks_dir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _result_files(p))


def match_names(patterns: Iterable[str], names: Sequence[str], what: str, where: Path) -> list[str]:
    """Names matching any pattern (a glob such as 'finance*' or an exact name), in order.

    A pattern that matches nothing is an error naming it.
    """
    chosen: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            found = [n for n in names if n == pattern]
        if not found:
            raise NotFoundError(f"no {what} match '{pattern}' in {where}{did_you_mean(pattern, names)}")
        chosen += [n for n in found if n not in chosen]
    return chosen


def load_results(workspace: Workspace, patterns: Iterable[str], *, all_runs: bool = False) -> list[dict[str, Any]]:
    """Saved results of the adapters matching the patterns: the newest per adapter, or every run."""
    patterns = list(patterns)
    if not patterns:
        raise InputError("give at least one adapter name or glob (e.g. 'finance*')")
    names = match_names(patterns, benchmarked_adapters(workspace), "benchmark results", workspace.benchmarks_dir)
    results = []
    for name in names:
        files = _result_files(workspace.benchmarks_dir / name)
        results += [read_result(p) for p in (files if all_runs else files[-1:])]
    return results


def latest_result(workspace: Workspace, adapter: str, *, with_base: bool = False) -> dict[str, Any] | None:
    """The newest saved result of an adapter (the newest with a base run if with_base), or None."""
    folder = workspace.benchmarks_dir / validate_name(adapter)
    for path in reversed(_result_files(folder) if folder.is_dir() else []):
        result = read_result(path)
        if not with_base or result.get("base_run"):
            return result
    return None


# ----------------------------------------------------------------------------- tables


def fmt(value: Any, key: str = "", signed: bool = False) -> str:
    """A figure for a table: 3 significant digits for times and perplexity, 4 decimals for scores."""
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        return str(value)
    sign = "+" if signed else ""
    if key.endswith("_s") and key not in ("tokens_per_s", "texts_per_s") or key in ("load_seconds", "perplexity"):
        return f"{value:{sign}.3g}" if abs(value) < 1000 else f"{value:{sign}.0f}"
    decimals = 1 if key in ("tokens_per_s", "texts_per_s") else 2 if key.endswith("_gb") else 4
    if abs(value) < 0.5 * 10**-decimals:
        value = 0.0  # no "-0.00"
    return f"{value:{sign}.{decimals}f}"


def side_by_side(result: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """(rows, headers) of every figure: the adapter, and with a base run the base and the delta."""
    adapter = run_figures(result["adapter_run"])
    base = run_figures(result.get("base_run"))
    memory_kind = (result["adapter_run"].get("memory") or {}).get("kind", "")
    rows = []
    for key, label, _ in FIGURES:
        if key not in adapter and key not in base:
            continue
        if key == "peak_memory_gb" and memory_kind:
            label = f"peak {memory_kind.upper()} (GB)"
        row = [label, fmt(adapter.get(key), key)]
        if base:
            delta = adapter[key] - base[key] if key in adapter and key in base else None
            row += [fmt(base.get(key), key), fmt(delta, key, signed=True)]
        rows.append(row)
    headers = ["figure", result["adapter"]] + (["base", "delta"] if base else [])
    return rows, headers


COMPARE_COLUMNS = ["load_seconds", "response_avg_s", "response_p95_s", "tokens_per_s", "texts_per_s",
                   "peak_memory_gb", "accuracy", "macro_f1", "perplexity", "rouge1", "rouge2", "rougeL"]
COMPARE_HEADERS = {"load_seconds": "load s", "response_avg_s": "avg s", "response_p95_s": "p95 s",
                   "tokens_per_s": "tok/s", "texts_per_s": "texts/s", "peak_memory_gb": "peak GB"}


def comparison_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record of key figures per result (what `bench compare --json` prints)."""
    rows = []
    for result in results:
        figures = run_figures(result["adapter_run"])
        main = MAIN_METRIC.get(result.get("task", ""), "")
        delta = (result.get("deltas") or {}).get(main)
        rows.append({
            "adapter": result["adapter"], "task": result.get("task"), "created": result.get("created"),
            "device": (result["adapter_run"].get("runtime") or {}).get("device"),
            **{key: figures.get(key) for key in COMPARE_COLUMNS},
            "main_metric": main or None, "main_metric_vs_base": delta,
            "source_file": result.get("source_file"),
        })
    return rows


def comparison_table(results: Sequence[dict[str, Any]], tablefmt: str = "simple") -> str:
    """The key figures of several results as one table (columns no result has are left out)."""
    from tabulate import tabulate

    rows = comparison_rows(results)
    columns = [c for c in COMPARE_COLUMNS if any(r[c] is not None for r in rows)]
    if not any(r["task"] == "summarization" for r in rows):  # ROUGE-L alone sums up answers to prompts
        columns = [c for c in columns if c not in ("rouge1", "rouge2")]
    show_delta = any(r["main_metric_vs_base"] is not None for r in rows)
    headers = ["adapter", "task", "date", "device"] + [COMPARE_HEADERS.get(c, FIGURE_LABELS[c]) for c in columns]
    headers += ["vs base"] if show_delta else []
    table = []
    for row in rows:
        line = [row["adapter"], row["task"], (row["created"] or "")[:16].replace("T", " "), row["device"] or "-"]
        line += [fmt(row[c], c) for c in columns]
        if show_delta:
            delta = row["main_metric_vs_base"]
            line.append(f"{FIGURE_LABELS[row['main_metric']]} {fmt(delta, row['main_metric'], signed=True)}"
                        if delta is not None else "-")
        table.append(line)
    return tabulate(table, headers=headers, tablefmt=tablefmt, disable_numparse=True)
