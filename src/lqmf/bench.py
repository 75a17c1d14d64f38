"""Benchmarking from Python, as the feature guide shows it:

    from lqmf.bench import BenchmarkAgent

    agent = BenchmarkAgent()          # the workspace: $LQMF_HOME, else the current directory
    results = agent.load_benchmark_results("finance*")
    comparison_table = agent.compare_models(results)

Importing this module is light (no torch); `benchmark()` loads models when it is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lqmf.core.bench import comparison_table, load_results
from lqmf.core.workspace import Workspace


class BenchmarkAgent:
    """Run benchmarks and load, compare saved results in one workspace."""

    def __init__(self, workspace: str | Path | Workspace | None = None):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)

    def load_benchmark_results(self, *patterns: str, all_runs: bool = False) -> list[dict[str, Any]]:
        """Saved results of the adapters matching the names or globs: the newest per adapter (or all runs).

        An empty list when nothing matches (`lqmf bench compare` says so as an error instead).
        """
        from lqmf.core.errors import NotFoundError

        try:
            return load_results(self.workspace, patterns, all_runs=all_runs)
        except NotFoundError:
            return []

    def compare_models(self, results: list[dict[str, Any]], tablefmt: str = "simple") -> str:
        """The key figures of the results as one table (any tabulate format: 'github', 'html', ...)."""
        return comparison_table(results, tablefmt=tablefmt)

    def benchmark(self, adapter: str, prompts_file: str | Path | None = None, *, base: bool = False,
                  eval_file: str | Path | None = None, eval_limit: int = 200, max_new_tokens: int = 64,
                  warmup: int = 1, device: str = "auto", save: bool = True, local: bool = False) -> dict[str, Any]:
        """Benchmark an adapter (and with base=True its base model), as `lqmf bench` does; returns the result.

        Like `lqmf bench`, a running `lqmf serve` of the workspace that holds the adapter answers
        (result["via"] == "server") unless local=True.
        """
        from lqmf.core.serving import server_with_adapter
        from lqmf.engine.evaluation import benchmark

        served = None if local else server_with_adapter(self.workspace, adapter)
        return benchmark(self.workspace, adapter, prompts_file, base=base, eval_file=eval_file,
                         eval_limit=eval_limit, max_new_tokens=max_new_tokens, warmup=warmup, device=device,
                         save=save, served=served)
