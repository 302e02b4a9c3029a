"""What the sync and async coordinators share, and all the web layer and the runner use.

:class:`Coordinator` holds the parts of a run that do not depend on its mode
(the settings, the store, the client registry and its registration rule,
federated evaluation, the update norm bound, the replay memory) and declares
what each mode answers differently: the task a client gets, how an update is
taken, the run's length, its summary and where a resumed run starts. The web
layer (:func:`fedlearn.server.app.create_app`) and the runner
(:func:`fedlearn.server.runner.serve`) talk to this interface only, so a new
mode is a subclass, not a branch in either.

No web code: the clock, evaluator and store are passed in.
"""

from __future__ import annotations

import statistics
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fedlearn.config import ServerConfig, TrainConfig
from fedlearn.errors import ConflictError
from fedlearn.server.clients import ClientRegistry, check_identity
from fedlearn.server.fedeval import FedEval
from fedlearn.server.store import Store
from fedlearn.server.sync_types import Evaluator
from fedlearn.types import Weights
from fedlearn.weights import Spec, float_norm, spec_of

if TYPE_CHECKING:
    from fedlearn.server.secagg_round import SecAggPlan

#: Answers to updates kept for replays (a client retrying after a timeout gets the same one).
REPLAY_MEMORY = 10_000


class TaskLike(Protocol):
    """A task as the web layer sends it."""

    @property
    def action(self) -> str:
        """``train``, ``evaluate``, ``wait`` or ``done``."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The task as ``GET /api/task`` answers it."""
        ...


