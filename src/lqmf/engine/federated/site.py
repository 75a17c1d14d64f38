"""A site: local rounds of training from the global adapter through the training recipe; the Flower client."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import federated as fed
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.names import slug
from lqmf.core.workspace import Workspace
from lqmf.engine.federated.wire import (
    ROUND_SETTINGS,
    SITE_KEYS,
    Progress,
    SiteRefused,
    adapter_arrays,
    decode,
    encode,
    flower,
    load_arrays,
)

# ----------------------------------------------------------------------------- a site


class SharedBase:
    """One base model for the sites of one process (simulate), trained one site at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: Any = None


@dataclass
class Site:
    """One site's data and local training; fit() is one round."""

    workspace: Workspace
    dataset_path: Path
    name: str = "site"
    model: str | None = None  # what this site was started for; checked against the server's run
    task: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # --set values (not fixed by the server)
    shared: SharedBase = field(default_factory=SharedBase)
    secret: bytes | None = None  # the federation's shared secret (--secret-file)
    rounds: int = 0

    def _join(self, run: fed.RunDescription) -> None:
        """First round: resolve the model and data as the server describes them, or refuse."""
        fixed = sorted(set(self.settings) & set(fed.FIXED_KEYS + SITE_KEYS[:4]))
        if fixed:
            raise SiteRefused(f"--set {fixed[0]}: the server decides it for every site")
        self.model_ref: ResolvedModel = ModelCatalogue(self.workspace).resolve(self.model or run.base_model)
        reason = fed.refusal(run, model=self.model, task=self.task, fingerprint=fed.model_fingerprint(
            self.model_ref.config), site_labels=[])
        if reason:
            raise SiteRefused(f"refused: {reason}")
        try:  # with the server's labels: a site may hold one class only
            self.dataset: TaskDataset = load_task_dataset(self.dataset_path, run.task, run.labels or None)
        except InputError as err:
            raise SiteRefused(f"refused: the server trains a {run.task} adapter and this site's data does not fit: "
                              f"{err.message}") from None
        values = {**self.settings, **run.train, **ROUND_SETTINGS, "base_model": self.model_ref.reference,
                  "dataset_path": str(self.dataset.path), "task_type": run.task, "max_steps": run.local_steps,
                  "job_name": f"federated-{slug(self.name)}"}
        self.config = cfg.resolve_config({}, {k: cfg.coerce_value(k, v, f"federated {k}")
                                              for k, v in values.items() if v is not None})
        cfg.check_complete(self.config)

    def fit(self, arrays: list[Any], run: fed.RunDescription, proximal_mu: float = 0.0) -> tuple[list[Any], int,
                                                                                                 dict[str, Any]]:
        """Train local_steps steps from the global adapter; (adapter arrays, training examples, metrics)."""
        if self.rounds == 0:
            self._join(run)
        with self.shared.lock:
            return self._train_round(decode(arrays, run.transport), run, proximal_mu)

    def _train_round(self, arrays: list[Any], run: fed.RunDescription, mu: float):
        import torch

        from lqmf.engine.loading import CLASSIFIER_HEADS
        from lqmf.engine.train import loop as trainer
        from lqmf.engine.train.recipe import train

        started = time.perf_counter()
        prepared = trainer.prepare(self.config, self.model_ref, self.dataset)
        memory = trainer.plan_memory(self.config, self.model_ref, prepared)
        if self.shared.loaded is None:
            self.shared.loaded = trainer.load_base(self.config, self.model_ref, prepared, self.dataset.task)
        base = self.shared.loaded
        torch.manual_seed(self.config.seed + self.rounds)
        heads = {name: getattr(base.model, name) for name in CLASSIFIER_HEADS if hasattr(base.model, name)}
        loaded = trainer.setup_model(self.config, self.model_ref, prepared, self.dataset.task, base=base)
        staging = self.workspace.root / "federated" / "sites" / slug(self.name) / "round"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        hooks = []
        try:
            keys, local = adapter_arrays(loaded.model, run.keys)
            self._check_shapes(keys, local, arrays)
            load_arrays(loaded.model, keys, arrays)
            if mu > 0:
                hooks = proximal_hooks(loaded.model, mu, prepared.accumulation)
            outcome = train(self.config, self.model_ref, self.dataset, staging, prepared=prepared,
                                    memory=memory, loaded=loaded)
            _, trained = adapter_arrays(loaded.model, run.keys)
        finally:
            for hook in hooks:
                hook.remove()
            base.model = loaded.model.unload()
            for name, head in heads.items():
                setattr(base.model, name, head)
            shutil.rmtree(staging, ignore_errors=True)
        self.rounds += 1
        metrics = {"site": self.name, "train_loss": float(outcome.metrics.get("train_loss", float("nan"))),
                   "seconds": round(time.perf_counter() - started, 2)}
        return encode(trained, run.transport), len(prepared.train), metrics

    @staticmethod
    def _check_shapes(keys: list[str], local: list[Any], received: list[Any]) -> None:
        if len(received) != len(local):
            raise SiteRefused(f"refused: the server sent {len(received)} adapter tensors; this site's model makes "
                              f"{len(local)}: not the same base model or LoRA targets")
        for key, mine, theirs in zip(keys, local, received, strict=True):
            if mine.shape != theirs.shape:
                raise SiteRefused(f"refused: adapter tensor {key} is {tuple(theirs.shape)} at the server, "
                                  f"{tuple(mine.shape)} here: not the same base model")


