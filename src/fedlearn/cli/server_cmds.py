"""``fedlearn server``: serve one federated run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedlearn.cli.common import (
    DeviceOpt,
    DPClipOpt,
    DPNoiseOpt,
    DPTargetOpt,
    TaskOpt,
    console,
    device_name,
    final_text,
    metrics_text,
    pct,
)
from fedlearn.config import ServerConfig, build_strategy, from_mapping, load_toml
from fedlearn.errors import ConfigError

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")]
RoundsOpt = Annotated[int | None, typer.Option("--rounds", help="Rounds to run. [default: 10]")]
MinClientsOpt = Annotated[
    int | None,
    typer.Option("--min-clients", help="Clients to wait for before round 1. [default: 2]"),
]
FractionOpt = Annotated[
    float | None,
    typer.Option("--fraction", help="Share of clients sampled per round. [default: 1.0]"),
]
MinResultsOpt = Annotated[
    int | None,
    typer.Option("--min-results", help="Fewest updates that make a round. [default: 1]"),
]
RoundTimeoutOpt = Annotated[
    float | None,
    typer.Option("--round-timeout", help="Seconds before a round closes without stragglers. "
                 "[default: 600]"),
]
StrategyOpt = Annotated[
    str | None, typer.Option("--strategy", help="fedavg, fedavgm, fedadam, fedyogi, "
                             "fedadagrad, fedprox, scaffold, median, trimmed-mean:BETA, "
                             "krum:F, multi-krum:F:M, bulyan:F, norm-bounding, or RULE+OPT "
                             "(e.g. trimmed-mean:0.2+fedadam); see the README. "
                             "[default: fedavg]")
]
ServerLrOpt = Annotated[
    float | None, typer.Option("--server-lr", help="Server learning rate. [default: the "
                               "strategy's: 1.0; fedadam, fedyogi, fedadagrad 0.01]")
]
ServerMomentumOpt = Annotated[
    float | None, typer.Option("--server-momentum", help="fedavgm: server momentum. "
                               "[default: 0.9]")
]
Beta1Opt = Annotated[
    float | None, typer.Option("--beta1", help="fedadam, fedyogi, fedadagrad: first-moment "
                               "decay. [default: 0.9]")
]
Beta2Opt = Annotated[
    float | None, typer.Option("--beta2", help="fedadam, fedyogi: second-moment decay. "
                               "[default: 0.99]")
]
TauOpt = Annotated[
    float | None, typer.Option("--tau", help="fedadam, fedyogi, fedadagrad: adaptivity "
                               "(added to sqrt(v)). [default: 0.001]")
]
ProxMuOpt = Annotated[
    float | None, typer.Option("--prox-mu", help="FedProx's mu, sent to clients (fedprox, or "
                               "added to any strategy). [default: fedprox 0.01, else off]")
]
ClipNormOpt = Annotated[
    float | None, typer.Option("--clip-norm", help="Scale each client delta to an L2 norm of "
                               "at most this before aggregating (norm-bounding needs it).")
]


SecAggOpt = Annotated[
    bool, typer.Option("--secagg", help="Secure aggregation (SecAgg+): clients mask "
                              "their updates and the server learns only their sum. Streaming "
                              "strategies only (fedavg, fedavgm, fedadam, fedyogi, fedadagrad, "
                              "fedprox); see the README.")
]
SecAggThresholdOpt = Annotated[
    int | None, typer.Option("--secagg-threshold", help="Secure aggregation: the fewest "
                             "clients a round may go on with, and the shares that rebuild a "
                             "secret. [default: a majority of each client's share holders]")
]
SecAggBitsOpt = Annotated[
    int | None, typer.Option("--secagg-bits", help="Secure aggregation: the ring Z_2^B the "
                             "masked updates live in (8 to 62). [default: 48]")
]
SecAggNeighboursOpt = Annotated[
    int | None, typer.Option("--secagg-neighbours", help="Secure aggregation: SecAgg+'s "
                             "even number of neighbours per client (masks and shares only "
                             "with them). [default: every other client]")
]
SecAggTimeoutOpt = Annotated[
    float | None, typer.Option("--secagg-timeout", help="Secure aggregation: seconds each "
                               "stage after training waits for the clients still in the "
                               "round. [default: 30]")
]


def secagg_flags(secagg: bool, threshold: int | None, bits: int | None,
                 neighbours: int | None, timeout: float | None) -> dict[str, Any]:
    """The secure aggregation flags as run settings (None: not given)."""
    return {"secagg": secagg or None, "secagg_threshold": threshold, "secagg_bits": bits,
            "secagg_neighbours": neighbours, "secagg_timeout": timeout}


def strategy_flags(
    strategy: str | None, server_lr: float | None, server_momentum: float | None,
    beta1: float | None, beta2: float | None, tau: float | None, prox_mu: float | None,
    clip_norm: float | None,
) -> dict[str, Any]:
    """The strategy flags as run settings (None: not given)."""
    return {"strategy": strategy, "server_lr": server_lr, "server_momentum": server_momentum,
            "beta1": beta1, "beta2": beta2, "tau": tau, "prox_mu": prox_mu,
            "clip_norm": clip_norm}


def dp_flags(noise: float | None, clip: str | None, clip_on: str | None, delta: float | None,
             target: float | None) -> dict[str, Any]:
    """The DP-FedAvg flags as run settings (None: not given)."""
    return {"dp_noise_multiplier": noise, "dp_clip": clip, "dp_clip_on": clip_on,
            "dp_delta": delta, "dp_target_epsilon": target}
SaveEveryOpt = Annotated[
    int | None, typer.Option("--save-every", help="Rounds (async: updates) between "
                             "checkpoints. [default: 1]")
]
ModeOpt = Annotated[
    str | None, typer.Option("--mode", help="sync (rounds) or async (merge updates as they "
                             "arrive). [default: sync]")
]
AsyncPolicyOpt = Annotated[
    str | None, typer.Option("--async-policy", help="async: samples, fedasync or fedbuff:K. "
                             "[default: fedasync]")
]
AsyncAlphaOpt = Annotated[
    float | None, typer.Option("--async-alpha", help="async fedasync: mixing weight alpha. "
                               "[default: 0.6]")
]
StalenessFnOpt = Annotated[
    str | None, typer.Option("--staleness-fn", help="async: polynomial[:0.5], hinge[:10:4] or "
                             "constant. [default: polynomial (A=0.5)]")
]
MaxStalenessOpt = Annotated[
    int | None, typer.Option("--max-staleness", help="async: refuse updates more than this "
                             "many versions old. [default: no limit]")
]
MaxUpdatesOpt = Annotated[
    int | None, typer.Option("--max-updates", help="async: stop after this many merged updates.")
]
MaxSecondsOpt = Annotated[
    float | None, typer.Option("--max-seconds", help="async: stop after this many seconds of "
                               "training.")
]
EvalEveryOpt = Annotated[
    int | None, typer.Option("--eval-every", help="async: evaluate every N merged updates. "
                             "[default: 1]")
]
EvalFractionOpt = Annotated[
    float | None, typer.Option("--eval-fraction", help="Share of the clients with local test "
                               "data asked to evaluate each evaluated model. [default: "
                               "--fraction]")
]
ClientEpochsOpt = Annotated[
    int | None, typer.Option("--local-epochs", help="Sent to clients: local epochs per round. "
                             "[default: 1]")]
ClientBatchOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Sent to clients: mini-batch size. "
                             "[default: 32]")]
ClientOptimizerOpt = Annotated[
    str | None, typer.Option("--optimizer", help="Sent to clients: sgd or adam. "
                             "[default: adam]")]
ClientLrOpt = Annotated[
    float | None, typer.Option("--lr", help="Sent to clients: learning rate. [default: 0.001]")]
ClientMomentumOpt = Annotated[
    float | None, typer.Option("--momentum", help="Sent to clients: SGD momentum. "
                               "[default: 0]")]
ClientWdOpt = Annotated[
    float | None, typer.Option("--weight-decay", help="Sent to clients: L2 weight decay. "
                               "[default: 0]")]


def client_flags(
    local_epochs: int | None, batch_size: int | None, optimizer: str | None, lr: float | None,
    momentum: float | None, weight_decay: float | None,
) -> dict[str, Any]:
    """Training flags as the keys of the ``[client]`` config (None: not given)."""
    return {"epochs": local_epochs, "batch_size": batch_size, "optimizer": optimizer,
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay}


def task_ref(task: str | None) -> str | None:
    """``--task`` as saved in config.toml: a file path made absolute, so --resume finds it."""
    if task is None:
        return None
    from fedlearn.tasks.loading import split_ref

    where, name = split_ref(task)
    if where.endswith(".py") or "/" in where:
        where = str(Path(where).resolve())
    return f"{where}:{name}"


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file of run settings (flags win).")
]
ResumeOpt = Annotated[
    Path | None, typer.Option("--resume", help="Run directory of an interrupted run.")
]
TokenFileOpt = Annotated[
    Path | None, typer.Option("--token-file", help="File holding the join token.")
]
TlsCertOpt = Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate (HTTPS).")]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key (HTTPS).")]


def resolve_config(
    config_file: Path | None, resume: Path | None, flags: dict[str, Any],
    client_flags: dict[str, Any] | None = None,
) -> ServerConfig | None:
    """Defaults < config file < flags. With --resume, run settings may not change.

    The file may hold a ``[server]`` table (or top-level run keys), a ``[client]``
    table (the training config sent to clients, plus any user keys) and ``task``.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    client_given = {k: v for k, v in (client_flags or {}).items() if v is not None}
    if resume is not None and client_given:
        given.update(client_given)
    if resume is not None:
        if given or config_file is not None:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(given)) or "--config"
            raise ConfigError(
                f"--resume continues the run with its saved settings; drop {names}."
            )
        return None
    values: dict[str, Any] = {}
    if config_file is not None:
        data = load_toml(config_file)
        values.update({k: v for k, v in data.get("server", data).items()
                       if k not in ("client", "server", "sim")})
        if isinstance(data.get("task"), str) and "task" not in values:
            values["task"] = data["task"]
        if isinstance(data.get("client"), dict):
            values["client"] = dict(data["client"])
    values.update(given)
    if client_given:
        values["client"] = {**values.get("client", {}), **client_given}
    if values.get("mode") == "async" and "rounds" in values:
        raise ConfigError("--rounds is for --mode sync; an async run stops at --max-updates or "
                          "--max-seconds.")
    return from_mapping(ServerConfig, values, where=str(config_file or "flags"))


