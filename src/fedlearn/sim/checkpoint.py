"""Checkpoints of a simulated run, so ``fedlearn sim --resume RUN_DIR`` continues it.

Sampling, data orders, attackers and client seeds are pure functions of
(run seed, round, client id) (:mod:`fedlearn.seeding`); there is no random
generator whose position would need saving. What a resumed run needs is what
the rounds so far changed:

- the strategy's state: the global model, its version, optimizer moments and
  server control variates, in the flat form of
  :func:`~fedlearn.strategies.state_to_arrays`;
- each virtual client's own SCAFFOLD control variate (``sim-control/<id>/...``);
- with ``--dp-sgd``, each client's privacy ledger and the largest ε so far;
- with DP-FedAvg, how many rounds its accountant has released.

``checkpoints/sim-NNNNNN.safetensors`` holds the arrays for round N;
``checkpoints/sim-state.json`` names the newest and the one before it with
their SHA-256 and the rest as JSON, and is written last: it is the commit
point. A round's checkpoint is written on a background thread while the next
round trains (an fsync costs as much as a small round), one write at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.errors import ConfigError, FedlearnError, RunStateError
from fedlearn.fsutil import atomic_write_bytes, atomic_write_text
from fedlearn.runs import RunDir
from fedlearn.strategies import ServerState, state_from_arrays, state_to_arrays
from fedlearn.types import Weights
from fedlearn.weights import decode, encode

if TYPE_CHECKING:
    from fedlearn.sim.config import SimConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "sim-state.json"
#: Array group of the virtual clients' SCAFFOLD control variates.
CONTROL_GROUP = "sim-control"
#: Layout of ``sim-state.json``.
FORMAT = 1

def _file_name(round_number: int) -> str:
    return f"sim-{round_number:06d}.safetensors"


def _as_server_state(state: Any) -> ServerState:
    """Any strategy state with ``weights`` and ``version`` (and maybe ``arrays``, ``scalars``)."""
    return ServerState(weights=state.weights, version=int(state.version),
                       arrays=dict(getattr(state, "arrays", {}) or {}),
                       scalars=dict(getattr(state, "scalars", {}) or {}))


class Checkpointer:
    """Writes one checkpoint per round into ``run_path/checkpoints``, in the background.

    ``save`` copies the state at once (the caller may go on changing its
    own), then writes it while the caller trains the next round. An error of
    a write is raised by the next ``save`` or by ``close``.
    """

    def __init__(self, run_path: Path, *, seed: int) -> None:
        self.folder = Path(run_path) / CHECKPOINTS
        self.seed = seed
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def save(self, sim: Any, round_number: int) -> None:
        """Checkpoint simulation ``sim`` as it is after round ``round_number``."""
        arrays, meta = snapshot(sim)
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="fedlearn-checkpoint")
        self._pending = self._pool.submit(self._write, arrays, meta, round_number)

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for the last write; raise its error unless ``raise_errors`` is False."""
        try:
            self._wait()
        except BaseException:
            if raise_errors:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, arrays: dict[str, np.ndarray], meta: dict[str, Any],
               round_number: int) -> None:
        data = encode(arrays)
        name = _file_name(round_number)
        try:
            atomic_write_bytes(self.folder / name, data)
            old = _read_pointer(self.folder)
            files = {name: {"sha256": hashlib.sha256(data).hexdigest(), "state": meta}}
            if old is not None and int(old.get("round", round_number)) < round_number:
                prev = _file_name(int(old["round"]))
                if prev in old.get("files", {}):
                    files[prev] = old["files"][prev]
            pointer = {"format": FORMAT, "round": round_number, "seed": self.seed,
                       "files": files}
            atomic_write_text(self.folder / STATE_FILE, json.dumps(pointer, indent=1) + "\n")
        except OSError as exc:
            raise RunStateError(f"cannot write the checkpoint of round {round_number} in "
                                f"{self.folder} ({exc.strerror}); free some disk space or "
                                "fix the folder's permissions.") from exc
        for path in self.folder.glob("sim-*.safetensors"):
            if path.name not in files:
                path.unlink(missing_ok=True)


