"""A client's own SCAFFOLD control variate ``c_i``, kept on its disk between rounds.

The file sits next to the client's identity file (``<identity>.scaffold.safetensors``,
mode 0600, written atomically), so a restarted client keeps its ``c_i``. It
holds the ``c_i`` the client made in each of its last :data:`KEEP` trainings,
keyed by the model version each trained from (entries ``v<VERSION>/<NAME>``,
the run id in the header). Training from version ``v`` starts from the newest
``c_i`` made from a version before ``v`` (zeros when there is none): a round
the server runs again after a crash (resumed from an older checkpoint) starts
from the same ``c_i`` as the first time, so the resumed run reaches the model
an uninterrupted one would. Without a file (no identity file) it is kept in
memory only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedlearn.errors import FedlearnError
from fedlearn.fsutil import atomic_write_bytes
from fedlearn.types import Weights
from fedlearn.weights import decode, encode, read_metadata

log = logging.getLogger("fedlearn.client")

#: Trainings whose ``c_i`` are kept (a server resumes at most a few rounds back).
KEEP = 16
FORMAT = "1"


def control_path(identity_file: str | None) -> Path | None:
    """Where the client whose identity is in ``identity_file`` keeps its ``c_i``."""
    if identity_file is None:
        return None
    path = Path(identity_file)
    return path.with_name(path.stem + ".scaffold.safetensors")


class ControlStore:
    """The ``c_i`` of one client in one run (``run_id``), by the version trained from."""

    def __init__(self, path: Path | None, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self.entries: dict[int, Weights] = self._read()

    def _read(self) -> dict[int, Weights]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
            meta = read_metadata(data)
            arrays = decode(data, max_bytes=1 << 40)
        except (OSError, FedlearnError) as exc:
            log.warning("ignoring the unreadable control variate file %s (%s)", self.path, exc)
            return {}
        if meta.get("run_id") != self.run_id or meta.get("format") != FORMAT:
            return {}  # another run's: this run starts from zeros
        entries: dict[int, Weights] = {}
        for key, value in arrays.items():
            head, _, name = key.partition("/")
            if head[:1] == "v" and head[1:].isdigit() and name:
                entries.setdefault(int(head[1:]), {})[name] = value
        return entries

    def _write(self) -> None:
        if self.path is None:
            return
        arrays = {f"v{version}/{name}": value for version, control in self.entries.items()
                  for name, value in control.items()}
        atomic_write_bytes(self.path, encode(arrays, {"run_id": self.run_id,
                                                      "format": FORMAT}))

    def for_version(self, version: int, like: Weights) -> Weights:
        """The ``c_i`` to train from model ``version`` with (shaped like the server's ``like``)."""
        older = [v for v in self.entries if v < version]
        if older:
            found = self.entries[max(older)]
            if found.keys() == like.keys() and all(
                    np.shape(found[k]) == np.shape(v) and found[k].dtype == v.dtype
                    for k, v in like.items()):
                return found
            log.warning("the kept control variate does not fit the model; starting from zeros")
        return {k: np.zeros_like(v) for k, v in like.items()}

    def keep(self, version: int, control: Weights) -> None:
        """Keep the ``c_i`` made by training from ``version`` (newest :data:`KEEP` only)."""
        self.entries[version] = control
        for old in sorted(self.entries)[:-KEEP]:
            del self.entries[old]
        self._write()

    def forget(self, version: int) -> None:
        """Drop the ``c_i`` made from ``version`` (its update was refused)."""
        if self.entries.pop(version, None) is not None:
            self._write()