def task_of(cfg: ServerConfig) -> Any:
    """The run's Task: its ``task`` reference, else the built-in dataset and model."""
    from fedlearn.tasks import builtin_task, load_task

    return load_task(cfg.task) if cfg.task else builtin_task(cfg.dataset, cfg.model)


def server(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d",
                       help="fashion-mnist, mnist, cifar10 or digits.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="mlp, cnn or cifar-cnn.")]
    = None,
    task: TaskOpt = None,
    rounds: RoundsOpt = None,
    min_clients: MinClientsOpt = None,
    fraction: FractionOpt = None,
    min_results: MinResultsOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    strategy: StrategyOpt = None,
    server_lr: ServerLrOpt = None,
    server_momentum: ServerMomentumOpt = None,
    beta1: Beta1Opt = None,
    beta2: Beta2Opt = None,
    tau: TauOpt = None,
    prox_mu: ProxMuOpt = None,
    clip_norm: ClipNormOpt = None,
    dp_noise_multiplier: DPNoiseOpt = None,
    dp_clip: DPClipOpt = None,
    dp_clip_on: Annotated[str | None, typer.Option(
        "--dp-clip-on", help="Where DP-FedAvg clips: server or client. [default: server; "
        "client with --secagg]",
        rich_help_panel="Differential privacy")] = None,
    dp_delta: Annotated[float | None, typer.Option(
        "--dp-delta", help="delta of DP-FedAvg's reported epsilon. [default: 1/--min-clients]",
        rich_help_panel="Differential privacy")] = None,
    dp_target_epsilon: DPTargetOpt = None,
    secagg: SecAggOpt = False,
    secagg_threshold: SecAggThresholdOpt = None,
    secagg_bits: SecAggBitsOpt = None,
    secagg_neighbours: SecAggNeighboursOpt = None,
    secagg_timeout: SecAggTimeoutOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Run seed. [default: 0]")] = None,
    save_every: SaveEveryOpt = None,
    mode: ModeOpt = None,
    async_policy: AsyncPolicyOpt = None,
    async_alpha: AsyncAlphaOpt = None,
    staleness_fn: StalenessFnOpt = None,
    max_staleness: MaxStalenessOpt = None,
    max_updates: MaxUpdatesOpt = None,
    max_seconds: MaxSecondsOpt = None,
    eval_every: EvalEveryOpt = None,
    eval_fraction: EvalFractionOpt = None,
    local_epochs: ClientEpochsOpt = None,
    batch_size: ClientBatchOpt = None,
    optimizer: ClientOptimizerOpt = None,
    lr: ClientLrOpt = None,
    momentum: ClientMomentumOpt = None,
    weight_decay: ClientWdOpt = None,
    max_update_norm: Annotated[float | None, typer.Option(
        "--max-update-norm", help="Refuse deltas with a larger L2 norm (0: no limit). "
        "[default: 100 x the initial model's norm]")] = None,
    max_clients: Annotated[int | None, typer.Option(
        "--max-clients", help="Most clients that may register. [default: 10000]")] = None,
    no_docs: Annotated[bool, typer.Option(
        "--no-docs", help="Do not serve /docs and /redoc (they load third-party assets); "
        "/openapi.json stays.")] = False,
    device: DeviceOpt = "cpu",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = None,
    token_file: TokenFileOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        "--tls-client-ca", help="Mutual TLS: only clients with a certificate signed by this "
        "CA (PEM) may connect.")] = None,
    clients_file: Annotated[Path | None, typer.Option(
        "--clients-file", help="Only these clients may join: lines 'CLIENT_ID SHA256' of "
        "each client's own token (which it passes as --token); the join token then admits "
        "nobody.")] = None,
    pickup_timeout: Annotated[float | None, typer.Option(
        "--pickup-timeout", help="Seconds a sampled client has to pick up its task before "
        "another takes its place. [default: min(15, --round-timeout / 3)]")] = None,
) -> None:
    """Serve a federated run: clients register, train locally, and send deltas."""
    import os
    import sys

    from fedlearn.server.runner import ServeOptions, prepare_run, serve

    if resume is not None and out is not None:
        raise ConfigError("pass --resume RUNDIR or --out RUNDIR, not both.")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}; 0 picks a free "
                          "port.")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together; pass both or neither.")
    if tls_client_ca is not None and tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs "
                          "over HTTPS).")
    for path in (tls_cert, tls_key, tls_client_ca):
        if path is not None:
            try:
                path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {path} ({exc.strerror}); check "
                                  "--tls-cert/--tls-key.") from exc
    os.umask(0o077)  # the run's database, checkpoints and token are the operator's only
    cfg = resolve_config(config, resume, {
        "dataset": dataset, "model": model, "rounds": rounds, "min_clients": min_clients,
        "fraction": fraction, "min_results": min_results, "round_timeout": round_timeout,
        **strategy_flags(strategy, server_lr, server_momentum, beta1, beta2, tau, prox_mu,
                         clip_norm),
        **dp_flags(dp_noise_multiplier, dp_clip, dp_clip_on, dp_delta, dp_target_epsilon),
        **secagg_flags(secagg, secagg_threshold, secagg_bits, secagg_neighbours,
                       secagg_timeout),
        "seed": seed, "save_every": save_every,
        "mode": mode, "async_policy": async_policy, "async_alpha": async_alpha,
        "staleness_fn": staleness_fn, "max_staleness": max_staleness,
        "max_updates": max_updates, "max_seconds": max_seconds, "eval_every": eval_every,
        "eval_fraction": eval_fraction, "task": task_ref(task),
        "max_update_norm": max_update_norm, "max_clients": max_clients,
        "pickup_timeout": pickup_timeout,
        "clients_file": None if clients_file is None else str(clients_file.resolve()),
    }, client_flags(local_epochs, batch_size, optimizer, lr, momentum, weight_decay))
    device = device_name(device)
    if cfg is not None:
        task_of(cfg)  # a missing or broken task fails here, before the run directory exists
        if cfg.clients_file is not None:
            from fedlearn.server.runner import read_clients_file

            read_clients_file(Path(cfg.clients_file))
    run, cfg, resumed = prepare_run(cfg, out, resume)
    the_task = task_of(cfg)
    # The strategy is resolved once, here; the server is given the object.
    the_strategy = build_strategy(cfg) if cfg.mode == "sync" else None

    def on_round(r: dict[str, Any]) -> None:
        if "update" in r:
            of = f"/{cfg.max_updates}" if cfg.max_updates is not None else ""
            console.print(
                f"update {r['update']:>5}{of}  version {r['version']:>5}  accuracy "
                f"{pct(r['accuracy'])}  loss {r['loss']:.4f}  staleness {r['staleness']}  "
                f"{r['seconds']:.1f}s", highlight=False,
            )
            return
        console.print(
            f"round {r['round']:>4}/{cfg.rounds}  {metrics_text(r)}  "
            f"clients {r['clients']}/{r['sampled']}  {r['seconds']:.2f}s", highlight=False,
        )

    summary = serve(
        run, cfg,
        ServeOptions(host=host, port=port, token_file=token_file, tls_cert=tls_cert,
                     tls_key=tls_key, tls_client_ca=tls_client_ca, docs=not no_docs,
                     show_token=sys.stdout.isatty()),
        task=the_task, resumed=resumed,
        announce=lambda s: console.print(s, highlight=False, markup=False),
        on_round=on_round, device=device, strategy=the_strategy,
    )
    if summary.get("mode") == "async":
        done = (f"{summary['updates']} updates ({summary['versions']} versions, mean staleness "
                f"{summary['mean_staleness']:.2f})")
    else:
        done = f"{summary['rounds']} rounds"
    console.print(f"run finished: {final_text(summary)} after {done}; run directory "
                  f"{run.path}", markup=False, highlight=False)
