"""lqmf federated server | client | simulate: several sites train one adapter on Flower, data stays put."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, human_size, info, print_json
from lqmf.core import config as cfg
from lqmf.core import federated as fed

app = App(help="Federated fine-tuning on Flower: sites train one adapter without sharing their data.")

CertificatesOption = typer.Option(None, "--certificates", help="TLS folder: ca.pem (+ server.pem, server.key on "
                                  "the server). Required off loopback.")
SecretOption = typer.Option(None, "--secret-file", help="A file holding the federation's shared secret: the server "
                            "counts only sites that prove it; a site trains only for a server that proves it.")
SetOption = typer.Option([], "--set", "-s", help="Training setting: --set learning_rate=5e-3.")


def _request(model: str, task: str, rounds: int, min_clients: int, fraction: float, strategy: str, address: str,
             name: str | None, eval_file: Path | None, labels: str | None, local_steps: int, transport: str,
             certificates: Path | None, proximal_mu: float, sets: list[str], force: bool,
             secret_file: Path | None = None):
    from lqmf.engine.federated import ServerRequest

    return ServerRequest(model=model, task=cfg.normalize_task(task),
                         rounds=rounds, min_clients=min_clients, fraction=fraction, strategy=strategy,
                         proximal_mu=proximal_mu, address=address, name=name, held_out=eval_file,
                         labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else [],
                         local_steps=local_steps, transport=transport, certificates=certificates,
                         settings=cfg.parse_set_options(sets), force=force,
                         secret=fed.read_secret(secret_file) if secret_file else None)


def _print_result(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(result)
        return
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float))
    typer.echo(f"registered {result['adapter']} ({result['task']}): {result['rounds']} rounds, sites per round "
               f"{result['clients_per_round']}; sent {human_size(result['bytes_sent'])}, received "
               f"{human_size(result['bytes_received'])} ({result['transport']})" + (f"; held-out {scores}"
                                                                                   if scores else ""))


@app.command("server")
def server(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Base model every site trains on (alias, hub id, folder)."),
    task: str = typer.Option(..., "--task", "-t", help="chat | instruction_following | classification | "
                             "summarization"),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Federated rounds."),
    min_clients: int = typer.Option(2, "--min-clients", "-k", min=1, help="Sites needed to start and per round."),
    fraction: float = typer.Option(1.0, "--fraction", help="Share of the connected sites sampled each round."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox (Flower's strategies)."),
    proximal_mu: float = typer.Option(0.01, "--mu", help="FedProx's proximal weight."),
    address: str = typer.Option("127.0.0.1:9099", "--address", help="HOST:PORT to listen on."),
    name: str | None = typer.Option(None, "--name", "-n", help="Adapter name; default <model>-<task>-federated."),
    eval_file: Path | None = typer.Option(None, "--eval", help="Held-out file evaluated after every round."),
    labels: str | None = typer.Option(None, "--labels", help="Classification labels, comma-separated (default: "
                                      "those of --eval)."),
    local_steps: int = typer.Option(10, "--local-steps", min=1, help="Optimizer steps each site trains per round."),
    transport: str = typer.Option("fp32", "--transport", help="fp32 | bf16 (half the bytes)."),
    certificates: Path | None = CertificatesOption,
    secret_file: Path | None = SecretOption,
    sets: list[str] = SetOption,
    force: bool = typer.Option(False, "--force", help="Replace adapter NAME."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Run the Flower server: each round sites train from the global adapter; it averages their LoRA tensors
    (weighted by example count), evaluates on --eval and finally registers the adapter with its lineage."""
    fed.require_flower()
    from lqmf.engine.federated import run_server

    request = _request(model, task, rounds, min_clients, fraction, strategy, address, name, eval_file, labels,
                       local_steps, transport, certificates, proximal_mu, sets, force, secret_file)
    _print_result(run_server(workspace(ctx, workspace_dir), request, info), json_output)


@app.command("client")
def client(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="This site's training data (never leaves the machine)."),
    server_address: str = typer.Option(..., "--server", help="The server's HOST:PORT."),
    name: str = typer.Option("site", "--name", "-n", help="This site's name (in the server's history)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Refuse a server training another base model."),
    task: str | None = typer.Option(None, "--task", "-t", help="Refuse a server training another task."),
    certificates: Path | None = CertificatesOption,
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for the server to answer."),
    secret_file: Path | None = SecretOption,
    sets: list[str] = SetOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Join a federated run: train each round on DATASET from the global adapter, send back only the adapter
    tensors. Stops when the server's run ends; a restarted site joins again."""
    fed.require_flower()
    from lqmf.engine.federated import Site, run_site

    ws = workspace(ctx, workspace_dir)
    site = Site(ws, ws.resolve_path(dataset), name=name, model=model, task=task, settings=cfg.parse_set_options(sets),
                secret=fed.read_secret(secret_file) if secret_file else None)
    result = run_site(ws, site, server_address, certificates=certificates, progress=info, max_wait_s=wait)
    if json_output:
        print_json(result)
    else:
        typer.echo(f"{result['site']}: run ended after {result['rounds']} rounds trained here")


@app.command("simulate")
def simulate(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="One file split into the simulated sites' data."),
    model: str = typer.Option(..., "--model", "-m", help="Base model."),
    task: str = typer.Option(..., "--task", "-t", help="The task of DATASET."),
    clients: int = typer.Option(3, "--clients", min=1, help="Simulated sites."),
    partition: str = typer.Option("iid", "--partition", help="iid | by-column (each site mostly one value)."),
    column: str | None = typer.Option(None, "--column", help="With --partition by-column: the column (e.g. label)."),
    spill: float = typer.Option(0.05, "--spill", min=0.0, max=1.0, help="With by-column: the share of rows dealt "
                                "to the other sites."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Federated rounds."),
    fraction: float = typer.Option(1.0, "--fraction", help="Share of the sites sampled each round."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox."),
    proximal_mu: float = typer.Option(0.01, "--mu", help="FedProx's proximal weight."),
    name: str | None = typer.Option(None, "--name", "-n", help="Adapter name."),
    eval_file: Path | None = typer.Option(None, "--eval", help="Held-out file evaluated after every round."),
    labels: str | None = typer.Option(None, "--labels", help="Classification labels, comma-separated."),
    local_steps: int = typer.Option(10, "--local-steps", min=1, help="Optimizer steps per site per round."),
    transport: str = typer.Option("fp32", "--transport", help="fp32 | bf16."),
    secret_file: Path | None = SecretOption,
    sets: list[str] = SetOption,
    force: bool = typer.Option(False, "--force", help="Replace adapter NAME."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Server and N sites in one process on loopback (Flower's own server and clients, no Ray): for trying."""
    fed.require_flower()
    from lqmf.engine.federated import free_loopback_port
    from lqmf.engine.federated import simulate as run_simulation

    ws = workspace(ctx, workspace_dir)
    request = _request(model, task, rounds, min(clients, max(1, round(clients * fraction))), fraction, strategy,
                       f"127.0.0.1:{free_loopback_port()}", name, eval_file, labels, local_steps, transport, None,
                       proximal_mu, sets, force, secret_file)
    result = run_simulation(ws, request, ws.resolve_path(dataset), clients, partition, column, info, spill=spill)
    _print_result(result, json_output)
