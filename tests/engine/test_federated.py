"""lqmf federated: Flower server and sites training one LoRA adapter; only adapter tensors travel.

All traffic is on 127.0.0.1, every wait is bounded, and every process started here is stopped here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lqmf.core import federated as fed
from lqmf.core.errors import InputError
from tests.helpers import EXAMPLES, lqmf_env, running_server, stop

pytest.importorskip("flwr")

TINY_SETTINGS = {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                 "max_seq_length": 256, "use_4bit_quantization": False}
ROUNDS, LOCAL_STEPS = 8, 4  # the MiniLM comparison (docs/federated.md)
MINILM_SETTINGS = {"learning_rate": 5e-3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                   "max_seq_length": 128, "use_4bit_quantization": False}


def split_file(source: Path, folder: Path, held_out: int) -> tuple[Path, Path]:
    """(held-out file, the rest) of a .jsonl or .csv file: the server's and the sites' data."""
    lines = source.read_text(encoding="utf-8").splitlines()
    header = [lines.pop(0)] if source.suffix == ".csv" else []
    held, rest = folder / f"held{source.suffix}", folder / f"sites{source.suffix}"
    held.write_text("\n".join(header + lines[:held_out]) + "\n", encoding="utf-8")
    rest.write_text("\n".join(header + lines[held_out:]) + "\n", encoding="utf-8")
    return held, rest


# ----------------------------------------------------------------------------- decisions (no torch)


def test_plain_text_only_on_loopback():
    fed.check_transport_security("127.0.0.1:9099", None)
    fed.check_transport_security("localhost:9099", None)
    fed.check_transport_security("[::1]:9099", None)
    with pytest.raises(InputError, match="not loopback.*needs TLS"):
        fed.check_transport_security("192.168.1.5:9099", None)
    fed.check_transport_security("192.168.1.5:9099", Path("certs"))  # checked again when the files are read
    with pytest.raises(InputError, match="expected HOST:PORT"):
        fed.split_address("server-without-port")


def test_server_refuses_a_plain_text_public_address_in_one_line(cli, workspace):
    result = cli("federated", "server", "--model", "tiny", "--task", "chat", "--address", "10.0.0.7:9099")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "needs TLS" in result.output


def test_partitions(tmp_path):
    source = EXAMPLES / "sentiment.csv"
    iid = fed.partition(source, 3, "iid", None, tmp_path / "iid")
    sizes = [len(p.read_text().splitlines()) - 1 for p in iid]
    assert sum(sizes) == 400 and max(sizes) - min(sizes) <= 1
    by_label = fed.partition(source, 2, "by-column", "label", tmp_path / "by")
    import csv

    for path in by_label:
        labels = [row["label"] for row in csv.DictReader(path.open())]
        top = max(labels.count(value) for value in set(labels))
        assert 0.9 < top / len(labels) < 1.0  # mostly one class, a few of the other
    with pytest.raises(InputError, match="by-column needs a column"):
        fed.partition(source, 2, "by-column", "nope", tmp_path / "x")


def test_a_site_of_another_model_task_or_labels_is_refused():
    run = fed.RunDescription(base_model="tiny", task="classification", fingerprint="abc", train={}, keys=[],
                             labels=["negative", "positive"])
    assert fed.refusal(run, model=None, task=None, fingerprint="abc", site_labels=["positive"]) is None
    assert "started for chat" in fed.refusal(run, model=None, task="chat", fingerprint="abc", site_labels=[])
    assert "started for 'other'" in fed.refusal(run, model="other", task=None, fingerprint="abc", site_labels=[])
    assert "fingerprint" in fed.refusal(run, model=None, task=None, fingerprint="xyz", site_labels=[])
    assert "['neutral']" in fed.refusal(run, model=None, task=None, fingerprint="abc", site_labels=["neutral"])


# ----------------------------------------------------------------------------- simulated, tiny model


@pytest.fixture(scope="module")
def tiny_federation(tiny_model, tmp_path_factory):
    """3 simulated sites, 3 rounds on the tiny Llama; the aggregation inputs and outputs recorded."""
    from lqmf.core.workspace import Workspace
    from lqmf.engine.federated import ServerRequest, free_loopback_port, simulate

    root = tmp_path_factory.mktemp("federated")
    held, rest = split_file(EXAMPLES / "instructions.jsonl", root, 20)
    ws = Workspace.resolve(str(root / "ws"))
    request = ServerRequest(model=str(tiny_model), task="instruction_following", rounds=3, min_clients=3,
                            address=f"127.0.0.1:{free_loopback_port()}", name="fed-tiny", held_out=held,
                            local_steps=3, settings=dict(TINY_SETTINGS))
    rounds, lines = [], []
    result = simulate(ws, request, rest, 3, progress=lines.append,
                      on_aggregate=lambda r, inputs, output: rounds.append((inputs, output)))
    return {"workspace": root / "ws", "result": result, "rounds": rounds, "lines": lines, "model": tiny_model}


def test_the_aggregate_is_the_example_weighted_mean(tiny_federation):
    rounds = tiny_federation["rounds"]
    assert len(rounds) == 3
    for inputs, output in rounds:
        assert len(inputs) == 3
        counts = np.array([n for _, n in inputs], dtype=np.float64)
        assert sorted(counts) == [33, 33, 34]
        for k, aggregated in enumerate(output):
            stacked = np.stack([arrays[k] for arrays, _ in inputs]).astype(np.float64)
            expected = np.tensordot(counts / counts.sum(), stacked, axes=1)
            np.testing.assert_allclose(aggregated, expected, rtol=1e-5, atol=1e-7)
        lora_b = [k for k, arrays in enumerate(inputs[0][0]) if np.abs(arrays).max() == 0]
        assert not lora_b, "every tensor trained"
        assert not np.allclose(inputs[0][0][0], inputs[1][0][0]), "the sites trained on different data"


def test_the_held_out_loss_falls_and_the_lineage_is_recorded(tiny_federation):
    from safetensors.numpy import load_file

    result = tiny_federation["result"]
    history = result["history"]
    losses = [r["eval"]["loss"] for r in history]
    initial = next(line for line in tiny_federation["lines"] if line.startswith("round 0/3"))
    first = float(initial.split("held-out loss ")[1])
    assert losses[-1] < first and min(losses) < first, (first, losses)
    assert result["clients_per_round"] == [3, 3, 3]
    assert result["bytes_sent"] == result["bytes_received"] == sum(r["bytes_sent"] for r in history) > 0
    assert any(line.startswith("round 3/3: 3 sites") and "ETA" in line for line in tiny_federation["lines"])
    folder = tiny_federation["workspace"] / "adapters" / "fed-tiny"
    manifest = json.loads((folder / "lqmf.json").read_text())
    assert manifest["federated"]["rounds"] == 3 and manifest["federated"]["clients_per_round"] == [3, 3, 3]
    assert manifest["federated"]["bytes_received"] == result["bytes_received"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    final = tiny_federation["rounds"][-1][1]
    assert len(saved) == len(final)
    assert any(np.allclose(array, final[0]) for array in saved.values())


def test_the_federated_adapter_answers_with_test_and_serve(tiny_federation, run_lqmf, tmp_path):
    ws = tiny_federation["workspace"]
    answered = run_lqmf("--workspace", ws, "test", "fed-tiny", "Summarise: the cat sat.", "--max-new-tokens", "6",
                        "--json", env={"OMP_NUM_THREADS": "1"})
    assert answered.returncode == 0, answered.stderr
    expected = json.loads(answered.stdout)["answer"]
    with running_server(ws, "--adapter", "fed-tiny", "--max-new-tokens", "6") as server:
        body = json.dumps({"model": "fed-tiny", "max_tokens": 6, "temperature": 0,
                           "messages": [{"role": "user", "content": "Summarise: the cat sat."}]}).encode()
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
    assert reply["model"] == "fed-tiny"
    assert reply["choices"][0]["message"]["content"] == expected


@pytest.mark.slow
def test_non_iid_federation_beats_each_site_alone(minilm, tmp_path):
    """2 sites split by label (each almost only one class): the federated adapter's held-out accuracy
    beats each site trained alone for the same steps. Measured numbers: docs/federated.md."""
    from lqmf.core.workspace import Workspace
    from lqmf.engine.federated import ServerRequest, free_loopback_port, simulate

    held, rest = split_file(EXAMPLES / "sentiment.csv", tmp_path, 80)
    sites = fed.partition(rest, 2, "by-column", "label", tmp_path / "parts", spill=0.02)
    ws = Workspace.resolve(str(tmp_path / "ws"))

    def accuracy(name: str, data: Path, clients: int) -> float:
        request = ServerRequest(model="minilm", task="classification", rounds=ROUNDS, min_clients=clients,
                                address=f"127.0.0.1:{free_loopback_port()}", name=name, held_out=held,
                                local_steps=LOCAL_STEPS, settings=dict(MINILM_SETTINGS))
        result = simulate(ws, request, data, clients, "by-column" if clients > 1 else "iid",
                          "label" if clients > 1 else None, spill=0.02)
        return result["history"][-1]["eval"]["accuracy"]

    federated = accuracy("federated", rest, 2)
    alone = [accuracy(f"alone-{k}", path, 1) for k, path in enumerate(sites)]
    assert federated > max(alone), (federated, alone)


# ----------------------------------------------------------------------------- real processes on loopback


def start(args: list[str], workspace: Path, log: Path) -> subprocess.Popen:
    env = lqmf_env({"OMP_NUM_THREADS": "1"})
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "lqmf", "--workspace", str(workspace), "federated", *args],
                                stdout=subprocess.PIPE, stderr=stderr, env=env, stdin=subprocess.DEVNULL, text=True)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode} before '{text}':\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no '{text}' in {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def test_server_and_two_clients_finish_although_one_is_killed_mid_round(tiny_model, tmp_path):
    from lqmf.engine.federated import free_loopback_port

    held, rest = split_file(EXAMPLES / "instructions.jsonl", tmp_path, 20)
    halves = fed.partition(rest, 2, "iid", None, tmp_path / "sites")
    address = f"127.0.0.1:{free_loopback_port()}"
    sets = [arg for key, value in TINY_SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    server_log, a_log, b_log = tmp_path / "server.log", tmp_path / "a.log", tmp_path / "b.log"
    procs = [start(["server", "--model", str(tiny_model), "--task", "instruction_following", "--rounds", "3",
                    "--min-clients", "1", "--address", address, "--name", "fed-procs", "--eval", str(held),
                    "--local-steps", "25", "--json", *sets], tmp_path / "server-ws", server_log)]
    try:
        procs.append(start(["client", str(halves[0]), "--server", address, "--name", "site-a", "--wait", "120"],
                           tmp_path / "a-ws", a_log))
        procs.append(start(["client", str(halves[1]), "--server", address, "--name", "site-b", "--wait", "120"],
                           tmp_path / "b-ws", b_log))
        wait_for_line(b_log, "site-b round ", procs[2])  # site-b trained a round (its first)...
        wait_for_line(server_log, "2 sites", procs[0])  # ...the server aggregated it, the next round begins
        assert "round 3/3" not in server_log.read_text(), "site-b joined too late to be killed mid-round"
        procs[2].kill()  # site-b is in the next round's training now
        procs[2].wait(timeout=30)
        out, _ = procs[0].communicate(timeout=300)
        assert procs[0].returncode == 0, server_log.read_text()
        result = json.loads(out)
        assert max(result["clients_per_round"]) == 2 and result["clients_per_round"][-1] == 1, result
        assert sum(r["failures"] for r in result["history"]) == 1, result["history"]
        assert procs[1].wait(timeout=60) == 0, a_log.read_text()
        assert (tmp_path / "server-ws" / "adapters" / "fed-procs" / "lqmf.json").is_file()
        assert not (tmp_path / "a-ws" / "adapters").exists()  # a site keeps no adapter, only its data
    finally:
        for proc in procs:
            stop(proc)


def test_sites_of_the_wrong_task_or_model_are_refused(tiny_model, tiny_model_no_template, tmp_path):
    from lqmf.engine.federated import free_loopback_port

    address = f"127.0.0.1:{free_loopback_port()}"
    server_log = tmp_path / "server.log"
    procs = [start(["server", "--model", str(tiny_model), "--task", "instruction_following", "--rounds", "1",
                    "--min-clients", "2", "--address", address, "--local-steps", "1"], tmp_path / "ws", server_log)]
    try:
        wrong_task = start(["client", str(EXAMPLES / "sentiment.csv"), "--server", address, "--wait", "120"],
                           tmp_path / "ws-task", tmp_path / "task.log")
        wrong_model = start(["client", str(EXAMPLES / "instructions.jsonl"), "--server", address, "--wait", "120",
                             "--model", str(tiny_model_no_template)], tmp_path / "ws-model", tmp_path / "model.log")
        procs += [wrong_task, wrong_model]
        assert wrong_task.wait(timeout=240) == 2
        assert wrong_model.wait(timeout=240) == 2
        task_error = (tmp_path / "task.log").read_text().strip().splitlines()[-1]
        model_error = (tmp_path / "model.log").read_text().strip().splitlines()[-1]
        assert task_error.startswith("error: refused: the server trains a instruction_following adapter"), task_error
        assert "sentiment.csv" in task_error
        assert model_error.startswith("error: refused: the server trains on base model"), model_error
        assert procs[0].wait(timeout=120) != 0
        assert "no site returned an adapter" in server_log.read_text()
    finally:
        for proc in procs:
            stop(proc)


def test_a_site_may_hold_one_class_of_the_servers_labels(tmp_path):
    from lqmf.core.datasets import load_task_dataset

    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\ngreat,positive\nlovely,positive\n", encoding="utf-8")
    with pytest.raises(InputError, match="at least two label classes"):
        load_task_dataset(one_class, "classification")
    assert load_task_dataset(one_class, "classification", ["negative", "positive"]).labels == ["negative", "positive"]
    with pytest.raises(InputError, match=r"labels \['positive'\] are not among \['a', 'b'\]"):
        load_task_dataset(one_class, "classification", ["a", "b"])


def test_simulate_on_the_command_line(cli, workspace, tiny_model):
    held, rest = split_file(EXAMPLES / "instructions.jsonl", workspace, 20)
    secret = workspace / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    sets = [arg for key, value in TINY_SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    result = cli("federated", "simulate", rest, "--model", tiny_model, "--task", "instruction_following",
                 "--clients", "2", "--rounds", "1", "--local-steps", "1", "--eval", held, "--transport", "bf16",
                 "--name", "fed-cli", "--secret-file", secret, "--json", *sets)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["adapter"] == "fed-cli" and summary["clients_per_round"] == [2]
    assert summary["transport"] == "bf16" and [s["rounds"] for s in summary["sites"]] == [1, 1]
    assert "round 1/1: 2 sites" in result.stderr and "shared secret" in result.stderr
    assert "dropped" not in result.stderr
    assert (workspace / "adapters" / "fed-cli" / "adapter_model.safetensors").is_file()


def test_the_shared_secret_is_proven_both_ways(tmp_path):
    from lqmf.engine.federated import SiteRefused, check_server_proof

    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(InputError, match="at least 16 bytes"):
        fed.read_secret(short)
    secret, other = b"s" * 32, b"t" * 32
    tensors = [b"\x00\x01", b"\x02"]
    claim = fed.proof(secret, "site", "n1", tensors)
    assert fed.proven(secret, "site", "n1", tensors, claim)
    assert not fed.proven(secret, "site", "n2", tensors, claim)  # another round's nonce
    assert not fed.proven(secret, "site", "n1", [b"\x00\x01", b"\x03"], claim)  # other tensors
    assert not fed.proven(other, "site", "n1", tensors, claim) and not fed.proven(secret, "site", "n1", tensors, None)
    config = {"lqmf": "{}", "nonce": "n1", "server_proof": fed.proof(secret, "server", "n1", "{}")}
    check_server_proof(secret, config)
    with pytest.raises(SiteRefused, match="did not prove"):
        check_server_proof(other, config)
    with pytest.raises(SiteRefused, match="give --secret-file"):
        check_server_proof(None, config)
    with pytest.raises(SiteRefused, match="asks for none"):
        check_server_proof(secret, {"lqmf": "{}"})
    check_server_proof(None, {"lqmf": "{}"})


def make_certificates(folder: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 (ca.pem, server.pem, server.key), made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lqmf-test-ca")).issuer_name(name("lqmf-test-ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(2).not_valid_before(now)
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False).sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def test_a_run_over_tls(tiny_model, tmp_path):
    from lqmf.engine.federated import free_loopback_port

    certs = make_certificates(tmp_path / "certs")
    site_certs = tmp_path / "site-certs"
    site_certs.mkdir()
    (site_certs / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())  # a site holds the CA only
    address = f"127.0.0.1:{free_loopback_port()}"
    server_log = tmp_path / "server.log"
    procs = [start(["server", "--model", str(tiny_model), "--task", "instruction_following", "--rounds", "1",
                    "--min-clients", "1", "--address", address, "--local-steps", "1", "--certificates", str(certs),
                    "--json"], tmp_path / "ws", server_log)]
    try:
        procs.append(start(["client", str(EXAMPLES / "instructions.jsonl"), "--server", address, "--wait", "120",
                            "--certificates", str(site_certs)], tmp_path / "site-ws", tmp_path / "site.log"))
        out, _ = procs[0].communicate(timeout=240)
        assert procs[0].returncode == 0, server_log.read_text()
        assert json.loads(out)["clients_per_round"] == [1]
        assert "TLS" in server_log.read_text() and "(TLS)" in (tmp_path / "site.log").read_text()
        assert procs[1].wait(timeout=60) == 0
    finally:
        for proc in procs:
            stop(proc)
