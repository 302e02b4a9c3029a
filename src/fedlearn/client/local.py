"""One party's side of training, with no network: its data, its task, its model workspace.

:class:`LocalClient` is what the HTTP client loop and the simulator both call to
train or evaluate from global weights, so a task trains the same way in both.
A task with a client-API ``script`` runs that script in a thread instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedlearn.client_api import ClientInfo, FLModel, ScriptRunner
from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.tasks.base import ClientData, DataContext, Task
from fedlearn.types import ClientResult, ControlVariates, EvalResult, Weights
from fedlearn.weights import check, spec_of, subtract

if TYPE_CHECKING:
    from fedlearn.privacy.dpsgd import DPSGD
    from fedlearn.training import Shard, Trainer


class LocalClient:
    """Trains and evaluates ``task`` for one party (``ctx`` says which, and where its data is)."""

    def __init__(
        self, task: Task, ctx: DataContext, *, seed: int = 0, device: str = "cpu",
        data: ClientData | None = None, dp_sgd: DPSGD | None = None,
        ledger_file: str | None = None,
    ) -> None:
        self.task = task
        self.ctx = ctx
        self.ledger_file = Path(ledger_file) if ledger_file and dp_sgd is not None else None
        self.runner: ScriptRunner | None = None
        self.trainer: Trainer | None = None
        self.train_shard: Shard | None = None
        self.test_shard: Shard | None = None
        if task.script is not None:
            self.runner = ScriptRunner(task.script, ClientInfo(
                client_id=ctx.client_id, client_index=ctx.client_index,
                num_clients=ctx.num_clients,
                data_path=None if ctx.path is None else str(ctx.path), label=ctx.label,
                seed=ctx.seed, test_fraction=ctx.test_fraction))
            return
        from fedlearn.tasks.runtime import load_client_data
        from fedlearn.training import Shard, Trainer

        loaded = data if data is not None else load_client_data(task, ctx)
        self.trainer = Trainer(task, seed=seed, device=device, dp_sgd=dp_sgd)
        if dp_sgd is not None:
            from fedlearn.training_dp import check_private_model

            if self.trainer.model is not None:
                check_private_model(self.trainer.model)
            if self.ledger_file is not None:
                from fedlearn.privacy.dpsgd import DPLedger

                self.trainer.ledger = DPLedger.load(self.ledger_file)
        self.train_shard = Shard.of(loaded.train)
        self.test_shard = Shard.of(loaded.test) if loaded.test is not None else None

    @property
    def num_examples(self) -> int | None:
        """Training examples (None when a script holds the data)."""
        return None if self.train_shard is None else len(self.train_shard)

    @property
    def num_test_examples(self) -> int:
        """Local test examples. A script holds its own data, so it is asked to evaluate
        (1 stands for "some"; it answers with its true count, 0 when it has none)."""
        if self.runner is not None:
            return 1
        return 0 if self.test_shard is None else len(self.test_shard)

    def fit(
        self, weights: Weights, config: TrainConfig, *, seed: int, round_number: int = 0,
        version: int = 0, slowdown: float = 1.0, control: ControlVariates | None = None,
    ) -> ClientResult:
        """Train from ``weights`` with ``config``; the delta, examples and metrics.

        ``control``: SCAFFOLD's control variates (see :meth:`Trainer.fit`).
        """
        if self.trainer is not None and self.train_shard is not None:
            result = self.trainer.fit(weights, self.train_shard, config, seed=seed,
                                      base_version=version, slowdown=slowdown, control=control)
            if self.ledger_file is not None and self.trainer.ledger is not None:
                self.trainer.ledger.save(self.ledger_file)
            return result
        if self.runner is None:  # pragma: no cover - one of the two is always set
            raise ConfigError("this client has neither a model nor a script.")
        if control is not None:
            raise ConfigError(f"task {self.task.name!r} trains with a client-API script, "
                              "which cannot take SCAFFOLD's corrected steps; choose another "
                              "--strategy.")
        started = time.perf_counter()
        reply = self.runner.ask(FLModel(weights={k: v.copy() for k, v in weights.items()},
                                        kind="train", config=config.as_dict(),
                                        round=round_number, version=version, seed=seed))
        spec = spec_of(weights)
        if reply.delta is not None:
            check(reply.delta, spec)
            delta = reply.delta
        else:
            new = reply.weights or {}
            check(new, spec)
            delta = subtract(new, weights)
        if reply.num_examples < 1:
            raise ConfigError("the client script sent an update with num_examples < 1; send "
                              "the number of examples it trained on.")
        metrics = {**reply.metrics, "seconds": time.perf_counter() - started}
        return ClientResult(delta, reply.num_examples, version, metrics)

    def evaluate(self, weights: Weights, *, round_number: int = 0,
                 version: int = 0) -> EvalResult:
        """The task's metrics of ``weights`` on the local test data (0 examples if none)."""
        if self.trainer is not None:
            if self.test_shard is None or len(self.test_shard) == 0:
                return EvalResult({}, 0)
            return self.trainer.evaluate(weights, self.test_shard)
        if self.runner is None:  # pragma: no cover
            raise ConfigError("this client has neither a model nor a script.")
        reply = self.runner.ask(FLModel(weights={k: v.copy() for k, v in weights.items()},
                                        kind="evaluate", round=round_number, version=version))
        return EvalResult(dict(reply.metrics), reply.num_examples)

    def close(self) -> None:
        """Stop the script (if any)."""
        if self.runner is not None:
            self.runner.stop()
