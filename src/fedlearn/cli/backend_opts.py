"""``fedlearn sim``'s placement flags (``--backend``, ``--ray-*``) and ``--resume``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedlearn.cli.common import console, final_text, metrics_text, progress_bar
from fedlearn.errors import ConfigError

BackendOpt = Annotated[str, typer.Option(
    "--backend", help="local (this process) or ray (the sampled clients of each round in "
    "chunks on Ray workers; needs pip install 'fedlearn\\[ray]').")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join: auto (the one this machine belongs to), "
    "HOST:6379, or local (a new Ray for this run). [default: the Ray this machine runs, else "
    "a new one]")]
RayWorkersOpt = Annotated[int | None, typer.Option(
    "--ray-workers", help="Ray actors training clients. [default: the cluster's CPUs / "
    "--ray-cpus-per-worker]")]
RayCpusOpt = Annotated[float | None, typer.Option(
    "--ray-cpus-per-worker", help="CPUs (and torch threads) of each Ray worker. [default: 1]")]
RayGpusOpt = Annotated[float | None, typer.Option(
    "--ray-gpus-per-worker", help="GPUs of each Ray worker (it trains on cuda when > 0). "
    "[default: 0]")]
RayTimeoutOpt = Annotated[float | None, typer.Option(
    "--ray-timeout", help="Seconds a worker may take for its clients of a round before it is "
    "replaced and they train again elsewhere. [default: 600]")]
SimResumeOpt = Annotated[Path | None, typer.Option(
    "--resume", help="Run directory of an interrupted `fedlearn sim` (its config.toml); "
    "--backend, --ray-*, --device and --threads may change.")]

#: Flags that may accompany --resume: where and how fast it runs, not what it computes.
PLACEMENT_FLAGS = ("backend", "ray_address", "ray_workers", "ray_cpus_per_worker",
                   "ray_gpus_per_worker", "ray_timeout", "device", "threads", "resume")


def placement(backend: str, address: str | None, workers: int | None, cpus: float | None,
              gpus: float | None, timeout: float | None) -> dict[str, Any]:
    """The SimConfig fields of the placement flags; with ``--backend ray``, Ray must import."""
    if backend == "ray":
        from fedlearn.sim.ray_backend import require_ray

        require_ray()
    return {"backend": backend, "ray_address": address, "ray_workers": workers,
            "ray_cpus_per_worker": cpus, "ray_gpus_per_worker": gpus, "ray_timeout": timeout}


def flags_given(ctx: typer.Context | None) -> set[str] | None:
    """Parameter names given on the command line (None when not run from the command line)."""
    if ctx is None:
        return None
    return {name for name in ctx.params
            if str(ctx.get_parameter_source(name)).rsplit(".", 1)[-1] in ("COMMANDLINE",
                                                                        "ENVIRONMENT")}


def resume_sim(path: Path, where: dict[str, Any], *, device: str, threads: int,
               given: set[str] | None) -> None:
    """Continue the simulated run in ``path`` from its last checkpoint, with a progress bar.

    The run's ``config.toml`` says what it computes; of ``where`` (placement)
    only the flags given on the command line replace the saved ones.
    """
    import torch

    from fedlearn.runs import RunDir
    from fedlearn.sim import run_simulation
    from fedlearn.sim.checkpoint import load_checkpoint, sim_config_from_record
    from fedlearn.sim.ray_backend import RAY_FIELDS

    if given is not None:
        other = sorted(given - set(PLACEMENT_FLAGS))
        if other:
            names = ", ".join("--" + n.replace("_", "-") for n in other)
            raise ConfigError(f"--resume continues the run with its saved settings; drop "
                              f"{names}.")
    changes = {k: v for k, v in where.items()
               if (k in given if given is not None else v not in (None, "local"))}
    if changes.get("backend") == "local":
        changes.update({k: None for k in RAY_FIELDS})
    run = RunDir.open(path)
    record = run.read_config()
    if record.get("mode") != "sim":
        raise ConfigError(f"{path} is not a `fedlearn sim` run (its mode is "
                          f"{record.get('mode')!r}); resume it with its own command.")
    config = sim_config_from_record(record, changes, where=str(path / "config.toml"))
    task = saved_task(config)
    done = load_checkpoint(run.path, seed=config.seed).round
    torch.set_num_threads(threads)
    on_ray = " on Ray" if config.backend == "ray" else ""
    console.print(f"fedlearn sim: resuming {run.path} after round {done} of {config.rounds} "
                  f"({config.engine} engine{on_ray})", markup=False, highlight=False)
    with progress_bar("rounds", config.rounds) as bar:
        bar.set(done)

        def on_round(r: dict[str, Any]) -> None:
            bar.advance(f"{metrics_text(r, 2)}  {r['seconds']:.2f}s/round")

        summary = run_simulation(config, task, run, on_round=on_round, device=device,
                                 log=lambda s: console.print(s, markup=False), resume=True)
    console.print(f"{final_text(summary)} after {summary['rounds']} rounds ({summary['engine']} "
                  f"engine); run directory {run.path}", markup=False, highlight=False)


def saved_task(config: Any) -> Any:
    """The task a saved run names: its ``task`` reference, else the built-in dataset/model."""
    from fedlearn.data.fetch import SOURCES
    from fedlearn.tasks import builtin_task, load_task

    ref = str(config.task or "")
    dataset, _, model = ref.partition("/")
    if not ref:
        return builtin_task(config.dataset, config.model)
    if dataset in SOURCES and model and ":" not in ref:  # a built-in's name, as simulate() saves
        return builtin_task(dataset, model)
    return load_task(ref)
