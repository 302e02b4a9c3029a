"""``fedlearn run``: a server and N client processes on 127.0.0.1, with a progress bar."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from fedlearn.attacks import Attackers, check_attack_config
from fedlearn.cli.common import (
    DEFAULT_DELTA,
    AttackersOpt,
    AttackOpt,
    DataOpt,
    DeviceOpt,
    DPClipOnOpt,
    DPClipOpt,
    DPNoiseOpt,
    DPSGDOpt,
    DPTargetOpt,
    LabelOpt,
    RunDPDeltaOpt,
    TaskOpt,
    TestFractionOpt,
    console,
    final_text,
    metrics_text,
    progress_bar,
    resolve_task,
)
from fedlearn.cli.server_cmds import (
    AsyncAlphaOpt,
    AsyncPolicyOpt,
    Beta1Opt,
    Beta2Opt,
    ClipNormOpt,
    EvalEveryOpt,
    EvalFractionOpt,
    FractionOpt,
    MaxSecondsOpt,
    MaxStalenessOpt,
    MaxUpdatesOpt,
    MinResultsOpt,
    ModeOpt,
    ProxMuOpt,
    RoundTimeoutOpt,
    SaveEveryOpt,
    SecAggBitsOpt,
    SecAggNeighboursOpt,
    SecAggOpt,
    SecAggThresholdOpt,
    SecAggTimeoutOpt,
    ServerLrOpt,
    ServerMomentumOpt,
    StalenessFnOpt,
    StrategyOpt,
    TauOpt,
    dp_flags,
    secagg_flags,
    strategy_flags,
)
from fedlearn.errors import ConfigError, FedlearnError

START_TIMEOUT = 120.0


class ProcessFailed(FedlearnError):
    """A server or client process of ``fedlearn run`` failed."""

    exit_code = 1


def client_partition(spec: str, clients: int, index: int) -> str:
    """Client ``index``'s share of ``spec`` among ``clients`` (``iid`` -> ``iid:N:I``)."""
    from fedlearn.data import parse_partition

    parsed = parse_partition(spec)
    if parsed.part is not None:
        raise ConfigError(
            f"--partition {spec} already names one part; give the whole split "
            "(iid, dirichlet:A or shards:K) and fedlearn run hands out the parts."
        )
    if parsed.kind == "range":
        raise ConfigError(
            "range:L-R is one client's chunk; start clients by hand with "
            "`fedlearn client --partition range:L-R`, or use iid, dirichlet:A or shards:K."
        )
    return f"{spec}:{clients}:{index}"


