"""Server and sites in one process on loopback (Flower's own server and clients, no Ray)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from lqmf.core import federated as fed
from lqmf.core.errors import InputError, LqmfError, RuntimeFailure
from lqmf.core.names import slug
from lqmf.core.serving import is_loopback
from lqmf.core.workspace import Workspace
from lqmf.engine.federated.server import ServerRequest, run_server
from lqmf.engine.federated.site import SharedBase, Site, run_site
from lqmf.engine.federated.wire import Progress

# ----------------------------------------------------------------------------- one machine


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulate(workspace: Workspace, request: ServerRequest, dataset: Path, clients: int, how: str = "iid",
             column: str | None = None, progress: Progress = lambda line: None, on_aggregate=None,
             spill: float = 0.05) -> dict[str, Any]:
    """Split dataset into `clients` sites and run server and sites in this process on loopback."""
    if not request.address or not is_loopback(fed.split_address(request.address)[0]):
        raise InputError("simulate runs on loopback only")
    request.check()
    folder = workspace.root / "federated" / "simulate" / slug(request.name or "run")
    files = fed.partition(dataset, clients, how, column, folder, spill=spill)
    progress(f"simulate: {clients} sites ({how}{' ' + column if column else ''}) in {folder}")
    shared = SharedBase()
    sites = [Site(workspace, path, name=f"site-{k + 1}", shared=shared, secret=request.secret)
             for k, path in enumerate(files)]
    errors: list[BaseException] = []

    def join(site: Site) -> None:
        try:
            run_site(workspace, site, request.address, progress=progress, max_wait_s=120)
        except BaseException as err:  # noqa: BLE001 - reported once the server has stopped
            errors.append(err)
            os.kill(os.getpid(), signal.SIGINT)  # Flower's server stops on it (its handler, main thread)

    threads = [threading.Thread(target=join, args=(site,), name=site.name, daemon=True) for site in sites]
    for thread in threads:
        thread.start()
    try:
        result = run_server(workspace, request, progress, on_aggregate)
    except (SystemExit, KeyboardInterrupt):
        if not errors:
            raise
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        first = errors[0]
        raise first if isinstance(first, LqmfError) else RuntimeFailure(f"a site failed: {first}")
    return {**result, "sites": [{"site": s.name, "dataset": str(s.dataset_path), "rounds": s.rounds} for s in sites]}
