"""The guide's `agents.benchmark_agent` path: `from lqmf.agents.benchmark_agent import BenchmarkAgent`."""

from lqmf.bench import BenchmarkAgent

__all__ = ["BenchmarkAgent"]
