"""``fedlearn server``: serve one federated run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedlearn.cli.common import console, pct
from fedlearn.config import ServerConfig, from_mapping, load_toml
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
    str | None, typer.Option("--strategy", help="Aggregation strategy. [default: fedavg]")
]
ServerLrOpt = Annotated[
    float | None, typer.Option("--server-lr", help="Server learning rate. [default: 1.0]")
]
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
    config_file: Path | None, resume: Path | None, flags: dict[str, Any]
) -> ServerConfig | None:
    """Defaults < config file < flags. With --resume, run settings may not change."""
    given = {k: v for k, v in flags.items() if v is not None}
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
        values.update(data.get("server", data))
    values.update(given)
    if values.get("mode") == "async" and "rounds" in values:
        raise ConfigError("--rounds is for --mode sync; an async run stops at --max-updates or "
                          "--max-seconds.")
    return from_mapping(ServerConfig, values, where=str(config_file or "flags"))


def server(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d",
                       help="fashion-mnist, mnist, cifar10 or digits.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="mlp, cnn or cifar-cnn.")]
    = None,
    rounds: RoundsOpt = None,
    min_clients: MinClientsOpt = None,
    fraction: FractionOpt = None,
    min_results: MinResultsOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    strategy: StrategyOpt = None,
    server_lr: ServerLrOpt = None,
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
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = None,
    token_file: TokenFileOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Serve a federated run: clients register, train locally, and send deltas."""
    from fedlearn.data import load_dataset
    from fedlearn.models import build_model
    from fedlearn.server.runner import ServeOptions, prepare_run, serve

    if resume is not None and out is not None:
        raise ConfigError("pass --resume RUNDIR or --out RUNDIR, not both.")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together; pass both or neither.")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist; check --tls-cert/--tls-key.")
    cfg = resolve_config(config, resume, {
        "dataset": dataset, "model": model, "rounds": rounds, "min_clients": min_clients,
        "fraction": fraction, "min_results": min_results, "round_timeout": round_timeout,
        "strategy": strategy, "server_lr": server_lr, "seed": seed, "save_every": save_every,
        "mode": mode, "async_policy": async_policy, "async_alpha": async_alpha,
        "staleness_fn": staleness_fn, "max_staleness": max_staleness,
        "max_updates": max_updates, "max_seconds": max_seconds, "eval_every": eval_every,
    })
    if cfg is not None:
        ds = load_dataset(cfg.dataset)
        build_model(cfg.model, ds.input_shape, ds.num_classes)
    run, cfg, resumed = prepare_run(cfg, out, resume)

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
            f"round {r['round']:>4}/{cfg.rounds}  accuracy {pct(r['accuracy'])}  "
            f"loss {r['loss']:.4f}  clients {r['clients']}/{r['sampled']}  "
            f"{r['seconds']:.2f}s", highlight=False,
        )

    summary = serve(
        run, cfg,
        ServeOptions(host=host, port=port, token_file=token_file, tls_cert=tls_cert,
                     tls_key=tls_key),
        resumed=resumed, announce=lambda s: console.print(s, highlight=False),
        on_round=on_round,
    )
    if summary.get("mode") == "async":
        done = (f"{summary['updates']} updates ({summary['versions']} versions, mean staleness "
                f"{summary['mean_staleness']:.2f})")
    else:
        done = f"{summary['rounds']} rounds"
    console.print(f"run finished: final accuracy {pct(summary['final_accuracy'])} after "
                  f"{done}; run directory {run.path}")