class Coordinator:
    """The common base of :class:`~fedlearn.server.coordinator.SyncCoordinator` and
    :class:`~fedlearn.server.async_coordinator.AsyncCoordinator` (see the module doc).

    Thread-safe where the subclasses are: registration takes ``_lock`` only for
    bookkeeping.
    """

    #: ``sync`` or ``async`` (what ``/api/status`` and the summary say)
    mode: ClassVar[str]
    #: the query parameter an upload names its base with: ``round`` or ``version``
    update_query: ClassVar[str]
    #: further query parameters an upload must carry (async: its ``task_id``)
    update_requires: ClassVar[tuple[str, ...]] = ()
    #: seconds beyond the usual grace the server gives clients to hear "done"
    done_grace_seconds: ClassVar[float] = 0.0
    #: secure aggregation's plan (sync ``--secagg`` only; it adds /api/secagg routes)
    secagg: SecAggPlan | None = None
    #: groups of arrays sent beside the model (SCAFFOLD: ``c``)
    model_extras: tuple[str, ...] = ()
    history: list[dict[str, Any]]
    phase: str

    def __init__(
        self,
        config: ServerConfig,
        initial: Weights,
        *,
        store: Store,
        evaluator: Evaluator | None,
        train_config: TrainConfig | None,
        task_name: str,
        clock: Callable[[], float],
        on_change: Callable[[], None] | None,
        on_round: Callable[[dict[str, Any]], None] | None,
        eval_timeout: float,
    ) -> None:
        self.config = config
        self.store = store
        self.evaluator = evaluator
        self.train_config = train_config if train_config is not None else TrainConfig()
        self.task_name = task_name
        self.clock = clock
        self.on_change = on_change or (lambda: None)
        self.on_round = on_round or (lambda record: None)
        self.spec: Spec = spec_of(initial)
        #: what an update body must hold (the model's arrays, and a strategy's extras)
        self.update_spec: Spec = self.spec
        self._lock = threading.Lock()
        self._clients = ClientRegistry(store)
        self.fed_eval = FedEval(clock, eval_timeout)
        self.norm_limit = config.update_norm_limit(float_norm(initial))
        self._answers: OrderedDict[str, Any] = OrderedDict()

    # -- clients ----------------------------------------------------------------
    def register(
        self, client_id: str, num_examples: int | None = None, *,
        num_test_examples: int | None = None, identity: Spec | None = None,
        task_name: str | None = None, credential: str | None = None, claim: str | None = None,
    ) -> str:
        """Register (or re-register) a client; returns its new credential.

        ``identity`` (names, shapes, dtypes of the client's task state) must match
        the server's, else ConflictError names the first difference. A client id
        already registered is taken back only with its current ``credential``.
        """
        check_identity(self.spec, self.task_name, identity, task_name)
        limit, flag = self.client_limit()
        with self._lock:
            self._clients.check_claim(client_id, credential, limit, claim, flag)
            self._clients.remember_claim(client_id, claim)
        credential, digest = ClientRegistry.new_credential(client_id)
        self._clients.save(client_id, digest, num_examples)
        with self._lock:
            self._clients.add(client_id, digest, num_examples, self.clock(),
                              num_test_examples=num_test_examples)
            self._registered_locked()
        self.on_change()
        return credential

    def client_limit(self) -> tuple[int, str]:
        """The most clients the run admits and the flag that sets it."""
        return self.config.max_clients, "--max-clients"

    def _registered_locked(self) -> None:
        """Called under the lock after a client (re-)registered."""

    def authenticate(self, credential: str) -> str:
        """The client id a credential belongs to; AuthError if none."""
        return self._clients.authenticate(credential)

    def _remember(self, key: str, answer: Any) -> None:
        """Keep ``answer`` for a replay of ``key`` (under the lock), forgetting the oldest."""
        self._answers[key] = answer
        while len(self._answers) > REPLAY_MEMORY:
            self._answers.popitem(last=False)

    # -- what each mode answers differently ---------------------------------------
    def poll(self, client_id: str) -> TaskLike:
        """The client's next task now (``wait`` when there is none yet)."""
        raise NotImplementedError

    def model_bytes(self) -> tuple[bytes, int]:
        """The global model as safetensors bytes, and its version."""
        raise NotImplementedError

    def precheck(self, client_id: str, number: int, task_id: str | None) -> None:
        """Refuse an update that cannot be taken before its body is read (nothing here)."""

    def receive_update(self, client_id: str, number: int, delta: Weights, num_examples: int,
                       metrics: dict[str, float], task_id: str | None) -> dict[str, Any]:
        """Take one update whose base is ``number`` (:attr:`update_query`); the answer."""
        raise NotImplementedError

    def withdraw(self, client_id: str, task_id: str, reason: str = "") -> None:
        """The client gives up its open train task ``task_id`` (it will send no update, e.g.
        its own checks refused it): nothing waits for it. ConflictError when ``task_id`` is
        not the client's open task."""
        raise NotImplementedError

    def secagg_post(self, client_id: str, task_id: str, name: str, body: bytes,
                    num_examples: int | None = None) -> dict[str, Any]:
        """A client's message for a stage of secure aggregation (runs under ``--secagg``)."""
        raise ConflictError("this run does not use secure aggregation; send updates to "
                            "/api/update.")

    def secagg_fetch(self, client_id: str, task_id: str, name: str) -> dict[str, Any] | None:
        """What a client needs before a stage of secure aggregation (``--secagg`` runs)."""
        raise ConflictError("this run does not use secure aggregation; send updates to "
                            "/api/update.")

    def step(self) -> bool:
        """Do what is due (close, evaluate, checkpoint); True if anything changed."""
        raise NotImplementedError

    def seconds_to_deadline(self) -> float | None:
        """Seconds until :meth:`step` has something to do by itself (None: nothing due)."""
        raise NotImplementedError

    def status(self, viewer: str | None = None) -> dict[str, Any]:
        """A JSON-able snapshot for ``GET /api/status``."""
        raise NotImplementedError

    def run_length(self) -> dict[str, Any]:
        """How long the run is, as the registration answer tells a client."""
        raise NotImplementedError

    def summary_fields(self) -> dict[str, Any]:
        """This mode's fields of ``summary.json``."""
        raise NotImplementedError

    def report_title(self) -> str:
        """The title of ``report.png``."""
        raise NotImplementedError

    def resume_point(self) -> str:
        """Where a resumed run goes on from, for the server's first line."""
        raise NotImplementedError

    @property
    def weights(self) -> Weights:
        """The current global model."""
        raise NotImplementedError

    @property
    def clients(self) -> ClientRegistry:
        """The registered clients (read it under no lock only for a snapshot of ids)."""
        return self._clients

    @property
    def done(self) -> bool:
        """True once the run is over (and its last state saved)."""
        return self.phase == "done"

    def submit_evaluation(
        self, client_id: str, key: int, metrics: dict[str, float], num_examples: int
    ) -> None:
        """One client's federated-evaluation answer for the evaluation filed under ``key``."""
        with self._lock:
            self.fed_eval.submit(client_id, key, metrics, num_examples)
        self.on_change()


def median(values: list[float]) -> float | None:
    """The median of ``values``, or None for none."""
    return statistics.median(values) if values else None