def run(
    clients: Annotated[int, typer.Option("--clients", "-n", help="Client processes.")] = 3,
    task: TaskOpt = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset.")] = "fashion-mnist",
    model: Annotated[str, typer.Option("--model", "-m", help="Model.")] = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
    device: DeviceOpt = "cpu",
    rounds: Annotated[int | None, typer.Option(
        "--rounds", help="Rounds to run (sync). [default: 10]")] = None,
    partition: Annotated[str, typer.Option("--partition", "-p",
                         help="iid, dirichlet:A or shards:K, split among the clients.")] = "iid",
    local_epochs: Annotated[int | None, typer.Option("--local-epochs", help="Epochs per round.")]
    = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Mini-batch size.")]
    = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="sgd or adam.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum.")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed.")] = 0,
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
    secagg: SecAggOpt = False,
    secagg_threshold: SecAggThresholdOpt = None,
    secagg_bits: SecAggBitsOpt = None,
    secagg_neighbours: SecAggNeighboursOpt = None,
    secagg_timeout: SecAggTimeoutOpt = None,
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
    slowdown: Annotated[list[str] | None, typer.Option(
        "--slowdown", help="For benchmarks: INDEX=FACTOR slows client INDEX (repeatable).")]
    = None,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", help="At most this many clients train at once on this machine "
        "(default: its core count when no --slowdown is given; 0: no limit).")] = None,
    dp_sgd: DPSGDOpt = None,
    dp_delta: RunDPDeltaOpt = None,
    dp_noise_multiplier: DPNoiseOpt = None,
    dp_clip: DPClipOpt = None,
    dp_clip_on: DPClipOnOpt = None,
    dp_target_epsilon: DPTargetOpt = None,
    attack: AttackOpt = None,
    attackers: AttackersOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
) -> None:
    """Start a server and N clients on 127.0.0.1 and run a federated training to the end."""
    from fedlearn.cli.common import device_name
    from fedlearn.config import ServerConfig, TrainConfig, build_strategy
    from fedlearn.runs import default_run_dir
    from fedlearn.training import initial_state

    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}.")
    from fedlearn.privacy.dpsgd import parse_dp_sgd

    sgd_delta = dp_delta if dp_delta is not None else DEFAULT_DELTA
    private = ["--dp-sgd", str(dp_sgd), "--dp-delta", repr(sgd_delta)] \
        if parse_dp_sgd(dp_sgd, sgd_delta) else []
    asynchronous = mode == "async"
    if asynchronous and rounds is not None:
        raise ConfigError("--rounds is for --mode sync; an async run stops at --max-updates or "
                          "--max-seconds.")
    rounds = 10 if rounds is None else rounds
    run_flags: dict[str, Any] = {
        "mode": mode, "async_policy": async_policy, "async_alpha": async_alpha,
        "staleness_fn": staleness_fn, "max_staleness": max_staleness,
        "max_updates": max_updates, "max_seconds": max_seconds, "eval_every": eval_every,
        "save_every": save_every,
        **strategy_flags(strategy, server_lr, server_momentum, beta1, beta2, tau, prox_mu,
                         clip_norm),
        **dp_flags(dp_noise_multiplier, dp_clip, dp_clip_on, dp_delta, dp_target_epsilon),
        **secagg_flags(secagg, secagg_threshold, secagg_bits, secagg_neighbours,
                       secagg_timeout),
    }
    # Refuse bad settings here, before any process starts.
    the_task, ref = resolve_task(task, dataset, model)
    device_name(device)
    initial_state(the_task, seed)  # a model factory that raises fails here
    given = {"epochs": local_epochs, "batch_size": batch_size, "optimizer": optimizer,
             "lr": lr, "momentum": momentum}
    train = TrainConfig.from_dict({**the_task.config,
                                   **{k: v for k, v in given.items() if v is not None}})
    checked = {"fraction": fraction, "min_results": min_results,
               "round_timeout": round_timeout, **run_flags}
    settings = ServerConfig(rounds=rounds, client=train.as_dict(), eval_fraction=eval_fraction,
                            seed=seed, **{k: v for k, v in checked.items() if v is not None})
    if min_results is not None and min_results > clients:
        raise ConfigError(f"--min-results {min_results} is more than the {clients} clients; "
                          "no round could ever close. Lower it or add clients.")
    if settings.mode == "sync":
        needed = build_strategy(settings).min_updates
        if needed > clients:
            raise ConfigError(f"strategy {settings.strategy} needs at least {needed} updates "
                              f"a round but the run has {clients} clients; add clients or "
                              "choose a smaller F.")
        least = max(2, settings.secagg_threshold or 2)
        if settings.secagg and least > clients:
            raise ConfigError(f"--secagg needs at least {least} clients a round (its threshold) "
                              f"but the run has {clients}; add clients or lower "
                              "--secagg-threshold.")
    parts = [client_partition(partition, clients, i) for i in range(clients)]
    hostile = _attackers(attack, attackers, clients, seed, the_task)
    slow = _parse_slowdown(slowdown or [], clients)
    run_dir = Path(out or default_run_dir("run"))
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} is not an empty folder; choose another --out.")
    created = not run_dir.exists()
    logs = run_dir / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {logs} ({exc.strerror}); choose another --out.") from exc
    # Clients on one host take turns on its cores (one thread each), as separate
    # machines would each have their own; --slowdown runs keep every client free.
    slots = concurrency if concurrency is not None else (0 if slow else os.cpu_count() or 1)
    if slots < 0:
        raise ConfigError(f"--concurrency must be 0 or more, got {concurrency}.")
    exe = [sys.executable, "-m", "fedlearn.cli.main"]
    task_args = (["--task", ref["task"]] if "task" in ref
            else ["--dataset", dataset, "--model", model])
    server_cmd = [
        *exe, "server", "--host", "127.0.0.1", "--port", "0", "--out", str(run_dir),
        *task_args, "--min-clients", str(clients), "--device", device,
        "--seed", str(seed), *([] if asynchronous else ["--rounds", str(rounds)]),
        "--local-epochs", str(train.epochs), "--batch-size", str(train.batch_size),
        "--optimizer", train.optimizer, "--lr", repr(train.lr),
        "--momentum", repr(train.momentum),
    ]
    for name, value in (("fraction", fraction), ("min_results", min_results),
                        ("round_timeout", round_timeout), ("eval_fraction", eval_fraction),
                        *run_flags.items()):
        if value is True:  # a flag (--secagg)
            server_cmd.append("--" + name.replace("_", "-"))
        elif value is not None:
            server_cmd += ["--" + name.replace("_", "-"), str(value)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files: list[IO[bytes]] = []

    def spawn(name: str, cmd: list[str]) -> None:
        fh = os.fdopen(os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                               0o600), "wb")
        files.append(fh)
        procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    # A SIGTERM (from a supervisor or `timeout`) stops the children like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    length = (f"async {async_policy or 'fedasync'}" if asynchronous else f"{rounds} rounds")
    console.print(f"fedlearn run: 1 server + {clients} clients, {the_task.name}, "
                  f"{length} -> {run_dir}", markup=False, highlight=False)
    try:
        spawn("server", server_cmd)
        url = _wait_for_endpoint(run_dir, procs["server"])
        # config.toml (written by the server) also records how the clients were started.
        from fedlearn.runs import RunDir

        recorded = RunDir(run_dir)
        recorded.write_config({**recorded.read_config(), "clients": {
            "count": clients, "partition": partition, "data": data, "label": label,
            "test_fraction": test_fraction, "device": device, "partition_seed": seed,
            "concurrency": slots, "slowdown": {str(k): v for k, v in slow.items()},
            **({"attack": attack, "attackers": hostile.fraction} if attack else {})}})
        if hostile.attack is not None:
            recorded.write_attackers(hostile.record())
        console.print(f"server at {url} (logs in {logs})")
        for i in range(clients):
            local_data = [] if data is None else ["--data", data.replace("{i}", str(i))]
            spawn(f"client-{i}", [
                *exe, "client", "--server", url, "--client-id", f"client-{i}",
                "--token-file", str(run_dir / "join-token"),
                *(["--task", ref["task"]] if "task" in ref else ["--dataset", dataset]),
                *local_data, *(["--label", label] if label is not None else []),
                "--test-fraction", repr(test_fraction), "--device", device,
                "--partition", parts[i], "--partition-seed", str(seed),
                "--credential-file", str(run_dir / "clients" / f"client-{i}.json"),
                "--slowdown", str(slow.get(i, 1.0)), *private,
                "--slowdown", str(slow.get(i, 1.0)),
                *(["--attack", str(attack)] if f"client-{i}" in hostile.ids else []),
                *(["--cpu-slot", str(logs / f".cpu-slot-{i % slots}")] if slots else []),
            ])
        if asynchronous:
            bar = ("updates", max_updates) if max_updates is not None else (
                "seconds", int(max_seconds or 0))
        else:
            bar = ("rounds", rounds)
        _follow(run_dir, procs, *bar)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the server and clients")
        _stop_all(procs)
        raise
    except ProcessFailed as exc:
        _stop_all(procs, grace=2.0)
        for fh in files:
            fh.close()
        detail = _first_error(logs)
        if created and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ProcessFailed(f"{exc.message.rstrip('.')}{detail}; nothing was kept.") from None
        raise
    finally:
        _stop_all(procs, grace=10.0)
        for fh in files:
            fh.close()
    failed = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    summary_path = run_dir / "summary.json"
    if failed or not summary_path.exists():
        what = ", ".join(f"{n} (exit {c})" for n, c in sorted(failed.items())) or "the server"
        detail = _first_error(logs)
        if created and not (run_dir / "metrics.jsonl").exists():
            # Nothing was trained: leave no half-made run behind to block this --out.
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ProcessFailed(f"{what} failed before round 1{detail}; nothing was kept.")
        raise ProcessFailed(f"{what} failed{detail}; see the logs in {logs}.")
    summary = json.loads(summary_path.read_text())
    if summary.get("mode") == "async":
        console.print(
            f"{final_text(summary)} after {summary['updates']} "
            f"updates ({summary['versions']} versions, mean staleness "
            f"{summary['mean_staleness']:.2f}) in {summary['training_seconds']:.1f}s; "
            f"run directory {run_dir}"
        )
        return
    console.print(
        f"{final_text(summary)} after {summary['rounds']} "
        f"rounds; median {summary.get('median_round_seconds') or 0:.2f}s per round; "
        f"run directory {run_dir}", markup=False, highlight=False
    )


