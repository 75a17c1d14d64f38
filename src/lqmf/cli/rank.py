"""One rank of a multi-GPU `lqmf train`: `python -m lqmf.cli.rank REQUEST.json`, started by the launcher
(engine/train/distributed.py) once per GPU. It runs the same training service as `lqmf train`."""

from __future__ import annotations

import sys

import typer

from lqmf.cli.output import App
from lqmf.cli.train_cmd import ProgressPrinter
from lqmf.core.errors import RankFailure

app = App(add_completion=False, no_args_is_help=False)


@app.command()
def rank(request: str = typer.Argument(..., help="The launcher's request file.")) -> None:
    """Run one rank of a multi-GPU training run."""
    import json
    from pathlib import Path

    from lqmf.engine.train.run import run_launch_request

    quiet = json.loads(Path(request).read_text()).get("quiet", False)
    try:
        run_launch_request(request, ProgressPrinter(quiet))
    except RankFailure as err:  # rank 0 reports it
        raise typer.Exit(err.exit_code) from None


if __name__ == "__main__":
    sys.exit(app(prog_name="lqmf-rank"))
