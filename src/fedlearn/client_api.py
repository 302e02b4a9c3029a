"""The client API: a few added lines turn an existing training script into a client.

In the spirit of NVIDIA FLARE's Client API::

    import fedlearn.client_api as flc

    info = flc.init()                      # which client this is, where its data is
    while flc.is_running():
        model = flc.receive()              # global weights (numpy) + the round's config
        if model is None:
            break
        if model.kind == "evaluate":
            flc.send(metrics={"accuracy": acc, "loss": loss}, num_examples=n_test)
            continue
        ... train as before, starting from model.weights, with model.config["lr"] ...
        flc.send(weights=new_weights, num_examples=n_train, metrics={"train_loss": loss})

Weights are ``dict[str, numpy.ndarray]`` keyed like the task's state, so the
script may use torch, scikit-learn or plain numpy. A task names the script
(``Task(name=..., init=..., script="train.py")``); ``fedlearn client``,
``fedlearn run`` and ``fedlearn sim`` then run it, each client in its own
thread, instead of the built-in training loop. Running the script by itself
(``python train.py``) is an error that says so.
"""

from __future__ import annotations

import queue
import runpy
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.types import Weights

#: Seconds a script may take for one task before the client gives up on it.
TASK_TIMEOUT = 24 * 3600.0


@dataclass(frozen=True)
class ClientInfo:
    """Who this client is: id, index among ``num_clients`` (when known), ``--data`` path."""

    client_id: str
    client_index: int | None = None
    num_clients: int | None = None
    data_path: str | None = None
    label: str | None = None
    seed: int = 0
    test_fraction: float = 0.0


@dataclass(frozen=True)
class FLModel:
    """What :func:`receive` returns: global ``weights`` and what to do with them.

    ``kind`` is ``"train"`` (train from ``weights`` with ``config``; ``seed``
    fixes the data order) or ``"evaluate"`` (measure ``weights`` on local test data).
    """

    weights: Weights
    kind: str = "train"
    config: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    version: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    """What a script sent back for one task."""

    weights: Weights | None
    delta: Weights | None
    num_examples: int
    metrics: dict[str, float]


_STOP = object()
_local = threading.local()


class Channel:
    """The two queues between a client loop and its script's thread."""

    def __init__(self, info: ClientInfo) -> None:
        self.info = info
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.outbox: queue.Queue[Reply] = queue.Queue()
        self.running = True
        self.current: FLModel | None = None


def _channel() -> Channel:
    channel = getattr(_local, "channel", None)
    if channel is None:
        raise ConfigError("this script uses fedlearn.client_api but was not started by fedlearn; "
                          "run it as a task's script with `fedlearn client --task ...`, "
                          "`fedlearn run --task ...` or `fedlearn sim --task ...`.")
    return channel  # type: ignore[no-any-return]


def init() -> ClientInfo:
    """Attach to the client that runs this script; who this client is and where its data is."""
    return _channel().info


def info() -> ClientInfo:
    """The same as :func:`init`."""
    return _channel().info


def is_running() -> bool:
    """True until the server says the run is over."""
    return _channel().running


def receive(timeout: float | None = None) -> FLModel | None:
    """The next task's global weights and config; None when the run is over."""
    channel = _channel()
    try:
        item = channel.inbox.get(timeout=timeout)
    except queue.Empty:
        return None
    if item is _STOP:
        channel.running = False
        return None
    channel.current = item
    return item  # type: ignore[no-any-return]


def send(
    weights: Weights | None = None, *, delta: Weights | None = None, num_examples: int,
    metrics: dict[str, float] | None = None,
) -> None:
    """Answer the task :func:`receive` gave: new ``weights`` (or their ``delta``) for a
    train task, just ``metrics`` for an evaluate task, with the examples behind them."""
    channel = _channel()
    if channel.current is None:
        raise ConfigError("send() was called before receive() gave a task; call receive() "
                          "first.")
    if channel.current.kind == "train" and (weights is None) == (delta is None):
        raise ConfigError("a train task is answered with exactly one of weights= or delta=.")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or (
            num_examples < 0):
        raise ConfigError(f"num_examples must be a non-negative integer, got {num_examples!r}.")
    clean = {str(k): float(v) for k, v in (metrics or {}).items()}
    channel.current = None
    channel.outbox.put(Reply(_arrays(weights), _arrays(delta), int(num_examples), clean))


def _arrays(w: Weights | None) -> Weights | None:
    if w is None:
        return None
    return {str(k): np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in w.items()}


class ScriptRunner:
    """Runs one client's script in a thread and hands it tasks one at a time."""

    def __init__(self, script: str | Path, info: ClientInfo) -> None:
        path = Path(script)
        if not path.is_file():
            raise ConfigError(f"the task's script {path} does not exist; check Task(script=...).")
        self.path = path
        self.channel = Channel(info)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"script-{info.client_id}",
                                       daemon=True)
        self.thread.start()

    def _main(self) -> None:
        _local.channel = self.channel
        folder = str(self.path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            runpy.run_path(str(self.path), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                self.error = exc
        except BaseException as exc:  # reported to the client loop
            self.error = exc
        finally:
            self.channel.running = False

    def ask(self, model: FLModel) -> Reply:
        """Give the script one task and wait for its answer."""
        if not self.thread.is_alive():
            raise self._ended()
        self.channel.inbox.put(model)
        while True:
            try:
                return self.channel.outbox.get(timeout=0.2)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise self._ended() from None

    def _ended(self) -> FedlearnError:
        if self.error is not None:
            if isinstance(self.error, FedlearnError):
                return self.error
            return ConfigError(f"the client script {self.path} raised "
                               f"{type(self.error).__name__}: {self.error}.")
        return ConfigError(f"the client script {self.path} ended before the run was over; keep "
                           "calling receive() until it returns None.")

    def stop(self, timeout: float = 30.0) -> None:
        """Tell the script the run is over and wait for it to finish."""
        self.channel.running = False
        self.channel.inbox.put(_STOP)
        self.thread.join(timeout)
