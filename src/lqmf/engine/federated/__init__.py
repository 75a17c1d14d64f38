"""Federated fine-tuning on Flower: sites train one LoRA adapter; only adapter tensors travel.

Server: Flower's gRPC server (flwr.server.start_server) with Flower's FedAvg or FedProx strategy,
extended to decode the transport, count bytes, evaluate the global adapter on a held-out file each
round and keep the history; the result is registered as an adapter with its lineage.
Site: Flower's client (flwr.client.start_client); each round it trains `local_steps` optimizer steps
from the global adapter through the training service (engine/train/recipe.py, as `lqmf tune` runs
it: the base loaded once, a fresh LoRA wrapper per round) and returns the adapter tensors only.
Simulation: the same server and sites in one process, the sites in threads on loopback.

Flower's deprecated-but-present start_server/start_client API is used rather than SuperLink +
`flwr run`: the latter loads the apps from a Flower App Bundle through Flower's own CLI, which pins
typer < 0.21 (LQMF needs >= 0.26), and needs three long-lived processes per side.

- wire.py: what both sides share (the fixed settings, Flower's import, tensors on the wire, bytes).
- site.py: `Site` (one site's rounds), the Flower client, `run_site`, the shared-secret check.
- server.py: `ServerRequest`, `GlobalAdapter`, the strategy, `run_server`, registration.
- simulate.py: `simulate`, server and sites in one process on loopback.
"""

from lqmf.engine.federated.server import GlobalAdapter, ServerRequest, run_server
from lqmf.engine.federated.simulate import free_loopback_port, simulate
from lqmf.engine.federated.site import Site, SiteRefused, check_server_proof, run_site

__all__ = ["GlobalAdapter", "ServerRequest", "Site", "SiteRefused", "check_server_proof", "free_loopback_port",
           "run_server", "run_site", "simulate"]
