"""Non-IID MiniLM sentiment: a 2-site federation (split by label) against each site trained alone,
and the accuracy cost of bf16 transport. Prints JSON; docs/federated.md records a run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/federated_noniid.py OUT_DIR ROUNDS LOCAL_STEPS SPILL
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.engine.test_federated import MINILM_SETTINGS, split_file  # noqa: E402
from tests.helpers import EXAMPLES  # noqa: E402

from lqmf.core import federated as fed  # noqa: E402
from lqmf.core.workspace import Workspace  # noqa: E402
from lqmf.engine.federated import ServerRequest, free_loopback_port, simulate  # noqa: E402


def run(root: Path, held: Path, data: Path, name: str, clients: int, rounds: int, steps: int, spill: float,
        transport: str = "fp32") -> dict:
    request = ServerRequest(model="minilm", task="classification", rounds=rounds, min_clients=clients,
                            address=f"127.0.0.1:{free_loopback_port()}", name=name, held_out=held,
                            local_steps=steps, transport=transport, settings=dict(MINILM_SETTINGS), force=True)
    started = time.time()
    result = simulate(Workspace.resolve(str(root / "ws")), request, data, clients,
                      "by-column" if clients > 1 else "iid", "label" if clients > 1 else None,
                      progress=lambda line: print(line, file=sys.stderr), spill=spill)
    last = result["history"][-1]["eval"]
    return {"accuracy": last["accuracy"], "loss": round(last["loss"], 4), "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"], "seconds": round(time.time() - started, 1)}


def main() -> None:
    root, rounds, steps, spill = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    root.mkdir(parents=True, exist_ok=True)
    held, rest = split_file(EXAMPLES / "sentiment.csv", root, 80)
    sites = fed.partition(rest, 2, "by-column", "label", root / "parts", spill=spill)
    out = {"federated_fp32": run(root, held, rest, "fed", 2, rounds, steps, spill),
           **{f"site{k + 1}_alone": run(root, held, path, f"s{k + 1}", 1, rounds, steps, spill)
              for k, path in enumerate(sites)},
           "federated_bf16": run(root, held, rest, "fed16", 2, rounds, steps, spill, "bf16")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
