"""The server: Flower's FedAvg/FedProx over the adapter tensors, held-out evaluation, registration."""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import federated as fed
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.errors import ConflictError, InputError, RuntimeFailure
from lqmf.core.manifest import TASK_SHORT, build_manifest
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.names import slug
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from lqmf.engine.federated.wire import (
    ROUND_SETTINGS,
    SITE_KEYS,
    Progress,
    adapter_arrays,
    decode,
    encode,
    flower,
    load_arrays,
    payload_bytes,
)

# ----------------------------------------------------------------------------- the server


@dataclass
class ServerRequest:
    model: str
    task: str
    rounds: int
    min_clients: int
    fraction: float = 1.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    address: str = fed.DEFAULT_ADDRESS
    name: str | None = None
    held_out: Path | None = None
    labels: list[str] = field(default_factory=list)
    local_steps: int = 10
    transport: str = "fp32"
    certificates: Path | None = None
    round_timeout_s: float | None = 900.0
    settings: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    secret: bytes | None = None

    def check(self) -> None:
        if self.strategy not in fed.STRATEGIES:
            raise InputError(f"--strategy {self.strategy}: expected one of {', '.join(fed.STRATEGIES)}")
        if self.transport not in fed.TRANSPORTS:
            raise InputError(f"--transport {self.transport}: expected one of {', '.join(fed.TRANSPORTS)}")
        if self.rounds < 1 or self.min_clients < 1 or self.local_steps < 1:
            raise InputError("--rounds, --min-clients and --local-steps must be at least 1")
        if not 0 < self.fraction <= 1:
            raise InputError(f"--fraction {self.fraction}: expected a share in (0, 1]")
        fed.check_transport_security(self.address, self.certificates)


class GlobalAdapter:
    """The server's copy of the model: the initial adapter, the held-out evaluation, the saved result."""

    def __init__(self, workspace: Workspace, request: ServerRequest):
        import torch

        from lqmf.engine.loading import load_tokenizer
        from lqmf.engine.train import loop as trainer

        self.model_ref = ModelCatalogue(workspace).resolve(request.model)
        self.held_out = load_task_dataset(workspace.resolve_path(request.held_out), request.task) \
            if request.held_out else None
        labels = request.labels or (self.held_out.labels if self.held_out else [])
        task = self.held_out.task if self.held_out else request.task
        if task == "classification" and not labels:
            raise InputError("a classification server needs its labels: give --eval FILE (a held-out file) or --labels")
        self.task, self.labels = task, list(labels)
        values = {**request.settings, **ROUND_SETTINGS, "base_model": request.model, "task_type": task,
                  "max_steps": request.local_steps,
                  "dataset_path": str(self.held_out.path) if self.held_out else "(federated: the sites' data)"}
        self.config = cfg.resolve_config({}, {k: cfg.coerce_value(k, v, f"federated {k}")
                                              for k, v in values.items() if v is not None})
        cfg.check_complete(self.config)  # the task's defaults (learning rate), sent to every site
        if self.held_out:
            self.held_out = replace(self.held_out, labels=self.labels)
            self.prepared = trainer.prepare(self.config, self.model_ref, self.held_out)
        else:
            self.prepared = trainer.Prepared([], [], self.labels, 1, 1, 1, 1, 0, 0, tokenizer=load_tokenizer(
                self.model_ref))
        torch.manual_seed(self.config.seed)
        self.loaded = trainer.setup_model(self.config, self.model_ref, self.prepared, task)
        self.keys, self.initial = adapter_arrays(self.loaded.model)

    def evaluate(self, arrays: list[Any]) -> dict[str, float]:
        from lqmf.engine.train import loop as trainer

        load_arrays(self.loaded.model, self.keys, arrays)
        return trainer.evaluate(self.loaded, self.prepared.train, self.task == "classification",
                                max(2, self.config.per_device_train_batch_size * 2), len(self.labels))

    def run_description(self, request: ServerRequest) -> fed.RunDescription:
        train = {k: v for k, v in self.config.to_dict().items() if k in SITE_KEYS and v is not None}
        return fed.RunDescription(base_model=request.model, task=self.task,
                                  fingerprint=fed.model_fingerprint(self.model_ref.config), train=train,
                                  keys=self.keys, labels=self.labels, local_steps=request.local_steps,
                                  transport=request.transport)


