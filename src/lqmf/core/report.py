"""Reports from saved files only: an adapter's manifest and metrics.jsonl, and its saved benchmarks.

Each report is Markdown (reports/NAME.md), the same rendered as HTML (reports/NAME.html) and PNG
plots in reports/NAME/. No model loads and torch is never imported; matplotlib (object API, no
pyplot, so no display backend) and markdown-it-py are imported when a report is written.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lqmf import __version__
from lqmf.core.bench import (
    FIGURE_LABELS,
    HIGHER_IS_BETTER,
    MAIN_METRIC,
    comparison_table,
    fmt,
    latest_result,
    match_names,
    run_figures,
    side_by_side,
)
from lqmf.core.errors import require
from lqmf.core.fsutil import atomic_write_bytes, atomic_write_text
from lqmf.core.manifest import now_iso
from lqmf.core.names import validate_name
from lqmf.core.registry import AdapterEntry, Registry
from lqmf.core.workspace import Workspace

METRICS_LOG = "metrics.jsonl"
PLOT_NAMES = ("loss.png", "validation.png", "base.png", "confusion.png", "metrics.png")
PLOT_DPI = 110
EVAL_PLOT_KEYS = {"classification": ("eval_accuracy", "eval_macro_f1"), "generative": ("eval_perplexity",)}
BAR_KEYS = ("accuracy", "macro_f1", "rougeL", "perplexity", "tokens_per_s", "texts_per_s", "peak_memory_gb",
            "load_seconds")
HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2rem; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _require_report_libraries() -> None:
    require("matplotlib", "matplotlib", "bench")
    require("markdown_it", "markdown-it-py", "bench")


# ----------------------------------------------------------------------------- reading


def read_metrics_log(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a training run, one per step (the last one logged wins)."""
    path = folder / METRICS_LOG
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            {"train": train, "eval": evals}.get(record.get("type"), {})[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


# ----------------------------------------------------------------------------- markdown and html


def md_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return tabulate([[cell(v) for v in row] for row in rows], headers=[cell(h) for h in headers],
                    tablefmt="github", disable_numparse=True)


def markdown_to_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return HTML_PAGE.format(title=html.escape(title), body=body)


def _write_documents(ws: Workspace, name: str, markdown: str, title: str, images: list[Path]) -> dict[str, Any]:
    md_path = ws.reports_dir / f"{name}.md"
    html_path = ws.reports_dir / f"{name}.html"
    atomic_write_text(md_path, markdown)
    atomic_write_text(html_path, markdown_to_html(markdown, title))
    return {"markdown": str(md_path), "html": str(html_path), "images": [str(p) for p in images]}


# ----------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_loss(train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> Path:
    figure = _figure()
    axes = figure.add_subplot()
    if train:
        axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", linewidth=1.2)
    points = [r for r in evals if "eval_loss" in r]
    if points:
        axes.plot([r["step"] for r in points], [r["eval_loss"] for r in points], "o--", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_validation(evals: list[dict[str, Any]], task: str, path: Path) -> Path | None:
    keys = EVAL_PLOT_KEYS["classification" if task == "classification" else "generative"]
    points = [r for r in evals if any(k in r for k in keys)]
    if not points:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    for key in keys:
        axes.plot([r["step"] for r in points if key in r], [r[key] for r in points if key in r], "o-",
                  label=FIGURE_LABELS[key[5:]])
    if task != "classification":
        axes.set_yscale("log")
    else:
        axes.set_ylim(0, 1.02)
    axes.set_xlabel("optimizer step (0: before training)")
    axes.set_title("held-out validation metrics during training")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _bar_panels(figure, series: dict[str, dict[str, float]], keys: Sequence[str], colors=None) -> None:
    """One bar chart per figure key that any series has (up to 4 a row); series maps a bar label to figures."""
    shown = [k for k in keys if any(k in figures for figures in series.values())]
    colors = colors or {label: f"C{i % 10}" for i, label in enumerate(series)}
    columns = min(4, max(1, len(shown)))
    rows = -(-len(shown) // columns)
    figure.set_size_inches(2.6 * columns + 0.6, 2.9 * rows + 0.5)
    for index, key in enumerate(shown):
        axes = figure.add_subplot(rows, columns, index + 1)
        labels = [label for label, figures in series.items() if key in figures]
        values = [series[label][key] for label in labels]
        bars = axes.bar(range(len(labels)), values,
                        color=[colors[label] for label in labels])
        axes.bar_label(bars, labels=[fmt(v, key) for v in values], fontsize=8)
        axes.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 2 else 0, fontsize=8)
        better = "higher" if HIGHER_IS_BETTER[key] else "lower"
        axes.set_title(f"{FIGURE_LABELS[key]} ({better} is better)", fontsize=9)
        axes.margins(y=0.15)


def plot_versus_base(result: dict[str, Any], path: Path) -> Path:
    figure = _figure()
    series = {result["adapter"]: run_figures(result["adapter_run"]), "base": run_figures(result["base_run"])}
    _bar_panels(figure, series, BAR_KEYS, colors={result["adapter"]: "C0", "base": "C7"})
    figure.suptitle(f"{result['adapter']} vs its base model", fontsize=11)
    return _save(figure, path)


def plot_confusion(quality: dict[str, Any], path: Path, title: str) -> Path:
    labels, matrix = quality["labels"], quality["confusion_matrix"]
    size = 2.2 + 0.6 * len(labels)
    figure = _figure(size + 1, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    axes.set_xticks(range(len(labels)), labels, rotation=30)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true label")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, path)


def _clear_stale_plots(folder: Path, written: list[Path]) -> None:
    for name in PLOT_NAMES:
        stale = folder / name
        if stale not in written and stale.is_file():
            stale.unlink()


# ----------------------------------------------------------------------------- adapter report


def _adapter_rows(entry: AdapterEntry) -> list[list[str]]:
    m = entry.manifest
    metrics = m.get("metrics") or {}
    runtime = m.get("runtime") or {}
    dataset = m.get("dataset") or {}
    lora = m.get("lora") or {}
    targets = lora.get("target_modules")
    quant = "4-bit NF4" if runtime.get("quantized_4bit") else runtime.get("dtype", "?")
    rows = [
        ["base model", m["base_model"]["reference"]],
        ["task", m["task"]],
        ["dataset", f"{dataset.get('path')} ({dataset.get('rows')} rows: {dataset.get('train_examples')} train, "
                    f"{dataset.get('validation_examples')} validation)"],
        ["LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets: "
                 + (", ".join(targets) if isinstance(targets, list) else str(targets))],
        ["training", f"{metrics.get('steps')} steps ({metrics.get('epochs')} epochs) in "
                     f"{fmt(metrics.get('train_seconds'), 'load_seconds')} s on {runtime.get('device')} ({quant}), "
                     f"peak memory {fmt(metrics.get('peak_memory_gb'), 'peak_memory_gb')} GB"],
        ["created", m.get("created", "?")],
    ]
    if m.get("id2label"):
        rows.insert(2, ["labels", ", ".join(m["id2label"][str(i)] for i in range(len(m["id2label"])))])
    return rows


def _heldout_rows(metrics: dict[str, Any]) -> list[list[str]]:
    initial = metrics.get("initial") or {}
    rows = []
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_macro_f1"):
        if key in metrics:
            short = key[5:]
            rows.append([FIGURE_LABELS[short], fmt(initial.get(key), short), fmt(metrics[key], short)])
    return rows


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bench_lines(result: dict[str, Any]) -> list[str]:
    options = result["options"]
    hardware = result.get("hardware") or {}
    where = hardware.get("gpu") or hardware.get("cpu") or hardware.get("device")
    lines = [f"Saved {result.get('created')} in `{Path(result['source_file']).name}` on {where} "
             f"({hardware.get('device')}); {options['prompt_count']} prompts from "
             f"{options['prompts_file'] or 'the built-in set'}, {options['warmup']} warm-up run(s)"
             + ("" if result["task"] == "classification" else f", {options['max_new_tokens']} tokens per prompt")
             + "."]
    source = result.get("quality_data")
    if source:
        kind = "the held-out validation split of" if source["kind"] == "validation_split" else "the eval file"
        lines.append(f"Quality on {source['examples']} examples of {kind} `{source['path']}`.")
    rows, headers = side_by_side(result)
    lines += ["", md_table(rows, headers), ""]
    quality = result["adapter_run"].get("quality") or {}
    for sample in quality.get("samples", []):
        prompt, reference, answer = (_one_line(sample[k]) for k in ("prompt", "reference", "answer"))
        lines.append(f"- **prompt:** {prompt}  \n  **reference:** {reference}  \n  **answer:** {answer or '(empty)'}")
    if quality.get("samples"):
        lines.append("")
    lines += [f"> {note}" for note in result.get("notes", [])]
    return lines


def write_adapter_report(ws: Workspace, name: str) -> dict[str, Any]:
    """reports/NAME.md and .html with training curves, held-out metrics, the latest benchmark and the base."""
    _require_report_libraries()
    entry = Registry(ws).get(name)
    task = entry.manifest["task"]
    plots = ws.reports_dir / name
    train, evals = read_metrics_log(entry.path)
    images: list[Path] = []
    lines = [f"# Adapter report: {name}", "",
             f"Generated {now_iso()} by lqmf {__version__} from `adapters/{name}/` and `benchmarks/{name}/`.", "",
             "## The adapter", "", md_table(_adapter_rows(entry), ["", "value"]), "", "## Training", ""]
    if train or evals:
        images.append(plot_loss(train, evals, plots / "loss.png", f"{name}: loss"))
        lines += [f"![training and validation loss]({name}/loss.png)", ""]
        validation = plot_validation(evals, task, plots / "validation.png")
        if validation:
            images.append(validation)
            lines += [f"![validation metrics]({name}/validation.png)", ""]
    else:
        lines += [f"No training log (`adapters/{name}/{METRICS_LOG}`) to plot.", ""]
    heldout = _heldout_rows(entry.manifest.get("metrics") or {})
    if heldout:
        lines += ["Held-out validation split, before and after training:", "",
                  md_table(heldout, ["metric", "before", "after"]), ""]
    latest = latest_result(ws, name)
    if latest is None:
        lines += ["## Benchmark", "", f"No benchmark saved yet: run `lqmf bench {name} --base`.", ""]
    else:
        lines += ["## Benchmark", "", *_bench_lines(latest)]
        quality = latest["adapter_run"].get("quality") or {}
        if "confusion_matrix" in quality:
            images.append(plot_confusion(quality, plots / "confusion.png", f"{name}: confusion matrix"))
            lines += ["", f"![confusion matrix]({name}/confusion.png)", ""]
        with_base = latest if latest.get("base_run") else latest_result(ws, name, with_base=True)
        lines += ["", "## Compared with the base model", ""]
        if with_base is None:
            lines += [f"No benchmark of the base model saved yet: run `lqmf bench {name} --base`.", ""]
        else:
            if with_base is not latest:
                lines += _bench_lines(with_base)
            images.append(plot_versus_base(with_base, plots / "base.png"))
            main = MAIN_METRIC.get(task)
            delta = (with_base.get("deltas") or {}).get(main)
            if delta is not None:
                lines += [f"{FIGURE_LABELS[main]}: {fmt(delta, main, signed=True)} against the base model "
                          f"(benchmark of {with_base.get('created')}).", ""]
            lines += [f"![{name} vs its base model]({name}/base.png)", ""]
    _clear_stale_plots(plots, images)
    return _write_documents(ws, name, "\n".join(lines) + "\n", f"LQMF report: {name}", images)


# ----------------------------------------------------------------------------- comparison report


def _adapter_figures(ws: Workspace, entry: AdapterEntry) -> tuple[dict[str, float], str, dict[str, Any] | None]:
    """Key figures of an adapter: from its newest benchmark, else from the held-out metrics of training."""
    result = latest_result(ws, entry.name)
    if result is not None:
        return run_figures(result["adapter_run"]), f"benchmark {result.get('created')}", result
    metrics = entry.manifest.get("metrics") or {}
    figures = {key[5:]: float(value) for key, value in metrics.items()
               if key.startswith("eval_") and isinstance(value, int | float)}
    return figures, "training's held-out evaluation", None


def plot_curves(logs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], path: Path) -> Path:
    figure = _figure(10, 3.6)
    train_axes, eval_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for index, (name, (train, evals)) in enumerate(logs.items()):
        color = f"C{index % 10}"
        if train:
            train_axes.plot([r["epoch"] for r in train], [r["loss"] for r in train], color=color, label=name,
                            linewidth=1.2)
        points = [r for r in evals if "eval_loss" in r]
        if points:
            eval_axes.plot([r["epoch"] for r in points], [r["eval_loss"] for r in points], "o-", color=color,
                           label=name)
    for axes, title in ((train_axes, "training loss"), (eval_axes, "validation loss")):
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return _save(figure, path)


def write_comparison_report(ws: Workspace, patterns: Sequence[str], name: str = "compare") -> dict[str, Any]:
    """reports/NAME.md and .html comparing the adapters that match the patterns side by side."""
    _require_report_libraries()
    validate_name(name, "report")
    registry = Registry(ws)
    complete = [e.name for e in registry.entries() if e.complete]
    names = match_names(patterns, complete, "adapters", ws.adapters_dir)
    entries = [registry.get(n) for n in names]
    plots = ws.reports_dir / name
    logs = {e.name: read_metrics_log(e.path) for e in entries}
    figures, sources, results = {}, {}, []
    for entry in entries:
        figures[entry.name], sources[entry.name], result = _adapter_figures(ws, entry)
        if result is not None:
            results.append(result)
    images = [plot_curves(logs, plots / "loss.png")]
    if any(figures.values()):
        figure = _figure()
        _bar_panels(figure, figures, BAR_KEYS)
        images.append(_save(figure, plots / "metrics.png"))
    training_rows = []
    for entry in entries:
        metrics = entry.manifest.get("metrics") or {}
        training_rows.append([entry.name, entry.manifest["task"], entry.manifest["base_model"]["reference"],
                              metrics.get("steps"), fmt(metrics.get("train_loss"), "loss"),
                              fmt(metrics.get("eval_loss"), "loss"), sources[entry.name]])
    lines = [f"# Adapter comparison: {', '.join(names)}", "",
             f"Generated {now_iso()} by lqmf {__version__} from `adapters/` and `benchmarks/` "
             f"(patterns: {' '.join(patterns)}).", "",
             "## Training", "", f"![loss curves]({name}/loss.png)", "",
             md_table(training_rows, ["adapter", "task", "base", "steps", "final train loss", "final eval loss",
                                      "key figures from"]), ""]
    if len(images) > 1:
        lines += ["## Key figures", "", f"![key figures]({name}/metrics.png)", ""]
    if results:
        lines += ["## Latest benchmarks", "", comparison_table(results, tablefmt="github"), ""]
    missing = [n for n in names if not sources[n].startswith("benchmark")]
    if missing:
        lines += [f"Not benchmarked yet: {', '.join(missing)} (run `lqmf bench NAME`).", ""]
    _clear_stale_plots(plots, images)
    return _write_documents(ws, name, "\n".join(lines) + "\n", f"LQMF comparison: {', '.join(names)}", images)
