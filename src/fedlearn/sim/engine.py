"""The simulator's round loop, shared by every engine.

Each round does what the HTTP server's :class:`~fedlearn.server.coordinator.SyncCoordinator`
does with the same flags, so a simulated run and a ``fedlearn run`` reach
the same model: the same initial state (the task's model under the run
seed), the same client ids (``client-{i}`` holding what the task's data
function gives client ``i`` of N), the same sample (``sample_clients`` with
fraction K/N), the same data seeds (``task_seed(seed, round, client_id)``), the
same round config, and the same strategy, configured and closed by the same
code (:mod:`fedlearn.rounds`). SCAFFOLD's client control variates are held
per virtual client in memory. Only the training differs, and that is the
engine's business. A round whose aggregate is unusable keeps the previous
model and says why in its record (``failed``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlearn.attacks import Attackers
from fedlearn.config import TrainConfig, build_strategy, privacy_budget
from fedlearn.errors import ConfigError, PartitionError
from fedlearn.metrics import weighted_means
from fedlearn.privacy.dpsgd import DPSGD, parse_dp_sgd
from fedlearn.rounds import RoundFailed, RoundUpdates, close_round, round_config
from fedlearn.runs import RunDir, final_metrics
from fedlearn.seeding import task_seed
from fedlearn.sim.base import ENGINES, ClientTask, Engine, check_precision
from fedlearn.sim.checkpoint import Checkpointer, resume_point
from fedlearn.sim.config import SimConfig, check_per_round
from fedlearn.sim.sequential import ScriptEngine, SequentialEngine
from fedlearn.sim.vectorized import VectorizedEngine, unsupported_reason
from fedlearn.strategies import Strategy, Update, poisson_sample, sample_clients
from fedlearn.tasks.base import ClientData, Task
from fedlearn.types import ControlVariates, Weights
from fedlearn.weights import unusable

RoundHook = Callable[[dict[str, Any]], None]



def model_task(model: nn.Module) -> Task:
    """A cross-entropy classification task around a bare model (each trainer gets a copy)."""
    return Task(name=type(model).__name__, model=lambda: copy.deepcopy(model))


def make_engine(
    name: str,
    task: Task | nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int = 0,
    device: str = "cpu",
    max_parallel: int | None = None,
    precision: str = "fp32",
    dp_sgd: DPSGD | None = None,
    log: Callable[[str], None] = print,
) -> Engine:
    """The engine ``name`` for ``task`` on the pooled training rows ``(x, y)``.

    ``vectorized`` stacks the sampled clients: the hand-written ``mlp`` engine
    where it applies (measurably the fastest), else the general
    :class:`~fedlearn.sim.functional.FunctionalEngine` for any torch model it
    can stack; otherwise it falls back to ``sequential``, saying why in one
    line through ``log``. ``max_parallel`` caps the clients stacked at once
    (None: as many as memory holds); ``precision`` is ``fp32`` or ``bf16``
    (autocast). The rows move to ``device`` once, here. ``dp_sgd`` trains
    each client with Opacus's DP-SGD, one client after another.
    """
    from fedlearn.training import Trainer

    if isinstance(task, nn.Module):
        task = model_task(task)
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}.")
    check_precision(precision)
    trainer = Trainer(task, seed=seed, device=device, precision=precision, dp_sgd=dp_sgd)
    if dp_sgd is not None and trainer.model is not None:
        from fedlearn.training_dp import check_private_model

        check_private_model(trainer.model)
    if name == "vectorized":
        why = _vectorized_reason(task, trainer)
        if why is None and trainer.model is not None and task.loss_name == "cross_entropy" \
                and precision == "fp32" and trainer.device == "cpu" \
                and unsupported_reason(trainer.model, config) is None:
            return VectorizedEngine(trainer.model, x, y, max_parallel=max_parallel)
        if why is None and trainer.model is not None:
            from fedlearn.sim.functional import FunctionalEngine, functional_unsupported_reason
            from fedlearn.training import per_sample_loss

            loss = per_sample_loss(task)
            xd, yd = x.to(trainer.device), y.to(trainer.device)
            why = functional_unsupported_reason(trainer.model, config, x=xd[:4], y=yd[:4],
                                                loss=loss, precision=precision)
            if why is None:
                return FunctionalEngine(trainer.model, xd, yd, loss=loss,
                                        max_parallel=max_parallel, precision=precision,
                                        log=log)
        log(f"note: the vectorized engine cannot run this ({why}); using the sequential engine.")
    return SequentialEngine(trainer, x, y)


def _vectorized_reason(task: Task, trainer: Any) -> str | None:
    """Why the stacked engines cannot train ``task`` (None when they can try)."""
    if task.train is not None or task.optimizer is not None:
        return "the task trains with its own function or optimizer"
    if trainer.model is None:
        return "the task has no torch model"
    if task.loss_name is None:
        return "the task's loss is its own function"
    if trainer.dp_sgd is not None:
        return "DP-SGD trains through Opacus, one client at a time"
    return None


def client_ids(clients: int) -> list[str]:
    """The ids of ``clients`` simulated clients, as ``fedlearn run`` names its processes."""
    return [f"client-{i}" for i in range(clients)]


class Simulation:
    """A simulated run held in memory: clients' data, engine, strategy and its state.

    ``strategy`` is the run's strategy object (None: the one ``config`` names).
    ``log`` hears the one-line notice of an engine fallback.
    """

    def __init__(
        self,
        config: SimConfig,
        task: Task,
        *,
        strategy: Strategy | None = None,
        device: str = "cpu",
        log: Callable[[str], None] = print,
    ) -> None:
        from fedlearn.tasks.runtime import server_test_data
        from fedlearn.training import Shard, Trainer, initial_state

        self.config = config
        self.task = task
        self.ids = client_ids(config.clients)
        self.train_config = config.train
        self.strategy = strategy if strategy is not None else build_strategy(config)
        check_per_round(self.strategy, config.per_round)
        self.state = self.strategy.init(initial_state(task, config.seed))
        #: DP-FedAvg's (ε, δ) accounting (None without it) and the rounds it has released.
        self.budget = privacy_budget(config, "poisson")
        self.released = 0
        #: SCAFFOLD: each virtual client's own control variate (from its first round)
        self.controls: dict[str, Weights] = {}
        self.test_shards: dict[str, Shard] = {}
        #: The largest DP-SGD ε any client has spent so far (0 without --dp-sgd).
        self.dp_sgd_epsilon = 0.0
        self.contexts = self._contexts()
        self.attackers = Attackers.of(config.attack, config.attackers or 0.0, self.ids,
                                      config.seed, task)
        if task.script is not None:
            if config.backend == "ray":
                raise ConfigError("a client-API script task runs in this process; drop "
                                  "--backend ray.")
            self.engine: Engine = ScriptEngine(task, self.contexts, seed=config.seed,
                                               device=device)
            self.rows: dict[str, np.ndarray] = {cid: np.zeros(0, np.int64) for cid in self.ids}
        else:
            parts = [self._load(i) for i in range(config.clients)]
            xs = np.concatenate([p.train.x for p in parts])
            ys = np.concatenate([self.attackers.labels(cid, p.train.y)
                                 for cid, p in zip(self.ids, parts, strict=True)])
            ends = np.cumsum([len(p.train) for p in parts])
            self.rows = {cid: np.arange(end - len(p.train), end, dtype=np.int64)
                         for cid, p, end in zip(self.ids, parts, ends, strict=True)}
            for cid, p in zip(self.ids, parts, strict=True):
                if p.test is not None and len(p.test):
                    self.test_shards[cid] = Shard.of(p.test)
            pool = Shard.from_numpy(xs, ys)
            # The engine is chosen for the rounds' config (FedProx's term, SCAFFOLD's steps).
            first = round_config(self.strategy, self.state, config.train, 1)
            if config.backend == "ray":
                from fedlearn.sim.ray_backend import RayEngine

                self.engine = RayEngine(config, task, xs, ys, train=first, log=log)
            else:
                self.engine = make_engine(config.engine, task, pool.x, pool.y, first,
                                          seed=config.seed, device=device,
                                          max_parallel=config.max_parallel,
                                          precision=config.precision,
                                          dp_sgd=parse_dp_sgd(config.dp_sgd, config.sgd_delta),
                                          log=log)
        evaluable = task.model is not None or task.evaluate is not None
        self.evaluator = Trainer(task, seed=config.seed, device=device) if evaluable else None
        test = server_test_data(task) if evaluable else None
        self.test = Shard.of(test) if test is not None and len(test) else None

    def _contexts(self) -> list[Any]:
        from fedlearn.tasks.runtime import context

        spec = self.config.partition
        return [context(index=i, num_clients=self.config.clients, client_id=cid,
                        data=self.config.data, label=self.config.label,
                        partition=None if self.config.data else f"{spec}:{self.config.clients}:{i}",
                        seed=self.config.seed, test_fraction=self.config.test_fraction)
                for i, cid in enumerate(self.ids)]

    def _load(self, index: int) -> ClientData:
        from fedlearn.tasks.runtime import load_client_data

        try:
            data = load_client_data(self.task, self.contexts[index])
        except PartitionError as exc:
            raise ConfigError(f"--partition: {exc}") from None
        if len(data.train) == 0:
            raise ConfigError(f"client {index} has no training data; use fewer clients.")
        return data

    @property
    def weights(self) -> Weights:
        """The current global model."""
        return self.state.weights

    def round_tasks(self, rnd: int) -> list[ClientTask]:
        """The tasks of round ``rnd``: the sampled clients, their rows and data seeds."""
        config = self.config
        if self.budget is not None:
            # DP-FedAvg is accounted for Poisson sampling, so that is how clients are drawn.
            sampled = poisson_sample(self.ids, config.fraction, seed=config.seed,
                                     round_number=rnd)
        else:
            sampled = sample_clients(self.ids, config.fraction, seed=config.seed,
                                     round_number=rnd, attempt=0, minimum=1)
        server = self.strategy.client_arrays(self.state).get("c")
        return [
            ClientTask(cid, self.rows[cid], task_seed(config.seed, rnd, cid),
                       None if server is None else ControlVariates(server, self.controls.get(
                           cid) or {k: np.zeros_like(v) for k, v in server.items()}))
            for cid in sampled
        ]

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` (1-based): sample, train, aggregate, evaluate; its metrics record."""
        config = self.config
        t0 = time.perf_counter()
        tasks = self.round_tasks(rnd)
        t1 = time.perf_counter()
        round_cfg = round_config(self.strategy, self.state, self.train_config, rnd)
        updates = self.engine.train_round(self.state.weights, tasks, round_cfg)
        train_seconds = time.perf_counter() - t1
        if self.attackers.active:
            seeds = {t.client_id: t.seed for t in tasks}
            updates = [replace(u, delta=self.attackers.delta(u.client_id, u.delta,
                                                             seeds[u.client_id]))
                       for u in updates]
        record: dict[str, Any] = {"round": rnd}
        # What the HTTP server would refuse at the door (a non-finite delta) never
        # reaches the strategy here either.
        usable = [u for u in updates if unusable(u.delta) is None]
        if len(usable) < len(updates):
            record["refused"] = len(updates) - len(usable)
        collected = RoundUpdates(self.strategy)
        for u in sorted(usable, key=lambda u: u.client_id):
            collected.add(Update(u.delta, u.num_examples, u.extra, u.client_id))
        try:
            self.state = close_round(self.strategy, self.state, collected,
                                     num_clients=config.clients)
        except RoundFailed as exc:
            record["failed"] = str(exc)
        else:
            if self.budget is not None:
                self.released += 1
                record.update(self.budget.record(self.released))
            for u in updates:
                if u.control is not None:
                    self.controls[u.client_id] = u.control
        if self.test is not None and self.evaluator is not None:
            record.update(self.evaluator.evaluate(self.state.weights, self.test).metrics)
        record.update(self._federated_eval(rnd))
        spent = [u.metrics["dp_epsilon"] for u in updates if "dp_epsilon" in u.metrics]
        if spent:
            self.dp_sgd_epsilon = max(self.dp_sgd_epsilon, *spent)
            record["dp_sgd_epsilon_max"] = self.dp_sgd_epsilon
        record.update({
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "clients": len(updates),
            "examples": sum(u.num_examples for u in updates),
        })
        return record

    def _federated_eval(self, version: int) -> dict[str, Any]:
        """Clients evaluate the new model on their own test data, as the HTTP server asks."""
        cfg = self.config
        if version % cfg.eval_every and version < cfg.rounds:
            return {}
        return self.federated_eval(version)

    def federated_eval(self, version: int, weights: Weights | None = None) -> dict[str, Any]:
        """``fed_*`` means of a sample of clients evaluating ``weights`` (by default the
        global model) on their own test data; ``version`` seeds the sample."""
        cfg = self.config
        weights = self.state.weights if weights is None else weights
        scripts = isinstance(self.engine, ScriptEngine)
        able = list(self.ids) if scripts else sorted(self.test_shards)
        if not able:
            return {}
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else cfg.fraction
        chosen = sample_clients(able, fraction, seed=cfg.seed ^ 0x5EED, round_number=version)
        results = []
        for cid in chosen:
            if isinstance(self.engine, ScriptEngine):
                res = self.engine.evaluate(cid, weights, version)
            elif self.evaluator is not None:
                res = self.evaluator.evaluate(weights, self.test_shards[cid])
            else:  # pragma: no cover
                continue
            results.append((res.metrics, res.num_examples))
        fed: dict[str, Any] = {f"fed_{k}": v for k, v in weighted_means(results).items()}
        fed["fed_clients"] = sum(1 for _, n in results if n > 0)
        fed["fed_examples"] = sum(n for _, n in results)
        return fed

    def close(self) -> None:
        """Stop client scripts or Ray workers, if any."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def run_simulation(
    config: SimConfig,
    task: Task,
    run: RunDir,
    *,
    on_round: RoundHook | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    strategy: Strategy | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Simulate ``config.rounds`` rounds of ``task`` in this process, writing ``run``.

    ``strategy`` is the run's strategy object (None: the one ``config`` names).

    Each round appends {round, loss and the task's metrics (server test data),
    fed_* (clients' own test data), seconds, train_seconds, clients, examples}
    to ``metrics.jsonl``, checkpoints the run's state (in the background) and
    calls ``on_round`` with the record; the end writes ``model.safetensors``,
    ``summary.json`` and ``report.png``. Returns the summary. ``resume``
    continues ``run`` from its last checkpoint (to the same final model).
    A run in virtual time (``config.virtual``) goes to :func:`fedlearn.sim.virtual.run_virtual`
    (and cannot be resumed yet).
    """
    if config.virtual:
        from fedlearn.sim.virtual import run_virtual

        if resume:
            raise ConfigError("a run in simulated time (--mode async, --client-speeds, "
                              "--round-timeout or --max-virtual-time) cannot be resumed yet; "
                              "start it again.")

        return run_virtual(config, task, run, on_round=on_round, log=log, device=device,
                           strategy=strategy)
    started = time.perf_counter()
    sim = Simulation(config, task, strategy=strategy, device=device, log=log)
    announce_attackers(sim, run, log)
    history: list[dict[str, Any]] = []
    first = 1
    checkpoints = Checkpointer(run.path, seed=config.seed)
    try:
        if resume:
            history, first = resume_point(run, sim)
        if sim.budget is not None:
            log(f"DP-FedAvg: {sim.budget.describe()}")
        for rnd in range(first, config.rounds + 1):
            if sim.budget is not None and not sim.budget.allows(sim.released + 1):
                log(f"stopped before round {rnd}: it would take ε above "
                    f"--dp-target-epsilon {sim.budget.target_epsilon:g} "
                    f"(ε after {sim.released} rounds: {sim.budget.epsilon(sim.released):.3f})")
                break
            record = sim.run_round(rnd)
            history.append(record)
            run.append_metrics(record)
            checkpoints.save(sim, rnd)
            if on_round is not None:
                on_round(record)
        checkpoints.close()
    finally:
        checkpoints.close(raise_errors=False)
        sim.close()
    privacy: dict[str, Any] = {}
    if sim.budget is not None:
        privacy = {**sim.budget.record(sim.released), "dp_rounds": sim.released,
                   "dp_accountant": sim.budget.describe()}
        if len(history) < config.rounds:
            privacy["stopped"] = "dp_target_epsilon"
    return _finish(run, config, task, sim.engine.name, sim.weights, history, started, privacy)