def proximal_hooks(model, mu: float, accumulation: int) -> list[Any]:
    """FedProx: each LoRA parameter's gradient gains mu * (w - w_global), once per optimizer step
    (split over the step's micro-batches), which is the gradient of mu/2 * ||w - w_global||^2."""
    hooks = []
    scale = mu / max(accumulation, 1)
    for parameter in model.parameters():
        if parameter.requires_grad:
            anchor = parameter.detach().clone()
            hooks.append(parameter.register_hook(lambda grad, p=parameter, a=anchor: grad + scale * (p.detach() - a)))
    return hooks


def flower_client(site: Site, progress: Progress):
    """The site as a Flower NumPyClient."""
    flwr = flower()

    class LqmfSite(flwr.client.NumPyClient):
        def get_parameters(self, config):
            return []  # the server starts from its own initial adapter

        def fit(self, parameters, config):
            check_server_proof(site.secret, config)
            run = fed.RunDescription.from_json(str(config["lqmf"]))
            mu = float(config.get("proximal_mu", 0.0))
            arrays, examples, metrics = site.fit(parameters, run, mu)
            if site.secret:
                metrics["proof"] = fed.proof(site.secret, "site", str(config["nonce"]), [a.tobytes() for a in arrays])
            progress(f"{site.name} round {config['round']}: {run.local_steps} steps on {examples} examples, "
                     f"train loss {metrics['train_loss']:.4f} ({metrics['seconds']:.1f} s)")
            return arrays, examples, metrics

    return LqmfSite()


def check_server_proof(secret: bytes | None, config: dict[str, Any]) -> None:
    """A site with a shared secret trains only for a server that proves it, and the other way round."""
    nonce = config.get("nonce")
    if secret and not nonce:
        raise SiteRefused("refused: this site has a shared secret (--secret-file) and the server asks for none")
    if nonce and not secret:
        raise SiteRefused("refused: the server requires the federation's shared secret: give --secret-file")
    if secret and not fed.proven(secret, "server", str(nonce), str(config["lqmf"]), config.get("server_proof")):
        raise SiteRefused("refused: the server did not prove the federation's shared secret")


def run_site(workspace: Workspace, site: Site, server: str, *, certificates: Path | None = None,
             progress: Progress = lambda line: None, max_wait_s: float = 600) -> dict[str, Any]:
    """Join the server at `server` until its run ends; returns what this site did."""
    fed.check_transport_security(server, certificates)
    flower()
    from flwr.client import start_client

    root = fed.certificate_files(certificates, server=False)["ca"].read_bytes() if certificates else None
    wait_for_server(server, max_wait_s)
    progress(f"{site.name}: joining {server} ({'TLS' if root else 'plain text, loopback'})")
    start_client(server_address=server, client=flower_client(site, progress).to_client(), root_certificates=root,
                 insecure=root is None, max_wait_time=max_wait_s)
    return {"site": site.name, "rounds": site.rounds, "dataset": str(site.dataset_path)}


def wait_for_server(address: str, timeout_s: float) -> None:
    """Wait until the server accepts connections (Flower's client gives up at once otherwise)."""
    host, port = fed.split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"no federated server answers at {address} after {timeout_s:.0f} s ({err})") \
                    from None
            time.sleep(0.5)
