"""The workspace: configs/, adapters/, benchmarks/, reports/ under one root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lqmf.core.errors import InputError

WORKSPACE_ENV = "LQMF_HOME"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, option: str | Path | None = None) -> Workspace:
        """--workspace wins, then $LQMF_HOME, then the current directory."""
        chosen = option or os.environ.get(WORKSPACE_ENV) or os.getcwd()
        root = Path(chosen).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise InputError(f"workspace '{root}' is not a directory")
        return cls(root)

    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def benchmarks_dir(self) -> Path:
        return self.root / "benchmarks"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def models_file(self) -> Path:
        return self.configs_dir / "models.yaml"

    def resolve_path(self, path: str | Path) -> Path:
        """A user path: absolute, relative to the current directory, or else to the workspace."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate.resolve()
        in_workspace = self.root / candidate
        return in_workspace.resolve() if in_workspace.exists() else candidate.resolve()
