"""Secure aggregation in a sync round: the stages after training, with deadlines.

A round under ``--secagg`` trains as usual; then, instead of uploading a delta,
each sampled client runs the four SecAgg+ stages of
:mod:`fedlearn.privacy.secagg` through the server:

0. **advertise** its two public keys (this ends its training: the stage
   closes when every sampled client advertised, or at the round deadline);
1. **share keys**: fetch everyone's public keys, send its encrypted shares;
2. **masked input**: fetch the shares addressed to it, upload its masked vector;
3. **unmask**: fetch who survived and who dropped, reveal the shares asked for.

Each later stage closes when every client still in the round has answered,
or ``stage_timeout`` seconds after it opened; it goes on with whoever answered
if they are at least the threshold, and otherwise the round is aborted
(:class:`~fedlearn.errors.SecAggAbortedError`) before anything is revealed.
A client that uploaded its masked vector and then vanished is still in the
sum: the survivors' shares of its self-mask seed remove its mask.

The server holds public keys, ciphertexts, masked vectors and, at the end,
the unmasked *sum*, which :mod:`fedlearn.privacy.secagg_update` turns into
FedAvg's running sum for the strategy (:meth:`SecAggRound.finish`). Under
DP-FedAvg every client clips its own delta to the round's clip norm (sent in
its ``secagg`` block as ``dp_clip``) and weighs it 1, so the sum is the sum of
clipped deltas the private mean adds its noise to (after unmasking, on the
server: the server sees the exact sum, never one update).

Not thread-safe: the coordinator calls everything but :meth:`SecAggRound.finish`
under its lock; ``finish`` runs outside it once the last stage has closed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, ConflictError, PayloadError, SecAggAbortedError
from fedlearn.privacy.secagg import SecAggParams
from fedlearn.privacy.secagg_crypto import agree
from fedlearn.privacy.secagg_messages import (
    KeyAdvert,
    MaskedInput,
    ShareBundle,
    ShareInbox,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlearn.privacy.secagg_server import SecAggServer
from fedlearn.privacy.secagg_update import UpdateLayout, check_sum, clip_range, decode_sum
from fedlearn.rounds import RoundFailed, RoundUpdates
from fedlearn.seeding import rng_for
from fedlearn.strategies import ClippedSum, Strategy
from fedlearn.types import Weights
from fedlearn.weights import RunningSum, spec_of

#: The most examples a client may declare (as for updates, see server/wire.py).
MAX_EXAMPLES = 10**12
#: Default ``--secagg-bits``: every level of a client's integer is exact in float64.
DEFAULT_BITS = 48
#: Default ``--secagg-timeout`` (seconds each stage after training waits).
DEFAULT_STAGE_TIMEOUT = 30.0
#: What a client sends at each stage (``POST /api/secagg/<name>``), by stage number.
POSTS = {"advert": 0, "shares": 1, "masked": 2, "unmask": 3}
#: What a client fetches before each stage (``GET /api/secagg/<name>``), by stage number.
FETCHES = {"keys": 1, "inbox": 2, "unmask": 3}
#: A fixed X25519 scalar to test advertised keys with (the result is thrown away).
_PROBE = bytes(range(32))
STAGE_NAMES = ("advertise", "share keys", "masked input", "unmask", "sum", "closed")


@dataclass(frozen=True)
class SecAggSettings:
    """The ``--secagg-*`` settings of a run (None: the default)."""

    threshold: int | None = None
    bits: int = DEFAULT_BITS
    neighbours: int | None = None
    stage_timeout: float = DEFAULT_STAGE_TIMEOUT

    @classmethod
    def of(cls, config: Any) -> SecAggSettings | None:
        """The settings of a :class:`~fedlearn.config.ServerConfig` (None without --secagg)."""
        if not config.secagg:
            return None
        return cls(config.secagg_threshold,
                   DEFAULT_BITS if config.secagg_bits is None else config.secagg_bits,
                   config.secagg_neighbours,
                   DEFAULT_STAGE_TIMEOUT if config.secagg_timeout is None
                   else config.secagg_timeout)

    @property
    def min_clients(self) -> int:
        """The fewest clients a round needs: the threshold (at least 2)."""
        return max(2, self.threshold or 2)

    def threshold_for(self, sample: int) -> int:
        """t for a round of ``sample`` clients: ``--secagg-threshold``, else a majority of
        each client's share holders (all the sample, or its k neighbours and itself)."""
        if self.threshold is not None:
            return self.threshold
        holders = sample if self.neighbours is None else min(sample, self.neighbours + 1)
        return max(2, holders // 2 + 1)


class SecAggPlan:
    """A run's secure aggregation: its settings, the update's layout and range.

    Raises :class:`ConfigError` for a strategy that needs every client's
    update (robust rules, norm bounding, SCAFFOLD; DP-FedAvg takes the sum of
    client-clipped deltas instead) or a run with no norm bound.
    """

    def __init__(self, settings: SecAggSettings, strategy: Strategy, initial: Weights,
                 norm_limit: float | None, seed: int) -> None:
        if strategy.needs_all and strategy.dp is None:
            raise ConfigError(f"--secagg lets the server see only the sum of the updates, but "
                              f"strategy {strategy.name!r} needs every client's own update; "
                              "use fedavg, fedavgm, fedadam, fedyogi, fedadagrad or fedprox.")
        if norm_limit is None:
            raise ConfigError("--secagg needs a norm bound to size its quantisation range; "
                              "give --max-update-norm a positive value or leave its default.")
        self.settings = settings
        self.strategy = strategy
        self.layout = UpdateLayout.of(spec_of(initial))
        self.dtypes = {k: v.dtype for k, v in initial.items()}
        self.norm_limit = float(norm_limit)
        self.clip_range = clip_range(norm_limit)
        self.seed = seed

    def open(self, number: int, attempt: int, sampled: frozenset[str],
             dp_clip: float | None = None) -> SecAggRound:
        """The secure aggregation of one attempt at round ``number`` among ``sampled``;
        ``dp_clip`` is DP-FedAvg's clip norm for the round (None without DP)."""
        k = len(sampled)
        graph_seed = int(rng_for("secagg-graph", self.seed, number, attempt).integers(2**62))
        params = SecAggParams(threshold=self.settings.threshold_for(k), clip_range=self.clip_range,
                              max_clients=k, bits=self.settings.bits,
                              neighbours=self.settings.neighbours, graph_seed=graph_seed)
        return SecAggRound(self, params, sampled, dp_clip)


class SecAggRound:
    """One round attempt's stages (see the module doc); ``stage`` 0 to 3, then 4 (sum)."""

    def __init__(self, plan: SecAggPlan, params: SecAggParams, sampled: frozenset[str],
                 dp_clip: float | None = None) -> None:
        self.plan = plan
        self.params = params
        self.dp_clip = dp_clip
        self.examples: dict[str, int] = {}  # declared with the keys
        self.example_scale = 1.0  # E: the largest count declared, fixed when keys go out
        self.server = SecAggServer(params, plan.layout.dimension)
        self.index: dict[str, int] = {}
        for cid in sorted(sampled):
            self.index_of(cid)
        self.stage = 0
        self.deadline = math.inf  # of the open stage after training
        self.members: list[set[str]] = [set(), set(), set(), set()]  # who finished stage s
        self._seen: dict[tuple[int, str], bytes] = {}  # digests, so a retried post is accepted
        self._keys: list[dict[str, Any]] = []
        self._inboxes: dict[str, ShareInbox] = {}
        self._request: UnmaskRequest | None = None
        self._training_closed = 0.0
        self._keys_seen: set[bytes] = set()

    # -- what clients get and send ---------------------------------------------------
    def index_of(self, client_id: str) -> int:
        """The client's index in this round (a replacement client gets the next free one)."""
        if client_id not in self.index:
            self.index[client_id] = len(self.index)
        return self.index[client_id]

    def block(self, client_id: str, seconds_left: float) -> dict[str, Any]:
        """The ``secagg`` object of the client's train task: everything it needs to mask."""
        p = self.params
        return {"index": self.index_of(client_id), "threshold": p.threshold, "bits": p.bits,
                "range": p.clip_range, "max_clients": p.max_clients, "neighbours": p.neighbours,
                "graph_seed": p.graph_seed, "max_update_norm": self.plan.norm_limit,
                "dimension": self.plan.layout.dimension,
                "stage_timeout": self.plan.settings.stage_timeout,
                "seconds_left": max(0.0, seconds_left), "dp_clip": self.dp_clip}

    @property
    def training_open(self) -> bool:
        """True while clients may still train and advertise their keys."""
        return self.stage == 0

    def receive(self, client_id: str, name: str, body: bytes,
                num_examples: int | None = None) -> None:
        """A client's message for stage ``POSTS[name]``: JSON, or for ``masked`` the vector
        as little-endian uint64 bytes; ``advert`` declares the client's ``num_examples``.

        A repeat of a message already taken is accepted again and changes nothing;
        ConflictError when the stage is closed or the client is not in it,
        PayloadError for a malformed message.
        """
        stage = POSTS[name]
        digest = hashlib.sha256(body + f"/{num_examples}".encode()).digest()
        seen = self._seen.get((stage, client_id))
        if seen is not None:
            if seen == digest:
                return
            raise ConflictError(f"client {client_id} already sent its {STAGE_NAMES[stage]} "
                                "message for this round.")
        if self.stage != stage:
            raise ConflictError(f"the {STAGE_NAMES[stage]} stage of this round's secure "
                                f"aggregation is {'closed' if self.stage > stage else 'not open'}"
                                "; fetch a new task.")
        if stage > 0 and client_id not in self.members[stage - 1]:
            raise ConflictError(f"client {client_id} left this round's secure aggregation "
                                f"before the {STAGE_NAMES[stage]} stage; fetch a new task.")
        index = self.index_of(client_id)
        if stage == 0 and not (isinstance(num_examples, int) and 1 <= num_examples <= MAX_EXAMPLES):
            raise PayloadError(f"the keys must come with num_examples from 1 to {MAX_EXAMPLES}.")
        message: KeyAdvert | ShareBundle | MaskedInput | UnmaskResponse
        if stage == 0:
            message = KeyAdvert.from_json(_json(body))
        elif stage == 1:
            message = ShareBundle.from_json(_json(body))
        elif stage == 2:
            message = MaskedInput(index, body)
        else:
            message = UnmaskResponse.from_json(_json(body))
        if message.client_id != index:
            raise PayloadError(f"the message names client index {message.client_id}, but "
                               f"this client is {index} in this round.")
        if isinstance(message, KeyAdvert):
            self._check_keys(message)
        if isinstance(message, KeyAdvert):
            self.server.receive_advert(message)
        elif isinstance(message, ShareBundle):
            self.server.receive_shares(message)
        elif isinstance(message, MaskedInput):
            self.server.receive_masked(message)
        else:
            self.server.receive_unmask(message)
        self.members[stage].add(client_id)
        self._seen[(stage, client_id)] = digest
        if stage == 0 and num_examples is not None:
            self.examples[client_id] = num_examples

    def _check_keys(self, advert: KeyAdvert) -> None:
        """Refuse keys another client already uses, or that are not usable X25519 keys
        (the wrong length, or a low-order point): either would make every other client
        refuse the key list, and the round would abort."""
        if advert.cipher_key == advert.mask_key or self._keys_seen & {advert.cipher_key,
                                                                    advert.mask_key}:
            raise PayloadError("the advertised public keys repeat keys already in this round; "
                               "make fresh keys.")
        for key in (advert.cipher_key, advert.mask_key):
            agree(_PROBE, key, b"fedlearn secagg key check")  # PayloadError if unusable
        self._keys_seen |= {advert.cipher_key, advert.mask_key}

    def fetch(self, client_id: str, name: str) -> dict[str, Any] | None:
        """What the client needs before stage ``FETCHES[name]`` as JSON, or None until that
        stage opens; ConflictError when the client is no longer in the round."""
        stage = FETCHES[name]
        if client_id not in self.members[stage - 1]:
            raise ConflictError(f"client {client_id} is not in this round's secure aggregation "
                                f"for the {STAGE_NAMES[stage]} stage; fetch a new task.")
        if self.stage < stage:
            return None
        if stage == 1:
            return {"keys": self._keys, "example_scale": self.example_scale}
        if stage == 2:
            return {"inbox": self._inboxes[client_id].to_json()}
        if self._request is None:  # pragma: no cover - set when stage 3 opens
            raise ConflictError("the unmask stage has no request yet.")
        return {"request": self._request.to_json()}

    def stage_complete(self) -> bool:
        """True when every client still in the round has answered the open stage (1 to 3)."""
        s = self.stage
        return 1 <= s <= 3 and self.members[s - 1] <= self.members[s]

    # -- the driver ----------------------------------------------------------------
    def close_training(self, now: float) -> None:
        """Close stage 0: publish the keys; SecAggAbortedError below the threshold."""
        self._training_closed = now
        self._keys = [a.to_json() for a in self.server.public_keys()]
        self.example_scale = float(max(self.examples.values()))
        self._open(1, now)

    def advance(self, now: float) -> str:
        """Close the open stage (1 to 3) when it is due: ``wait``, ``moved`` or ``sum``
        (the last stage closed: call :meth:`finish`). SecAggAbortedError below the threshold."""
        if self.stage >= 4:  # its sum was taken, and closing the round with it failed
            raise SecAggAbortedError("the round could not be closed with its sum; it runs "
                                     "again with fresh keys.")
        if self.stage < 1:
            return "wait"
        if not self.stage_complete() and now < self.deadline:
            return "wait"
        if self.stage == 1:
            for cid in sorted(self.members[1]):
                self._inboxes[cid] = self.server.inbox(self.index[cid])
            self._open(2, now)
            return "moved"
        if self.stage == 2:
            self._request = self.server.unmask_request()
            self._open(3, now)
            return "moved"
        self.stage = 4
        return "sum"

    def _open(self, stage: int, now: float) -> None:
        self.stage = stage
        self.deadline = now + self.plan.settings.stage_timeout

    def missing(self) -> set[str]:
        """Clients that advertised keys but did not answer every stage that opened."""
        last = min(self.stage, 4) - 1
        return self.members[0] - self.members[last] if last > 0 else set()

    def finish(self, clock: Callable[[], float]) -> tuple[RoundUpdates, dict[str, Any]]:
        """After the last stage: the unmasked sum as the round's updates for the strategy,
        and the record's fields. SecAggAbortedError when too few shares came back,
        :class:`~fedlearn.rounds.RoundFailed` when the sum breaks the bounds every honest
        client keeps (:func:`~fedlearn.privacy.secagg_update.check_sum`)."""
        if self.stage != 4:
            raise ConflictError("secure aggregation has not reached its sum.")
        self.stage = 5
        started = time.perf_counter()
        total, count = self.server.result()
        unmask_seconds = time.perf_counter() - started
        plan = self.plan
        summed = decode_sum(plan.layout, total, count)
        dp = self.dp_clip is not None
        bound = plan.norm_limit if self.dp_clip is None else min(plan.norm_limit, self.dp_clip)
        problem = check_sum(summed, plan.dtypes, norm_limit=bound,
                            tolerance=1.0 / self.params.scale, equal_weight=dp)
        if problem is not None:
            raise RoundFailed(f"the unmasked sum is out of bounds ({problem})")
        updates = RoundUpdates(plan.strategy)
        if dp:  # DP-FedAvg: the sum of client-clipped deltas, for the private mean
            sums = {k: v if np.dtype(plan.dtypes[k]).kind == "f" else np.rint(v).astype(np.int64)
                    for k, v in summed.sums.items()}
            updates.clipped = ClippedSum(sums, count, round(summed.unclipped))
        else:  # a streaming strategy: its running sum
            updates.total = RunningSum.of_sum(summed.sums, summed.weight, count, plan.dtypes)
        record = {
            "clients": count,
            "examples": summed.examples(self.example_scale),
            "train_loss": summed.train_loss(),
            "secagg_dropped": len(self.members[1] - self.members[2]),
            "secagg_recovered": len(self.members[2] - self.members[3]),
            "secagg_seconds": round(clock() - self._training_closed, 4),
            "secagg_unmask_seconds": round(unmask_seconds, 4),
        }
        return updates, record

    def describe(self) -> dict[str, Any]:
        """A status snapshot: the stage and how many clients finished each one."""
        return {"stage": STAGE_NAMES[min(self.stage, 5)], "threshold": self.params.threshold,
                "advertised": len(self.members[0]), "shared": len(self.members[1]),
                "uploaded": len(self.members[2]), "answered": len(self.members[3])}


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PayloadError("a secure aggregation message must be JSON; see "
                           "docs/protocol.md.") from exc
