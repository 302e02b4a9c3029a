"""``fedlearn sim``: simulate N clients in this process, with a progress bar."""

from __future__ import annotations

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
    Beta1Opt,
    Beta2Opt,
    ClipNormOpt,
    ProxMuOpt,
    ServerLrOpt,
    ServerMomentumOpt,
    StrategyOpt,
    TauOpt,
    strategy_flags,
)
from fedlearn.errors import ConfigError

DEFAULT_THREADS = 2


def sim(
    clients: Annotated[int, typer.Option("--clients", "-n", help="Simulated clients.")] = 100,
    per_round: Annotated[int, typer.Option("--per-round", "-k",
                         help="Clients sampled per round.")] = 10,
    partition: Annotated[str, typer.Option("--partition", "-p",
                         help="iid, dirichlet:A or shards:K, split among the clients.")] = "iid",
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds to run.")] = 10,
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
    dp_clip_on: DPClipOnOpt = "server",
    dp_target_epsilon: DPTargetOpt = None,
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Rounds between federated "
                          "evaluations (clients with local test data).")] = 1,
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
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")]
    = DEFAULT_THREADS,
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

    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    where = placement(backend, ray_address, ray_workers, ray_cpus_per_worker,
                      ray_gpus_per_worker, ray_timeout)
    if resume is not None:
        resume_sim(resume, where, device=device_name(device), threads=threads,
                   given=flags_given(ctx))
        return
    the_task, ref = resolve_task(task, dataset, model)
    train = TrainConfig.from_dict({**the_task.config, **{k: v for k, v in {
        "epochs": local_epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "momentum": momentum, "weight_decay": weight_decay}.items() if v is not None}})
    config = SimConfig(
        clients=clients, per_round=per_round, partition=partition, rounds=rounds,
        engine=engine, dataset=dataset, model=model, task=ref.get("task", ""), data=data,
        label=label, test_fraction=test_fraction, eval_every=eval_every,
        eval_fraction=eval_fraction, seed=seed, train=train,
        max_parallel=max_parallel, precision=precision, dp_sgd=dp_sgd, dp_delta=dp_delta,
        dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip, dp_clip_on=dp_clip_on,
        dp_target_epsilon=dp_target_epsilon,
        attack=attack or "", attackers=attackers,
        **{k: v for k, v in strategy_flags(strategy, server_lr, server_momentum, beta1, beta2,
                                           tau, prox_mu, clip_norm).items() if v is not None},
        **where,
    )
    the_strategy = build_strategy(config)  # resolved once, here
    device = device_name(device)
    torch.set_num_threads(threads)
    run = RunDir.create(out or default_run_dir("sim"), config_record(config))
    on_ray = " on Ray" if backend == "ray" else ""
    console.print(f"fedlearn sim: {clients} clients, {per_round} per round, {the_task.name}, "
                  f"{engine} engine{on_ray}, {rounds} rounds -> {run.path}", markup=False,
                  highlight=False)
    try:
        with progress_bar("rounds", rounds) as bar:
            def on_round(r: dict[str, Any]) -> None:
                bar.advance(f"{metrics_text(r, 2)}  {r['seconds']:.2f}s/round")

            summary = run_simulation(config, the_task, run, on_round=on_round,
                                     log=lambda s: console.print(s, markup=False),
                                     device=device, strategy=the_strategy)
    except BaseException:
        run.discard_if_empty()
        raise
    per = summary["median_round_seconds"]
    per_text = f"; median {per:.3f}s per round" if per is not None else ""
    console.print(
        f"{final_text(summary)} after {summary['rounds']} rounds ({summary['engine']} "
        f"engine{per_text}); run directory {run.path}", markup=False, highlight=False)
