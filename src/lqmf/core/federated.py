"""Federated fine-tuning decisions that need no torch: addresses, partitions, the run's description.

The federation itself is Flower's (engine/federated.py); this module decides what is allowed (plain
text only on loopback), how one file is split into sites for `lqmf federated simulate`, and what the
server tells each site about the run so that a site of another base model or task is refused.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError, LqmfError
from lqmf.core.serving import is_loopback

STRATEGIES = ("fedavg", "fedprox")
TRANSPORTS = ("fp32", "bf16")
PARTITIONS = ("iid", "by-column")
DEFAULT_ADDRESS = "127.0.0.1:9099"
# What a site may not change: the adapter's shape and what it is trained for.
FIXED_KEYS = ("base_model", "task_type", "lora_r", "lora_alpha", "target_modules")


FLOWER_SPEC = "flwr>=1.42,<1.43"


def require_flower() -> None:
    """Flower installs apart from its pins (they clash with lqmf's typer): say how, before any work."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise LqmfError(f"Flower is not installed; install it with: pip install 'lqmf[federated]' && "
                        f"pip install --no-deps '{FLOWER_SPEC}'")


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) -> (host, port); InputError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"address '{address}': expected HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host, int(port)


def check_transport_security(address: str, certificates: Path | None) -> None:
    """Plain text only on loopback: any other address needs TLS certificates."""
    host, _ = split_address(address)
    if certificates is None and not is_loopback(host):
        raise InputError(f"address '{address}' is not loopback: federated traffic off this machine needs TLS; "
                         "give --certificates DIR (ca.pem, and server.pem + server.key on the server)")


def certificate_files(folder: Path, server: bool) -> dict[str, Path]:
    """The PEM files of a TLS folder (ca.pem; the server also server.pem and server.key), checked."""
    names = {"ca": "ca.pem"}
    if server:
        names.update(certificate="server.pem", key="server.key")
    files = {role: folder / name for role, name in names.items()}
    for path in files.values():
        if not path.is_file():
            raise InputError(f"{path}: missing (a TLS folder holds ca.pem{', server.pem, server.key' if server else ''}"
                             "; see docs/federated.md)")
    return files


def read_secret(path: Path) -> bytes:
    """The shared secret of a federation: the file's content (at least 16 bytes, surrounding space stripped)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as err:
        raise InputError(f"{path}: cannot read the shared secret ({err.strerror})") from None
    if len(secret) < 16:
        raise InputError(f"{path}: a shared secret needs at least 16 bytes (e.g. openssl rand -hex 32 > {path.name})")
    return secret


def proof(secret: bytes, role: str, nonce: str, payload: list[bytes] | str) -> str:
    """HMAC-SHA256 of a round's nonce and what one side sends (the run, or a site's tensors)."""
    digest = hashlib.sha256()
    for part in [payload] if isinstance(payload, str) else payload:
        digest.update(part.encode() if isinstance(part, str) else part)
    return hmac.new(secret, f"{role}:{nonce}:{digest.hexdigest()}".encode(), hashlib.sha256).hexdigest()


def proven(secret: bytes, role: str, nonce: str, payload: list[bytes] | str, claimed: object) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(proof(secret, role, nonce, payload), claimed)


def model_fingerprint(model_config: dict[str, Any] | None) -> str:
    """A short hash of the base model's architecture (config.json's shape fields): equal on every site."""
    keys = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "vocab_size")
    shape = {k: (model_config or {}).get(k) for k in keys}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RunDescription:
    """What the server sends with every round: the sites check it before training."""

    base_model: str
    task: str
    fingerprint: str
    train: dict[str, Any]  # TrainConfig values every site uses (FIXED_KEYS and the local-step settings)
    keys: list[str]  # the adapter tensors' names, in the order of the parameters sent
    labels: list[str] = field(default_factory=list)
    local_steps: int = 10
    transport: str = "fp32"
    proximal_mu: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunDescription:
        return cls(**json.loads(text))


def refusal(run: RunDescription, *, model: str | None, task: str | None, fingerprint: str,
            site_labels: list[str]) -> str | None:
    """Why this site cannot take part in the server's run (None when it can)."""
    if task is not None and task != run.task:
        return f"the server trains a {run.task} adapter; this site was started for {task}"
    if model is not None and model != run.base_model:
        return f"the server trains on base model '{run.base_model}'; this site was started for '{model}'"
    if fingerprint != run.fingerprint:
        return (f"base model '{run.base_model}' differs here (architecture fingerprint {fingerprint}, the server's "
                f"{run.fingerprint}): every site needs the same base model")
    unknown = sorted(set(site_labels) - set(run.labels))
    if run.labels and unknown:
        return f"this site's labels {unknown} are not among the server's labels {run.labels}"
    return None


def _read_table(path: Path) -> tuple[list[dict[str, Any]], str]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle)), "csv"
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows, "jsonl"
    raise InputError(f"{path}: simulate splits .csv or .jsonl files")


def _write_table(path: Path, rows: list[dict[str, Any]], fmt: str, columns: list[str]) -> None:
    if fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def partition(path: Path, clients: int, how: str, column: str | None, out_dir: Path, seed: int = 42,
              spill: float = 0.05) -> list[Path]:
    """Split one dataset file into `clients` files (the simulated sites' data).

    iid: shuffled, dealt round-robin. by-column: rows of the k-th value of COLUMN go to site k mod
    clients, except a `spill` share dealt to the other sites (each site sees mostly one value).
    """
    if clients < 1:
        raise InputError("--clients must be at least 1")
    rows, fmt = _read_table(path)
    if len(rows) < clients:
        raise InputError(f"{path}: {len(rows)} rows cannot feed {clients} sites")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    parts: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    if how == "iid":
        for position, index in enumerate(order):
            parts[position % clients].append(rows[index])
    elif how == "by-column":
        if not column or column not in rows[0]:
            raise InputError(f"{path}: --partition by-column needs a column of the file; columns: {sorted(rows[0])}")
        values = sorted({str(row[column]) for row in rows})
        for index in order:
            home = values.index(str(rows[index][column])) % clients
            if clients > 1 and rng.random() < spill:
                home = rng.choice([k for k in range(clients) if k != home])
            parts[home].append(rows[index])
    else:
        raise InputError(f"--partition {how}: expected one of {', '.join(PARTITIONS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    files = []
    for k, part in enumerate(parts):
        if not part:
            raise InputError(f"{path}: site {k + 1} of {clients} gets no rows; use fewer --clients")
        target = out_dir / f"site-{k + 1}{path.suffix.lower()}"
        _write_table(target, part, fmt, columns)
        files.append(target)
    return files


def lineage(rounds: list[dict[str, Any]], *, strategy: str, transport: str, min_clients: int, fraction: float,
            local_steps: int) -> dict[str, Any]:
    """The manifest's "federated" record: per round who took part and the bytes each way."""
    return {
        "rounds": len(rounds), "strategy": strategy, "transport": transport, "min_clients": min_clients,
        "fraction": fraction, "local_steps": local_steps,
        "clients_per_round": [r["clients"] for r in rounds],
        "bytes_sent": sum(r["bytes_sent"] for r in rounds),
        "bytes_received": sum(r["bytes_received"] for r in rounds),
        "history": rounds,
    }