def _attackers(spec: str | None, fraction: float | None, clients: int, seed: int,
               task: Any) -> Attackers:
    """The clients ``--attack``/``--attackers`` make attackers (none without ``--attack``)."""
    resolved = check_attack_config(spec or "", fraction, clients)
    return Attackers.of(spec or "", resolved or 0.0, [f"client-{i}" for i in range(clients)],
                        seed, task)


def _first_error(logs: Path) -> str:
    """``: <the first 'error:' line of the processes' logs>`` or nothing."""
    for path in sorted(logs.glob("*.log")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("error:"):
                    return f" ({path.stem}: {line[len('error:'):].strip()})"
    return ""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _parse_slowdown(items: list[str], clients: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in items:
        try:
            idx, factor = item.split("=", 1)
            out[int(idx)] = float(factor)
        except ValueError as exc:
            raise ConfigError(
                f"--slowdown {item!r} must look like INDEX=FACTOR, e.g. 0=5."
            ) from exc
        if not 0 <= int(idx) < clients or float(factor) < 1:
            raise ConfigError(f"--slowdown {item!r}: index must be < {clients}, factor >= 1.")
    return out


def _wait_for_endpoint(run_dir: Path, server: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    path = run_dir / "server.json"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ProcessFailed(
                f"the server exited with code {server.returncode} before listening; "
                f"see {run_dir / 'logs' / 'server.log'}."
            )
        if path.exists():
            with contextlib.suppress(ValueError, KeyError):
                return str(json.loads(path.read_text())["url"])
        time.sleep(0.05)
    raise ProcessFailed(f"the server did not start within {START_TIMEOUT:.0f}s.")


def _follow(
    run_dir: Path, procs: dict[str, subprocess.Popen[bytes]], unit: str, total: int
) -> None:
    """Show progress from metrics.jsonl until the server exits.

    ``unit`` is what the bar counts: ``rounds``, or for async runs ``updates``
    (or ``seconds`` when only --max-seconds bounds the run).
    """
    metrics = run_dir / "metrics.jsonl"
    seen = 0
    reported: set[str] = set()
    server = procs["server"]
    with progress_bar(unit, total) as bar:
        while True:
            records = _read_records(metrics)
            for r in records[seen:]:
                if "update" in r:
                    done = int(r["seconds"]) if unit == "seconds" else int(r["update"])
                    bar.set(min(done, total), (
                        f"{metrics_text(r, 2)}  version {r['version']}  "
                        f"staleness {r['mean_staleness']:.1f}"))
                else:
                    bar.set(r["round"], (
                        f"{metrics_text(r, 2)}  clients {r['clients']}/{r['sampled']}"))
            seen = max(seen, len(records))
            if server.poll() is not None:
                break
            for n, p in procs.items():
                if n != "server" and n not in reported and p.poll() not in (None, 0):
                    reported.add(n)
                    console.print(f"{n} exited with code {p.returncode}; the server "
                                  "carries on without it", style="yellow")
            clients = [p for n, p in procs.items() if n != "server"]
            if all(p.poll() is not None for p in clients):
                # Clients leave (code 0) when told the run is over; the server follows
                # shortly. When every one of them failed instead, nothing will finish it.
                if any(p.returncode == 0 for p in clients):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        server.wait(timeout=30)
                if server.poll() is not None:
                    continue
                raise ProcessFailed(
                    f"every client exited before the run finished; see the logs in "
                    f"{run_dir / 'logs'}."
                )
            time.sleep(0.2)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _stop_all(procs: dict[str, subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """Let clients exit on their own for ``grace`` seconds, then terminate, then kill."""
    deadline = time.monotonic() + grace
    for p in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
