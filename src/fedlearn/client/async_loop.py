"""The client's loop in an async run: pull, train, push, with no rounds and no waiting.

Each step asks for a task (which says whether the run is over and gives a
fresh seed), takes the CPU slot, pulls the current model *inside* it (so the
model is as fresh as it can be when training starts: staleness is then the
merges made while this client trains, not while it queued for a core), runs
:meth:`~fedlearn.client.worker._Worker.fit` and pushes the delta with the version
it started from.

When the server cannot be reached after every retry, the client goes on as
the Flask seed's clients do: if it cannot pull, it trains on the weights it
has (keeping its base version); if it cannot push, it keeps training from
its own weights and later sends the whole delta accumulated since its base,
with that base's true version and the summed example count. After
``max_offline`` trainings in a row without reaching the server it gives up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlearn.client.remote import PayloadRefused, RetriesExhausted, Task
from fedlearn.errors import ConflictError, RemoteError
from fedlearn.seeding import derive_seed
from fedlearn.types import Weights
from fedlearn.weights import add, subtract

if TYPE_CHECKING:
    from fedlearn.client.worker import _Worker


class AsyncLoop:
    """One client's async state: base weights and version, local weights, unsent examples."""

    def __init__(self, worker: _Worker) -> None:
        self.w = worker
        self.reset()
        self.accepted = 0
        self.refused = 0
        self.went_on = 0  # times the server was unreachable and the client went on
        self.last_version = 0
        self.metrics: dict[str, float] = {}

    def reset(self) -> None:
        """Forget the model and any unsent work (after registering again)."""
        self.base: Weights | None = None  # the weights the unsent delta is measured from
        self.base_version = 0
        self.local: Weights | None = None  # this client's current weights
        self.owed = 0  # examples behind local - base
        self.offline = 0  # trainings in a row without reaching the server
        self.seed = 0
        self.task = Task("train")  # the last task the server gave

    def _unreachable(self, exc: RetriesExhausted, what: str) -> None:
        """Go on offline when we have weights to train on; give up after ``max_offline``."""
        if self.local is None or self.offline >= self.w.config.max_offline:
            raise exc
        self.offline += 1
        self.went_on += 1
        self.w.log(f"cannot {what} ({exc}); training on the weights we have "
                   f"({self.offline}/{self.w.config.max_offline} offline)")

    def step(self) -> bool:
        """Poll, train and push once; True when the server says the run is done."""
        w = self.w
        task: Task | None
        try:
            task = w.call(lambda: w.remote.next_task(w.config.poll_wait))
        except RetriesExhausted as exc:
            self._unreachable(exc, "reach the server")
            task = None
        if task is not None:
            if task.action == "done":
                return True
            if task.action == "wait":
                return False
            if task.action == "evaluate":
                w.evaluate(task, any_version=True)
                return False
            if task.action != "train":
                raise RemoteError(f"the server sent an unknown task action {task.action!r}; "
                                  "use the same fedlearn version on server and clients.")
            self.seed = task.seed
            self.task = task
        else:
            self.seed = derive_seed("offline", self.seed, self.offline)
        self.train(pull=task is not None and self.owed == 0)
        self.push()
        return False

    def train(self, *, pull: bool) -> None:
        """Train once from the local weights, pulling the server's model first if ``pull``."""
        from fedlearn.client.worker import cpu_slot

        w = self.w
        with cpu_slot(w.config.cpu_slot):
            if pull:
                try:
                    weights, version = w.call(w.remote.get_model)
                except RetriesExhausted as exc:
                    self._unreachable(exc, "fetch the model")
                else:
                    self.base, self.base_version, self.local = weights, version, weights
            if self.local is None or self.base is None:
                raise RemoteError("no model to train on; the server never sent one.")
            result = w.fit(self.local, Task("train", 0, self.base_version, self.seed,
                                            self.task.task_id, self.task.config))
        self.local = add(self.local, result.delta)
        self.owed += result.num_examples
        self.metrics = result.metrics

    def push(self) -> None:
        """Send everything trained since the base; keep it for later if the server is away."""
        w = self.w
        if self.local is None or self.base is None:
            return
        delta = subtract(self.local, self.base)
        from fedlearn.client.worker import describe

        m = self.metrics
        line = (f"update from version {self.base_version}: {self.owed} examples, "
                + describe(m))
        task_id = self.task.task_id or None
        try:
            answer = w.call(lambda: w.remote.push_update(self.base_version, delta, self.owed, m,
                                                         task_id))
        except RetriesExhausted as exc:
            self._unreachable(exc, "send our update")
            return
        except (ConflictError, PayloadRefused) as exc:
            if isinstance(exc, PayloadRefused) and not w.attackers.active:
                raise
            # Its base is no good to the server (too stale, from the future after a
            # restart, or the run is over; or an attacker's update caught by the
            # server's checks): drop it and start again from a fresh pull.
            self.refused += 1
            self.base, self.owed, self.offline = self.local, 0, 0
            w.log(f"{line}; refused: {exc}")
            return
        self.accepted += 1
        self.last_version = self.base_version
        self.base, self.owed, self.offline = self.local, 0, 0
        w.log(f"{line}; merged as update {answer.get('update')} "
              f"(staleness {answer.get('staleness')})")