def lora_strategy(request: ServerRequest, run: fed.RunDescription, model: GlobalAdapter, progress: Progress,
                  on_aggregate: Callable[[int, list[tuple[list[Any], int]], list[Any]], None] | None = None):
    """Flower's FedAvg (or FedProx) over the adapter tensors, with bytes, held-out loss and history kept."""
    flower()
    from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx

    base_class = FedProx if request.strategy == "fedprox" else FedAvg

    class LoraStrategy(base_class):
        def __init__(self) -> None:
            extra = {"proximal_mu": request.proximal_mu} if request.strategy == "fedprox" else {}
            super().__init__(fraction_fit=request.fraction, fraction_evaluate=0.0, min_fit_clients=request.min_clients,
                             min_available_clients=request.min_clients, accept_failures=True,
                             initial_parameters=ndarrays_to_parameters(encode(model.initial, run.transport)),
                             on_fit_config_fn=self.fit_config, **extra)
            self.nonces: dict[int, str] = {}
            self.global_arrays = model.initial
            self.history: list[dict[str, Any]] = []
            self.current: dict[str, Any] = {}
            self.started = time.perf_counter()

        def fit_config(self, server_round: int) -> dict[str, Any]:
            config: dict[str, Any] = {"lqmf": run.to_json(), "round": server_round}
            if request.secret:
                nonce = self.nonces[server_round] = secrets.token_hex(16)
                config.update(nonce=nonce, server_proof=fed.proof(request.secret, "server", nonce, config["lqmf"]))
            return config

        def configure_fit(self, server_round, parameters, client_manager):
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self.current = {"round": server_round, "started": time.perf_counter(),
                            "bytes_sent": sum(payload_bytes(ins.parameters) for _, ins in instructions)}
            return instructions

        def aggregate_fit(self, server_round, results, failures):
            received = sum(payload_bytes(res.parameters) for _, res in results)
            proven = [_site_proven(request, self.nonces.get(server_round, ""), server_round, res, progress)
                      for _, res in results]
            failures = [*failures, *(res for (_, res), ok in zip(results, proven, strict=True) if not ok)]
            results = [pair for pair, ok in zip(results, proven, strict=True) if ok]
            inputs = [(decode(parameters_to_ndarrays(res.parameters), run.transport), res.num_examples)
                      for _, res in results]
            self.current.update(bytes_received=received, clients=len(results), failures=len(failures),
                                examples=sum(n for _, n in inputs),
                                sites=sorted(str(res.metrics.get("site", "?")) for _, res in results))
            if not inputs:
                return None, {}
            decoded = [(proxy, FitRes(res.status, ndarrays_to_parameters(arrays), res.num_examples, res.metrics))
                       for (proxy, res), (arrays, _) in zip(results, inputs, strict=True)]
            averaged, _ = super().aggregate_fit(server_round, decoded, failures)  # Flower's: weighted by examples
            self.global_arrays = parameters_to_ndarrays(averaged)
            if on_aggregate is not None:
                on_aggregate(server_round, inputs, self.global_arrays)
            return ndarrays_to_parameters(encode(self.global_arrays, run.transport)), {}

        def evaluate(self, server_round, parameters):
            scores = model.evaluate(decode(parameters_to_ndarrays(parameters), run.transport)) \
                if model.held_out else None
            if server_round == 0:
                if scores:
                    progress(f"round 0/{request.rounds}: held-out loss {scores['loss']:.4f}" + _accuracy(scores))
                    self.history.append({"round": 0, "eval": scores})
                return (scores["loss"], scores) if scores else None
            record = {**self.current, "eval": scores, "seconds": round(time.perf_counter() - self.current.get(
                "started", time.perf_counter()), 2)}
            record.pop("started", None)
            self.history.append(record)
            progress(_round_line(record, request.rounds, time.perf_counter() - self.started))
            return (scores["loss"], scores) if scores else None

        def rounds(self) -> list[dict[str, Any]]:
            return [r for r in self.history if r["round"] > 0]

    return LoraStrategy()


def _site_proven(request: ServerRequest, nonce: str, server_round: int, res, progress: Progress) -> bool:
    """Without a secret every result counts; with one, only a site's that proves it."""
    if not request.secret:
        return True
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(res.parameters)
    ok = fed.proven(request.secret, "site", nonce, [a.tobytes() for a in arrays], res.metrics.get("proof"))
    if not ok:
        progress(f"round {server_round}: dropped the result of a site without the shared secret "
                 f"({res.metrics.get('site', '?')})")
    return ok


