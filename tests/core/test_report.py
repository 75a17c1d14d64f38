"""`lqmf report`: Markdown + HTML + PNG plots from saved files only, for one adapter and side by side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, bench_json, invoke, lqmf_env

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_ws(trained_workspace, tmp_path_factory) -> Path:
    """The trained adapters with saved benchmarks: sent and chat-a against their bases, chat-q alone."""
    root = tmp_path_factory.mktemp("report") / "ws"
    shutil.copytree(trained_workspace, root)
    bench_json(root, "sent", "--base", "--warmup", "0")
    bench_json(root, "chat-q", "--max-new-tokens", "2", "--eval-limit", "2", "--warmup", "0")
    return root


def assert_valid_pngs(paths: list[str]) -> None:
    from matplotlib.image import imread

    for path in paths:
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE, path
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path
        assert pixels.std() > 0.01, f"{path} is blank"


def report_json(workspace: Path, *args) -> dict:
    result = invoke(workspace, "report", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_classification_report_with_base(report_ws):
    written = report_json(report_ws, "sent")
    assert written["markdown"] == str(report_ws / "reports" / "sent.md")
    assert written["html"] == str(report_ws / "reports" / "sent.html")
    names = sorted(Path(p).name for p in written["images"])
    assert names == ["base.png", "confusion.png", "loss.png", "validation.png"]
    assert all(Path(p).parent == report_ws / "reports" / "sent" for p in written["images"])
    assert_valid_pngs(written["images"])
    markdown = Path(written["markdown"]).read_text()
    for text in ("# Adapter report: sent", "## Training", "Held-out validation split", "## Benchmark",
                 "## Compared with the base model", "| accuracy", "| texts/s", "randomly initialised",
                 "![confusion matrix](sent/confusion.png)", "![training and validation loss](sent/loss.png)"):
        assert text in markdown, text
    page = Path(written["html"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and '<img src="sent/base.png"' in page


def test_bench_report_flag_writes_the_report(report_ws):
    result = bench_json(report_ws, "chat-a", "--base", "--max-new-tokens", "2", "--eval-limit", "2", "--warmup", "0",
                        "--report")
    written = result["report"]
    assert sorted(Path(p).name for p in written["images"]) == ["base.png", "loss.png", "validation.png"]
    assert_valid_pngs(written["images"])
    markdown = Path(written["markdown"]).read_text()
    assert "| perplexity" in markdown and "ROUGE-L" in markdown and "**reference:**" in markdown
    assert Path(result["source_file"]).name in markdown


def test_report_without_base_or_benchmark(report_ws):
    alone = Path(report_json(report_ws, "chat-q")["markdown"]).read_text()
    assert "## Benchmark" in alone and "No benchmark of the base model saved yet" in alone
    fresh = report_json(report_ws, "instr-b")
    assert sorted(Path(p).name for p in fresh["images"]) == ["loss.png", "validation.png"]
    assert "No benchmark saved yet: run `lqmf bench instr-b --base`" in Path(fresh["markdown"]).read_text()


def test_compare_report_side_by_side(report_ws):
    written = report_json(report_ws, "compare", "chat*", "sent", "instr-b", "--name", "all-four")
    assert written["markdown"].endswith("reports/all-four.md")
    assert sorted(Path(p).name for p in written["images"]) == ["loss.png", "metrics.png"]
    assert_valid_pngs(written["images"])
    markdown = Path(written["markdown"]).read_text()
    assert "# Adapter comparison: chat-a, chat-q, sent, instr-b" in markdown
    assert "## Latest benchmarks" in markdown and "Not benchmarked yet: instr-b" in markdown
    assert "training's held-out evaluation" in markdown


def test_report_errors(report_ws):
    for args, code, text in ((["nope"], 3, "adapter 'nope' not found"),
                             (["compare", "zzz*"], 3, "no adapters match 'zzz*'"),
                             (["compare", "sent", "--name", "../up"], 2, "report name '../up'")):
        result = invoke(report_ws, "report", *args)
        assert result.exit_code == code, result.output
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and text in result.stderr


def test_reports_and_compare_never_import_torch(report_ws):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lqmf.cli.app import app\n"
        "from lqmf.bench import BenchmarkAgent\n"
        f"ws = {str(report_ws)!r}\n"
        "for args in (['report', 'sent'], ['report', 'compare', '*'], ['bench', 'compare', '*'],\n"
        "             ['bench', '--help']):\n"
        "    result = CliRunner().invoke(app, ['--workspace', ws, *args])\n"
        "    assert result.exit_code == 0, result.output\n"
        "BenchmarkAgent(ws).compare_models(BenchmarkAgent(ws).load_benchmark_results('*'))\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=lqmf_env(), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    heavy = {"torch", "transformers", "peft", "bitsandbytes", "datasets"} & set(out.stdout.split())
    assert not heavy, f"reports imported {heavy}"
