"""A client's side of secure aggregation over the network: its own checks, then four stages.

Under ``--secagg`` the server cannot look at one update, so the client checks
its own before it takes part (names, shapes, dtypes, finite values, the norm
bound the server sent, the quantisation range: see
:func:`~fedlearn.privacy.secagg_update.checked_values`) and refuses to send one
that fails. It then runs the stages of :mod:`fedlearn.server.secagg_round`
with a fresh :class:`~fedlearn.privacy.secagg.SecAggClient` (new keys and
seeds every round).

No HTTP here: the stages go through the worker's remote
(``secagg_post``/``secagg_fetch`` of :class:`~fedlearn.client.remote.RemoteServer`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from fedlearn.errors import FedlearnError, RemoteError, SecAggAbortedError
from fedlearn.privacy.secagg import SecAggClient, SecAggParams
from fedlearn.privacy.secagg_messages import KeyAdvert, ShareInbox, UnmaskRequest
from fedlearn.privacy.secagg_update import UpdateLayout, checked_values, client_vector, clip_range
from fedlearn.types import Weights
from fedlearn.weights import spec_of

T = TypeVar("T")
#: Seconds beyond the server's own deadlines a client waits for a stage to open.
MARGIN_SECONDS = 60.0


class StageRemote(Protocol):
    """What the stages need from a server (methods of ``RemoteServer``)."""

    def secagg_post(self, name: str, task_id: str, body: bytes | Mapping[str, Any],
                    num_examples: int | None = None) -> None:
        """Send this client's message for a stage (``num_examples`` with its keys)."""
        ...

    def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
        """What the client needs before a stage, or None while it is not open."""
        ...


@dataclass(frozen=True)
class SecAggTask:
    """The ``secagg`` object of a train task: the round's parameters and this client's index."""

    index: int
    threshold: int
    bits: int
    clip_range: float
    max_clients: int
    neighbours: int | None
    graph_seed: int
    max_update_norm: float
    dimension: int
    stage_timeout: float
    seconds_left: float
    dp_clip: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggTask:
        """Parse it; RemoteError naming what is missing or wrong."""
        try:
            neighbours, dp_clip = data.get("neighbours"), data.get("dp_clip")
            task = cls(
                index=_int(data["index"]), threshold=_int(data["threshold"]),
                bits=_int(data["bits"]), clip_range=_num(data["range"]),
                max_clients=_int(data["max_clients"]),
                neighbours=None if neighbours is None else _int(neighbours),
                graph_seed=_int(data["graph_seed"]),
                max_update_norm=_num(data["max_update_norm"]), dimension=_int(data["dimension"]),
                stage_timeout=_num(data["stage_timeout"]), seconds_left=_num(data["seconds_left"]),
                dp_clip=None if dp_clip is None else _num(dp_clip),
            )
            if task.dp_clip is not None and not task.dp_clip > 0:
                raise ValueError(f"the DP clip norm {task.dp_clip} is not positive")
            task.params()
        except (KeyError, TypeError, ValueError, FedlearnError) as exc:
            raise RemoteError(f"the server's secure aggregation settings are not valid ({exc}); "
                              "use the same fedlearn version on server and clients.") from None
        if task.clip_range != clip_range(task.max_update_norm):
            raise RemoteError("the server's secure aggregation range does not follow from its "
                              "norm bound; use the same fedlearn version on server and clients.")
        return task

    def params(self) -> SecAggParams:
        """The round's :class:`SecAggParams`."""
        return SecAggParams(threshold=self.threshold, clip_range=self.clip_range,
                            max_clients=self.max_clients, bits=self.bits,
                            neighbours=self.neighbours, graph_seed=self.graph_seed)


@dataclass(frozen=True)
class CheckedUpdate:
    """A client's update ready to mask: its values in the vector's order, and under
    DP-FedAvg whether its own clip left it as it was (``unclipped``)."""

    values: npt.NDArray[np.float64]
    unclipped: bool = False


