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
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import federated as fed
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.errors import ConflictError, InputError, LqmfError, RuntimeFailure
from lqmf.core.manifest import TASK_SHORT, build_manifest
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.names import slug
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace

# TrainConfig keys the server decides for every site (a site may set the others with --set).
SITE_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "head_learning_rate",
             "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "seed")
# A round trains a fixed number of steps from the global adapter: no warm-up, no decay, no local validation.
ROUND_SETTINGS = {"validation_split": 0.0, "eval_strategy": "no", "eval_at_start": False, "warmup_ratio": 0.0,
                  "lr_scheduler_type": "constant", "save_steps": 0}

Progress = Callable[[str], None]


class SiteRefused(InputError):
    """This site cannot join the server's run (another base model, task or label set)."""


def flower():
    """Import Flower with its telemetry off and its log at errors only (LQMF_DEBUG: all of it)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import flwr

    debug = os.environ.get("LQMF_DEBUG", "") not in ("", "0", "false")
    logging.getLogger("flwr").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    return flwr


# ----------------------------------------------------------------------------- tensors on the wire


def encode(arrays: list[Any], transport: str) -> list[Any]:
    """fp32 as is; bf16 as its 16-bit patterns (numpy has no bfloat16), half the bytes."""
    import numpy as np

    if transport == "fp32":
        return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
            for a in arrays]


def decode(arrays: list[Any], transport: str) -> list[Any]:
    import numpy as np

    if transport == "fp32":
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    import torch

    return [torch.from_numpy(np.array(a, dtype=np.int16)).view(torch.bfloat16).float().numpy() for a in arrays]


def adapter_arrays(model, keys: list[str] | None = None) -> tuple[list[str], list[Any]]:
    """The PEFT adapter state (LoRA pairs and a trained classifier head) as float32 arrays, in key order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    keys = keys or sorted(state)
    return keys, [state[k].detach().float().cpu().numpy() for k in keys]


def load_arrays(model, keys: list[str], arrays: list[Any]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)})


def payload_bytes(parameters) -> int:
    """Bytes of a Flower Parameters message's tensors (what crosses the network, less gRPC framing)."""
    return sum(len(tensor) for tensor in parameters.tensors)


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
    from flwr.compat.client.app import start_client

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
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx
    from flwr.server.strategy.aggregate import aggregate

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

        def proven(self, server_round: int, res) -> bool:
            """Without a secret every result counts; with one, only a site's that proves it."""
            if not request.secret:
                return True
            arrays = parameters_to_ndarrays(res.parameters)
            ok = fed.proven(request.secret, "site", self.nonces.get(server_round, ""), [a.tobytes() for a in arrays],
                            res.metrics.get("proof"))
            if not ok:
                progress(f"round {server_round}: dropped the result of a site without the shared secret "
                         f"({res.metrics.get('site', '?')})")
            return ok

        def configure_fit(self, server_round, parameters, client_manager):
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self.current = {"round": server_round, "started": time.perf_counter(),
                            "bytes_sent": sum(payload_bytes(ins.parameters) for _, ins in instructions)}
            return instructions

        def aggregate_fit(self, server_round, results, failures):
            received = sum(payload_bytes(res.parameters) for _, res in results)
            proven = [self.proven(server_round, res) for _, res in results]
            failures = [*failures, *(res for (_, res), ok in zip(results, proven, strict=True) if not ok)]
            results = [pair for pair, ok in zip(results, proven, strict=True) if ok]
            inputs = [(decode(parameters_to_ndarrays(res.parameters), run.transport), res.num_examples)
                      for _, res in results]
            self.current.update(bytes_received=received, clients=len(results), failures=len(failures),
                                examples=sum(n for _, n in inputs),
                                sites=sorted(str(res.metrics.get("site", "?")) for _, res in results))
            if not inputs:
                return None, {}
            self.global_arrays = aggregate(inputs)  # weighted by each site's example count
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


# ----------------------------------------------------------------------------- one machine


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulate(workspace: Workspace, request: ServerRequest, dataset: Path, clients: int, how: str = "iid",
             column: str | None = None, progress: Progress = lambda line: None, on_aggregate=None,
             spill: float = 0.05) -> dict[str, Any]:
    """Split dataset into `clients` sites and run server and sites in this process on loopback."""
    if not request.address or not fed.is_loopback(fed.split_address(request.address)[0]):
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