def _accuracy(scores: dict[str, Any]) -> str:
    return f", accuracy {scores['accuracy']:.3f}" if "accuracy" in scores else ""


def _round_line(record: dict[str, Any], rounds: int, elapsed: float) -> str:
    done = record["round"]
    eta = elapsed / done * (rounds - done)
    scores = record["eval"]
    held = f", held-out loss {scores['loss']:.4f}{_accuracy(scores)}" if scores else ""
    failed = f", {record['failures']} failed" if record.get("failures") else ""
    return (f"round {done}/{rounds}: {record.get('clients', 0)} sites{failed}, {record.get('examples', 0)} examples"
            f"{held}; sent {record.get('bytes_sent', 0):,} B, received {record.get('bytes_received', 0):,} B "
            f"({record['seconds']:.1f} s, ETA {eta:.0f} s)")


def adapter_name(registry: Registry, model: ResolvedModel, task: str, name: str | None, force: bool) -> str:
    if name:
        if registry.exists(name) and not force:
            raise ConflictError(f"adapter '{name}' already exists; use --force to replace it or another --name")
        return name
    stem = f"{slug(model.display_name)}-{TASK_SHORT.get(task, task)}-federated"
    candidate, suffix = stem, 1
    while registry.exists(candidate):
        suffix += 1
        candidate = f"{stem}-{suffix}"
    return candidate


def run_server(workspace: Workspace, request: ServerRequest, progress: Progress = lambda line: None,
               on_aggregate=None, ready: threading.Event | None = None) -> dict[str, Any]:
    """Run the federation to its last round and register the global adapter; returns its summary."""
    request.check()
    registry = Registry(workspace)
    model = GlobalAdapter(workspace, request)
    name = adapter_name(registry, model.model_ref, model.task, request.name, request.force)
    run = model.run_description(request)
    strategy = lora_strategy(request, run, model, progress, on_aggregate)
    flower()
    from flwr.server import ServerConfig, start_server

    certificates = None
    if request.certificates:
        files = fed.certificate_files(request.certificates, server=True)
        certificates = (files["ca"].read_bytes(), files["certificate"].read_bytes(), files["key"].read_bytes())
    progress(f"server {request.address}: {request.rounds} rounds, at least {request.min_clients} sites, "
             f"{len(run.keys)} adapter tensors ({request.transport}), {'TLS' if certificates else 'plain text'}"
             f"{', shared secret' if request.secret else ''}")
    if ready is not None:
        ready.set()
    start_server(server_address=request.address, strategy=strategy, certificates=certificates,
                 config=ServerConfig(num_rounds=request.rounds, round_timeout=request.round_timeout_s))
    rounds = strategy.rounds()
    if not any(r.get("clients") for r in rounds):
        raise RuntimeFailure("no site returned an adapter in any round: nothing to register")
    return register(workspace, registry, name, model, request, strategy.global_arrays, rounds)


def register(workspace: Workspace, registry: Registry, name: str, model: GlobalAdapter, request: ServerRequest,
             arrays: list[Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Save the global adapter (PEFT files) with a manifest holding the federation's lineage."""
    from lqmf.engine.train import loop as trainer

    load_arrays(model.loaded.model, model.keys, arrays)
    staging = registry.staging_path(name)
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_adapter(model.loaded.model, staging)
    lineage = fed.lineage(rounds, strategy=request.strategy, transport=request.transport,
                          min_clients=request.min_clients, fraction=request.fraction, local_steps=request.local_steps)
    dataset = model.held_out or TaskDataset(Path(f"federated:{name}"), model.task, [], "", list(model.labels))
    last_eval = next((r["eval"] for r in reversed(rounds) if r.get("eval")), None) or {}
    metrics = {f"eval_{k}": v for k, v in last_eval.items()}
    plan = {"train_examples": 0, "validation_examples": len(model.prepared.train)}
    manifest = build_manifest(name, model.config, model.model_ref, dataset, plan, metrics,
                              {**model.loaded.runtime(), "federated": True})
    manifest["federated"] = lineage
    target = registry.finalize(name, staging, manifest, force=request.force)
    return {"adapter": name, "path": str(target), "task": model.task, "metrics": metrics, **lineage}