def check_update(task: SecAggTask, weights: Weights, delta: Weights,
                 num_examples: int) -> CheckedUpdate:
    """This client's update, clipped to the round's DP clip norm when there is one and
    checked; PayloadError for an update it must not send (a NaN, for one; see
    :func:`~fedlearn.privacy.secagg_update.checked_values`)."""
    spec = spec_of(weights)
    layout = UpdateLayout.of(spec)
    if layout.dimension != task.dimension:
        raise RemoteError(f"the server expects {task.dimension} values in a masked update but "
                          f"this client's model gives {layout.dimension}; train the run's task.")
    unclipped = False
    if task.dp_clip is not None:
        # DP-FedAvg: the server never sees this update, so the client clips it (b = ‖Δ‖ ≤ C).
        from fedlearn.privacy.dp import clip, unclipped_bit

        delta, norm = clip(delta, task.dp_clip)
        unclipped = bool(unclipped_bit(norm, task.dp_clip))
    return CheckedUpdate(checked_values(layout, spec, delta, weights, num_examples=num_examples,
                                        norm_limit=task.max_update_norm), unclipped)


def run_stages(
    remote: StageRemote, task_id: str, task: SecAggTask, update: CheckedUpdate, *,
    num_examples: int, train_loss: float | None, call: Callable[[Callable[[], Any]], Any],
    wait: float,
    clock: Callable[[], float] = time.monotonic,
    after_masked: Callable[[], None] | None = None,
) -> None:
    """The four stages for this client; returns once its unmask shares are sent.

    ``update`` comes from :func:`check_update`; the client declares
    ``num_examples`` with its keys and weighs its update by min(n, E)/E once the
    server names E, the largest count declared in the round (by 1 under
    DP-FedAvg). ``call(fn)`` runs one request (with the worker's retries),
    ``wait`` is the long-poll length.
    ConflictError when the server closed a stage without this client or aborted
    the round; SecAggAbortedError when too few clients are left or a stage never
    opens; PayloadError for messages that fail their checks (a share that does
    not decrypt, a request that would reveal both secrets).
    """
    client = SecAggClient(task.index, task.params())
    give_up = clock() + task.seconds_left + 3 * task.stage_timeout + MARGIN_SECONDS

    def fetch(name: str) -> dict[str, Any]:
        while True:
            left = give_up - clock()
            if left <= 0:
                raise SecAggAbortedError(f"the server did not open the secure aggregation "
                                         f"stage after {name!r} in time; the round goes on "
                                         "without this client.")
            answer = call(functools.partial(remote.secagg_fetch, name, task_id,
                                            min(wait, left)))
            if answer is not None:
                return dict(answer)

    def post(name: str, body: bytes | Mapping[str, Any], examples: int | None = None) -> None:
        call(lambda: remote.secagg_post(name, task_id, body, examples))

    post("advert", client.advertise().to_json(), num_examples)
    published = fetch("keys")
    keys, scale = published.get("keys"), published.get("example_scale")
    if not isinstance(keys, list) or isinstance(scale, bool) or not isinstance(
            scale, int | float) or not scale >= num_examples:
        raise RemoteError("the server's key list or example scale is not valid; use the same "
                          "fedlearn version on server and clients.")
    vector = client_vector(update.values, num_examples=num_examples, example_scale=float(scale),
                           train_loss=train_loss, clip=task.clip_range,
                           equal_weight=task.dp_clip is not None, unclipped=update.unclipped)
    post("shares", client.share_keys([KeyAdvert.from_json(k) for k in keys]).to_json())
    inbox = ShareInbox.from_json(fetch("inbox").get("inbox"))
    post("masked", client.masked_input(vector, inbox).masked)
    if after_masked is not None:
        after_masked()
    request = UnmaskRequest.from_json(fetch("unmask").get("request"))
    post("unmask", client.unmask(request).to_json())


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)