def snapshot(sim: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and JSON of what ``sim`` (a :class:`~fedlearn.sim.engine.Simulation`)
    changed so far; copies, so the simulation may go on."""
    arrays, state_meta = state_to_arrays(_as_server_state(sim.state))
    controls: dict[str, Any] = dict(getattr(sim, "controls", {}) or {})
    for cid, weights in controls.items():
        for name, value in weights.items():
            arrays[f"{CONTROL_GROUP}/{cid}/{name}"] = np.array(value, copy=True)
    extra: dict[str, Any] = {"dp_sgd_epsilon": float(getattr(sim, "dp_sgd_epsilon", 0.0)),
                             "dp_released": int(getattr(sim, "released", 0))}
    ledgers = getattr(sim.engine, "ledgers", None)
    if ledgers:
        extra["dp_ledgers"] = {cid: {"runs": [list(r) for r in ledger.runs],
                                     "examples": int(ledger.examples)}
                               for cid, ledger in ledgers.items()}
    return arrays, {"strategy": state_meta, "sim": extra}


def _read_pointer(folder: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{folder / STATE_FILE} cannot be read ({exc}); the run cannot "
                            "be resumed.") from exc
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds: the round it follows, the strategy state, the rest."""

    round: int
    state: ServerState
    controls: dict[str, Weights]
    extra: dict[str, Any]


def load_checkpoint(run_path: Path, *, seed: int) -> Checkpoint:
    """The newest good checkpoint in ``run_path``.

    A damaged newest file falls back to the one before it (the previous
    round, redone on resume); RunStateError when there is none, it does not
    match ``seed``, or no file is good.
    """
    folder = Path(run_path) / CHECKPOINTS
    pointer = _read_pointer(folder)
    if pointer is None:
        raise RunStateError(f"{run_path} has no simulator checkpoint (it stopped before its "
                            "first round ended); start the run again instead.")
    if pointer.get("format") != FORMAT or not isinstance(pointer.get("files"), dict):
        raise RunStateError(f"{folder / STATE_FILE} is not a checkpoint this fedlearn can "
                            "read; resume with the version that wrote it.")
    if pointer.get("seed") != seed:
        raise RunStateError(f"the checkpoint in {run_path} is of seed {pointer.get('seed')}, "
                            f"not {seed}; resume with the run's own config.toml.")
    problems = []
    for name, entry in sorted(pointer["files"].items(), reverse=True):
        path = folder / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path} cannot be read ({exc.strerror})")
            continue
        if not isinstance(entry, dict) or hashlib.sha256(data).hexdigest() != entry.get(
                "sha256"):
            problems.append(f"{path} is damaged")
            continue
        try:
            arrays = decode(data, max_bytes=1 << 40)
            controls: dict[str, Weights] = {}
            for flat in [k for k in arrays if k.startswith(CONTROL_GROUP + "/")]:
                cid, _, key = flat[len(CONTROL_GROUP) + 1:].partition("/")
                controls.setdefault(cid, {})[key] = arrays.pop(flat)
            meta = entry.get("state") or {}
            state = state_from_arrays(arrays, meta.get("strategy") or {})
        except (FedlearnError, ValueError, AttributeError) as exc:
            problems.append(f"{path} is damaged ({exc})")
            continue
        return Checkpoint(int(name[len("sim-"):-len(".safetensors")]), state, controls,
                          dict(meta.get("sim") or {}))
    raise RunStateError(f"no usable checkpoint in {folder}: {'; '.join(problems)}.")


def resume_point(run: RunDir, sim: Any) -> tuple[list[dict[str, Any]], int]:
    """Restore ``run``'s checkpoint into simulation ``sim`` (built from the run's config).

    Returns (the metrics records up to the checkpoint, the round to run
    next); rows of rounds after the checkpoint (a round cut short by the
    stop) are dropped from ``metrics.jsonl`` and will be redone.
    """
    for tmp in [*run.path.glob(".*.tmp"), *(run.path / CHECKPOINTS).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)
    saved = load_checkpoint(run.path, seed=sim.config.seed)
    state = sim.state
    want = {k: (v.shape, v.dtype) for k, v in state.weights.items()}
    got = {k: (v.shape, v.dtype) for k, v in saved.state.weights.items()}
    if want != got:
        raise RunStateError(f"the checkpoint in {run.path} does not fit this task's model "
                            "(names, shapes or dtypes differ); resume with the run's own task.")
    values: dict[str, Any] = {"weights": saved.state.weights, "version": saved.state.version}
    names = {f.name for f in dataclasses.fields(state)}
    for extra in ("arrays", "scalars"):
        if extra in names:
            values[extra] = getattr(saved.state, extra)
    sim.state = dataclasses.replace(state, **values)
    if hasattr(sim, "controls"):
        sim.controls = saved.controls
    if hasattr(sim, "dp_sgd_epsilon"):
        sim.dp_sgd_epsilon = float(saved.extra.get("dp_sgd_epsilon", 0.0))
    if hasattr(sim, "released"):  # DP-FedAvg: the rounds its accountant has released
        sim.released = int(saved.extra.get("dp_released", 0))
    ledgers = getattr(sim.engine, "ledgers", None)
    if ledgers is not None and saved.extra.get("dp_ledgers"):
        from fedlearn.privacy.dpsgd import DPLedger

        for cid, entry in saved.extra["dp_ledgers"].items():
            ledgers[cid] = DPLedger([(float(z), float(q), int(n)) for z, q, n in entry["runs"]],
                                    int(entry["examples"]))
    records = run.read_metrics()
    kept = [r for r in records if int(r.get("round", 0)) <= saved.round]
    if len(kept) != len(records):
        run.rewrite_metrics(kept)
    return kept, saved.round + 1


def sim_config_from_record(record: Mapping[str, Any], changes: Mapping[str, Any] | None = None,
                           *, where: str = "config.toml") -> SimConfig:
    """The :class:`SimConfig` a run's ``config.toml`` was written from (``config_record``),
    with ``changes`` (placement fields) on top; an unknown or mistyped key is a ConfigError."""
    from fedlearn.config import TrainConfig, from_mapping
    from fedlearn.sim.config import SimConfig

    sim = record.get("sim")
    if not isinstance(sim, Mapping):
        raise ConfigError(f"{where} has no [sim] table; it is not a `fedlearn sim` run.")
    values = {k: v for k, v in sim.items() if k != "train"}
    values.update(changes or {})
    config = from_mapping(SimConfig, values, where=where)
    train = record.get("train", {})
    if not isinstance(train, Mapping):
        raise ConfigError(f"[train] in {where} must be a table.")
    return dataclasses.replace(config, train=TrainConfig.from_dict(dict(train), where=where))
