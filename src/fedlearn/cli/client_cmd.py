"""The ``client`` command: one client process that trains for a ``fedlearn server``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from fedlearn.cli.common import (
    DEFAULT_DELTA,
    DataOpt,
    DatasetOpt,
    DeviceOpt,
    DPDeltaOpt,
    DPSGDOpt,
    LabelOpt,
    TaskOpt,
    TestFractionOpt,
    console,
    device_name,
    set_threads,
)
from fedlearn.errors import ConfigError


def default_client_id() -> str:
    """``<hostname>-<pid>``: unique per process on a machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


def read_token(token: str | None, token_file: Path | None) -> str:
    """The join token from exactly one of --token and --token-file (file stripped)."""
    if (token is None) == (token_file is None):
        raise ConfigError("pass exactly one of --token and --token-file with the join token "
                          "`fedlearn server` printed.")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {token_file} ({exc}); check "
                              "--token-file.") from exc
    text = (token or "").strip()
    if not text:
        raise ConfigError("the join token is empty; pass the token `fedlearn server` printed.")
    return text


def client(
    server: Annotated[
        str, typer.Option("--server", help="Server URL, e.g. http://10.0.0.5:8000.")
    ],
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="Name of this client (default host-pid).")
    ] = None,
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
    partition: Annotated[
        str | None,
        typer.Option("--partition", "-p",
                     help="This client's share of a built-in dataset: iid:N:I, "
                          "dirichlet:ALPHA:N:I, shards:K:N:I (part I of N, 0-based) or "
                          "range:L-R; with --data or a task, N:I tells the task which "
                          "client this is. [default: iid:1:0]"),
    ] = None,
    partition_seed: Annotated[
        int, typer.Option("--partition-seed", help="Seed of the partition (same on every "
                                                   "client).")
    ] = 0,
    local_epochs: Annotated[
        int | None, typer.Option("--local-epochs", help="Override the server's local epochs.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Override the server's batch size.")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help="Override the server's optimizer.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Override the server's learning rate.")
    ] = None,
    momentum: Annotated[
        float | None, typer.Option("--momentum", help="Override the server's momentum.")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="Override the server's decay.")
    ] = None,
    device: DeviceOpt = "cpu",
    credential_file: Annotated[
        Path | None, typer.Option("--credential-file", help="Where this client keeps its "
                                  "credential (mode 600), so a restart keeps its identity. "
                                  "[default: ~/.fedlearn/credentials/...]")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="The join token the server printed.")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="A file holding the join token.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="PEM certificate to trust (https servers).")
    ] = None,
    tls_client_cert: Annotated[
        Path | None, typer.Option("--tls-client-cert", help="Mutual TLS: this client's "
                                  "certificate (PEM).")
    ] = None,
    tls_client_key: Annotated[
        Path | None, typer.Option("--tls-client-key", help="Mutual TLS: its private key.")
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Retries of a call while the server is down.")
    ] = 30,
    max_wait: Annotated[
        float, typer.Option("--max-wait", help="Longest pause between retries (seconds).")
    ] = 10.0,
    poll_wait: Annotated[
        float, typer.Option("--poll-wait", help="Long-poll time for a task (seconds, <= 60).")
    ] = 30.0,
    slowdown: Annotated[
        float, typer.Option("--slowdown", help="For benchmarks: stretches local training "
                                               "time by this factor.")
    ] = 1.0,
    threads: Annotated[
        int, typer.Option("--threads", help="CPU threads for torch (default 1 per client).")
    ] = 1,
    cpu_slot: Annotated[
        Path | None, typer.Option("--cpu-slot", help="Lock file held while training, so "
                                  "clients on one host take turns on its cores.")
    ] = None,
    max_offline: Annotated[
        int, typer.Option("--max-offline", help="Async runs: trainings in a row to go on with "
                          "while the server stays unreachable, before giving up.")
    ] = 10,
    dp_sgd: DPSGDOpt = None,
    dp_delta: DPDeltaOpt = DEFAULT_DELTA,
    attack: Annotated[
        str | None, typer.Option("--attack", help="For robustness benchmarks only: this client "
                                 "attacks the run, sending sign-flip[:F] (-F x delta), scale:F, "
                                 "gaussian:SIGMA (noise) or same-value:V instead of its delta, "
                                 "or training on flipped labels (label-flip).",
                                 rich_help_panel="Robustness benchmarks")
    ] = None,
    pause_after_masked: Annotated[
        float, typer.Option("--pause-after-masked", hidden=True,
                            help="Tests only: sleep this long after each masked upload of a "
                            "secure aggregation round, before the unmask stage.")
    ] = 0.0,
) -> None:
    """Join a server's run: train on local data each round and send the updates."""
    from fedlearn.client.identity import default_credential_file
    from fedlearn.client.remote import RemoteServer
    from fedlearn.client.worker import WorkerConfig, run_worker
    from fedlearn.config import TrainConfig
    from fedlearn.data import parse_partition
    from fedlearn.tasks import load_task

    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    if ca_file is not None and not ca_file.exists():
        raise ConfigError(f"CA file {ca_file} does not exist; check --ca-file.")
    join_token = read_token(token, token_file)
    if partition is None and task is None and data is None:
        partition = "iid:1:0"
    if partition is not None:
        parse_partition(partition)
    overrides = {"epochs": local_epochs, "batch_size": batch_size, "optimizer": optimizer,
                 "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    TrainConfig.from_dict(overrides, where="the client's flags")
    the_task = load_task(task) if task is not None else None
    config = WorkerConfig(
        server=server, client_id=client_id if client_id is not None else default_client_id(),
        task=the_task, dataset=dataset, partition=partition, data=data, label=label,
        test_fraction=test_fraction, overrides=overrides, device=device_name(device),
        credential_file=str(credential_file) if credential_file is not None else
        default_credential_file(server, client_id or default_client_id()),
        token=join_token,
        partition_seed=partition_seed, poll_wait=poll_wait, max_retries=max_retries,
        max_wait=max_wait, slowdown=slowdown,
        ca_file=None if ca_file is None else str(ca_file),
        cpu_slot=None if cpu_slot is None else str(cpu_slot), max_offline=max_offline,
        dp_sgd=dp_sgd, dp_delta=dp_delta,
        attack=attack or "", pause_after_masked=pause_after_masked,
    )
    set_threads(threads)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    if (tls_client_cert is None) != (tls_client_key is None):
        raise ConfigError("--tls-client-cert and --tls-client-key go together; pass both or "
                          "neither.")
    pair = None if tls_client_cert is None or tls_client_key is None else (
        str(tls_client_cert), str(tls_client_key))
    with RemoteServer(config.server, config.token, ca_file=config.ca_file,
                      poll_wait=config.poll_wait, client_cert=pair) as remote:
        what = the_task.name if the_task is not None else dataset
        where = data if data is not None else f"partition {partition}"
        console.print(f"client {config.client_id}: {what}, {where} -> {remote.url}",
                      markup=False, highlight=False)
        summary = run_worker(config, remote, log=log)
    last = (f"{summary.went_offline} times offline" if summary.mode == "async"
            else f"last round {summary.last_round}")
    console.print(f"client {config.client_id} finished: {summary.rounds_trained} updates "
                  f"accepted, {summary.updates_refused} refused, {last}.", markup=False,
                  highlight=False)