def announce_attackers(sim: Simulation, run: RunDir, log: Callable[[str], None]) -> None:
    """Write ``attackers.json`` and say who attacks, when the run has attackers."""
    if sim.attackers.attack is not None:
        run.write_attackers(sim.attackers.record())
        log(f"attack {sim.attackers.attack}: {len(sim.attackers.ids)} of {sim.config.clients} "
            f"clients attack (listed in {run.path / 'attackers.json'})")


def _finish(
    run: RunDir, config: SimConfig, task: Task, engine: str, weights: Weights,
    history: list[dict[str, Any]], started: float, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    run.save_model(weights)
    later = [h["seconds"] for h in history[1:]]
    summary = {
        "mode": "sim",
        "engine": engine,
        "engine_requested": config.engine,
        "backend": config.backend,
        "task": task.name,
        "dataset": config.dataset,
        "model": config.model,
        "strategy": config.strategy,
        "clients": config.clients,
        "per_round": config.per_round,
        "partition": config.partition,
        "rounds": len(history),
        **final_metrics(history),
        "wall_seconds": time.perf_counter() - started,
        "median_round_seconds": statistics.median(later) if later else None,
        **(extra or {}),
    }
    run.write_summary(summary)
    run.write_report(
        f"simulated ({engine}, {config.per_round}/{config.clients} per round): {task.name}"
    )
    return summary


def config_record(config: SimConfig) -> dict[str, Any]:
    """``config`` as the mapping written to ``config.toml``."""
    values = asdict(config)
    train = values.pop("train")
    extra = train.pop("extra", {})
    return {"mode": "sim", "sim": values, "train": {**train, **extra}}
