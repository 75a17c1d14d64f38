"""Errors that the CLI turns into one line and an exit code.

Exit codes (documented in the README):
  0 ok, 1 failure, 2 bad input (config, dataset, arguments), 3 not found,
  4 already exists / conflict, 5 runtime failure (training, model loading),
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM): a resumable checkpoint was saved where possible.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LqmfError(Exception):
    """An error whose message is fit to show a user as it is."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InputError(LqmfError):
    """Bad user input: a config key, a dataset row, an argument."""

    exit_code = 2


class NotFoundError(LqmfError):
    exit_code = 3


class ConflictError(LqmfError):
    exit_code = 4


class RuntimeFailure(LqmfError):
    exit_code = 5


class Interrupted(LqmfError):
    exit_code = 130


class RankFailure(RuntimeFailure):
    """A failure every rank of a multi-process run agreed on; rank 0 reports it, the others exit quietly."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(module: str, package: str, extra: str) -> None:
    """Fail with an install hint, before any work is done, when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LqmfError(f"{package} is not installed; install it with: pip install 'lqmf[{extra}]'")
