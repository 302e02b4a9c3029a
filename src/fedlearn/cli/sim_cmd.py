"""``fedlearn sim``: simulate N clients in this process, with a progress bar."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from fedlearn.cli.backend_opts import (
    BackendOpt,
    RayAddressOpt,
    RayCpusOpt,
    RayGpusOpt,
    RayTimeoutOpt,
    RayWorkersOpt,
    SimResumeOpt,
    flags_given,
    placement,
    resume_sim,
)
from fedlearn.cli.common import (
    AttackersOpt,
    AttackOpt,
    DataOpt,
    DatasetOpt,
    DeviceOpt,
    DPClipOnOpt,
    DPClipOpt,
    DPNoiseOpt,
    DPSGDOpt,
    DPTargetOpt,
    LabelOpt,
    ModelOpt,
    OutOpt,
    RunDPDeltaOpt,
    TaskOpt,
    TestFractionOpt,
    console,
    device_name,
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
    MaxStalenessOpt,
    ProxMuOpt,
    ServerLrOpt,
    ServerMomentumOpt,
    StalenessFnOpt,
    StrategyOpt,
    TauOpt,
    strategy_flags,
)
from fedlearn.errors import ConfigError

DEFAULT_THREADS = 2
ASYNC_THREADS = 1

SimModeOpt = Annotated[str, typer.Option("--mode", help="sync (rounds) or async (merge each "
                       "update as it finishes, in virtual time).")]
ClientSpeedsOpt = Annotated[str, typer.Option(
    "--client-speeds", help="Client speeds in steps (mini-batches) per virtual second: "
    "constant, lognormal:SIGMA (median 1), uniform:LO:HI, or a file with one speed per "
    "client.")]
SimRoundTimeoutOpt = Annotated[float | None, typer.Option(
    "--round-timeout", help="sync: virtual seconds before a round closes; slower clients are "
    "dropped stragglers. [default: wait for all]")]
UpdatesOpt = Annotated[int | None, typer.Option(
    "--updates", help="async: stop after this many merged updates.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(
    "--concurrency", help="async: clients training at once. [default: --per-round]")]
MaxVirtualTimeOpt = Annotated[float | None, typer.Option(
    "--max-virtual-time", help="Stop at this virtual time (seconds); the model is the one "
    "current then.")]


def sim(
    clients: Annotated[int, typer.Option("--clients", "-n", help="Simulated clients.")] = 100,
    per_round: Annotated[int, typer.Option("--per-round", "-k",
                         help="Clients sampled per round.")] = 10,
    partition: Annotated[str, typer.Option("--partition", "-p",
                         help="iid, dirichlet:A or shards:K, split among the clients.")] = "iid",
    rounds: Annotated[int | None, typer.Option("--rounds", help="sync: rounds to run. "
                      "[default: 10]")] = None,
    engine: Annotated[str, typer.Option("--engine", help="vectorized (the sampled clients "
                      "trained at once, stacked; any model it can stack, else sequential) or "
                      "sequential (one after another; any task).")]
    = "vectorized",
    max_parallel: Annotated[int | None, typer.Option(
        "--max-parallel", help="Most clients the vectorized engine stacks at once (chunks). "
        "[default: as many as half the free memory holds; printed]")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16 (bfloat16 "
                         "autocast for training).")] = "fp32",
    dp_sgd: DPSGDOpt = None,
    dp_delta: RunDPDeltaOpt = None,
    dp_noise_multiplier: DPNoiseOpt = None,
    dp_clip: DPClipOpt = None,
    dp_clip_on: DPClipOnOpt = None,
    dp_target_epsilon: DPTargetOpt = None,
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Rounds between federated "
                          "evaluations (clients with local test data); async: merged updates "
                          "between evaluations.")] = 1,
    eval_fraction: Annotated[float | None, typer.Option(
        "--eval-fraction", help="Share of clients with test data that evaluate. [default: "
        "--per-round/--clients]")] = None,
    local_epochs: Annotated[int | None, typer.Option(
        "--local-epochs", help="Epochs per round. [default: 1]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Mini-batch size. "
                          "[default: 32]")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="sgd or adam. "
                         "[default: adam]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate. [default: 0.001]")]
    = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum.")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay",
                            help="L2 weight decay.")] = None,
    strategy: StrategyOpt = None,
    server_lr: ServerLrOpt = None,
    server_momentum: ServerMomentumOpt = None,
    beta1: Beta1Opt = None,
    beta2: Beta2Opt = None,
    tau: TauOpt = None,
    prox_mu: ProxMuOpt = None,
    clip_norm: ClipNormOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed (model, partition, "
                    "sampling, data order).")] = 0,
    attack: AttackOpt = None,
    attackers: AttackersOpt = None,
    device: DeviceOpt = "cpu",
    out: OutOpt = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for torch. [default: 2; --mode async: 1]")] = None,
    mode: SimModeOpt = "sync",
    async_policy: AsyncPolicyOpt = None,
    async_alpha: AsyncAlphaOpt = None,
    staleness_fn: StalenessFnOpt = None,
    max_staleness: MaxStalenessOpt = None,
    client_speeds: ClientSpeedsOpt = "constant",
    round_timeout: SimRoundTimeoutOpt = None,
    updates: UpdatesOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_virtual_time: MaxVirtualTimeOpt = None,
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_cpus_per_worker: RayCpusOpt = None,
    ray_gpus_per_worker: RayGpusOpt = None,
    ray_timeout: RayTimeoutOpt = None,
    resume: SimResumeOpt = None,
    ctx: typer.Context = None,  # type: ignore[assignment]  # None when called as a function
) -> None:
    """Simulate a federated run of N clients in this process (same model as `fedlearn run`)."""
    import torch

    from fedlearn.config import TrainConfig, build_strategy
    from fedlearn.runs import RunDir, default_run_dir
    from fedlearn.sim import SimConfig, config_record, run_simulation

    if threads is None:
        # An async task is one client's few mini-batches: too small to split across
        # threads (measured here: 8 ms per task on one thread, 100+ ms on two while
        # other jobs kept both cores busy).
        threads = ASYNC_THREADS if mode == "async" else DEFAULT_THREADS
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    where = placement(backend, ray_address, ray_workers, ray_cpus_per_worker,
                      ray_gpus_per_worker, ray_timeout)
    if resume is not None:
        resume_sim(resume, where, device=device_name(device), threads=threads,
                   given=flags_given(ctx))
        return
    given = {"async_policy": async_policy, "async_alpha": async_alpha,
             "staleness_fn": staleness_fn}
    policy: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if mode == "async" and rounds is not None:
        raise ConfigError("--rounds is for --mode sync; an async run stops at --updates N or "
                          "--max-virtual-time T.")
    if mode == "sync" and policy:
        names = ", ".join("--" + k.replace("_", "-") for k in policy)
        raise ConfigError(f"{names} applies to --mode async; sync rounds aggregate with "
                          "--strategy.")
    the_task, ref = resolve_task(task, dataset, model)
    train = TrainConfig.from_dict({**the_task.config, **{k: v for k, v in {
        "epochs": local_epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "momentum": momentum, "weight_decay": weight_decay}.items() if v is not None}})
    config = SimConfig(
        clients=clients, per_round=per_round, partition=partition,
        rounds=rounds if rounds is not None else 10,
        engine=engine, dataset=dataset, model=model, task=ref.get("task", ""), data=data,
        label=label, test_fraction=test_fraction, eval_every=eval_every,
        eval_fraction=eval_fraction, seed=seed, train=train,
        max_parallel=max_parallel, precision=precision, dp_sgd=dp_sgd, dp_delta=dp_delta,
        dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip, dp_clip_on=dp_clip_on,
        dp_target_epsilon=dp_target_epsilon,
        attack=attack or "", attackers=attackers, mode=mode, max_staleness=max_staleness,
        client_speeds=client_speeds, round_timeout=round_timeout, updates=updates,
        concurrency=concurrency, max_virtual_time=max_virtual_time, **policy,
        **{k: v for k, v in strategy_flags(strategy, server_lr, server_momentum, beta1, beta2,
                                           tau, prox_mu, clip_norm).items() if v is not None},
        **where,
    )
    the_strategy = build_strategy(config)  # resolved once, here
    device = device_name(device)
    torch.set_num_threads(threads)
    run = RunDir.create(out or default_run_dir("sim"), config_record(config))
    on_ray = " on Ray" if backend == "ray" else ""
    console.print(f"fedlearn sim: {clients} clients, {_plan_text(config)}, {the_task.name}, "
                  f"{engine} engine{on_ray} -> {run.path}", markup=False, highlight=False)
    what, total = _progress_total(config)
    try:
        with progress_bar(what, total) as bar:
            shown = {"status": ""}

            def on_round(r: dict[str, Any]) -> None:
                clock = f"  t={r['virtual_time']:.1f}" if "virtual_time" in r else ""
                shown["status"] = status = f"{metrics_text(r, 2)}{clock}"
                if "update" in r:
                    bar.set(_done(config, r["update"], r["virtual_time"]), status)
                else:
                    bar.advance(f"{status}  {r['seconds']:.2f}s/round")

            def on_update(updates: int, virtual_time: float) -> None:
                bar.set(_done(config, updates, virtual_time), shown["status"])

            def log(line: str) -> None:
                console.print(line, markup=False)

            if config.mode == "async":
                from fedlearn.sim import run_virtual

                summary = run_virtual(config, the_task, run, on_round=on_round,
                                      on_progress=on_update, log=log, device=device)
            else:
                summary = run_simulation(config, the_task, run, on_round=on_round, log=log,
                                         device=device, strategy=the_strategy)
    except BaseException:
        run.discard_if_empty()
        raise
    console.print(f"{final_text(summary)} after {_done_text(summary)}; run directory "
                  f"{run.path}", markup=False, highlight=False)


def _plan_text(config: Any) -> str:
    """``10 per round, 20 rounds`` or ``async fedasync, 10 at once, 200 updates``."""
    stop = f", up to virtual time {config.max_virtual_time:g}" if config.max_virtual_time else ""
    speeds = "" if config.client_speeds == "constant" else f", speeds {config.client_speeds}"
    if config.mode == "async":
        updates = f", {config.updates} updates" if config.updates is not None else ""
        return (f"async {config.async_policy}, {config.in_flight} at once{updates}{stop}"
                f"{speeds}")
    timeout = (f", round timeout {config.round_timeout:g}"
               if config.round_timeout is not None else "")
    return f"{config.per_round} per round, {config.rounds} rounds{stop}{timeout}{speeds}"


def _progress_total(config: Any) -> tuple[str, int]:
    """What the bar counts and up to how many: rounds, updates or virtual seconds."""
    if config.mode != "async":
        return "rounds", config.rounds
    if config.updates is not None:
        return "updates", config.updates
    return "virtual s", max(1, math.ceil(config.max_virtual_time))


def _done(config: Any, updates: int, virtual_time: float) -> int:
    return updates if config.updates is not None else int(virtual_time)


def _done_text(summary: dict[str, Any]) -> str:
    """``200 updates (...)`` or ``20 rounds (...)`` for the closing line."""
    if summary.get("sim_mode") == "async":
        return (f"{summary['updates']} updates ({summary['versions']} versions, mean staleness "
                f"{summary['mean_staleness']:.2f}, virtual time {summary['virtual_time']:.1f}s, "
                f"{summary['engine']} engine)")
    per = summary["median_round_seconds"]
    per_text = f"; median {per:.3f}s per round" if per is not None else ""
    timed = (f"; virtual time {summary['virtual_time']:.1f}s, {summary['dropped']} stragglers "
             "dropped" if "virtual_time" in summary else "")
    return f"{summary['rounds']} rounds ({summary['engine']} engine{per_text}{timed})"
