"""The run directory every training command writes.

``config.toml`` (what ran, resolved), ``metrics.jsonl`` (one JSON object per
epoch, round or async update), ``summary.json``, ``model.safetensors`` and
``report.png``. Writes of the model and summary are atomic.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedlearn.errors import RunStateError
from fedlearn.fsutil import atomic_write_bytes, atomic_write_text
from fedlearn.types import Weights
from fedlearn.weights import decode, encode

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
REPORT = "report.png"
ATTACKERS = "attackers.json"


def default_run_dir(command: str, root: Path = Path("runs")) -> Path:
    """``runs/<command>-<timestamp>`` (made unique if two runs start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{command}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{command}-{stamp}-{n}"
    return path


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, config: Mapping[str, Any]) -> RunDir:
        """Make a new run directory and write ``config.toml``; refuse to overwrite a run."""
        path = Path(path)
        if (path / METRICS).exists() or (path / SUMMARY).exists():
            raise RunStateError(
                f"{path} already holds a run; choose another --out, or --resume it."
            )
        if path.exists() and not path.is_dir():
            raise RunStateError(f"{path} is a file, not a folder; choose another --out.")
        try:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path)
            run.write_config(config)
        except OSError as exc:
            raise RunStateError(f"cannot write the run directory {path} ({exc.strerror}); "
                                "choose another --out or fix its permissions.") from exc
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory (it must hold ``config.toml``)."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise RunStateError(
                f"{path} is not a run directory (no {CONFIG}); pass the --out of an earlier run."
            )
        return cls(path)

    def discard_if_empty(self) -> None:
        """Remove a run directory that holds only its config (a run that failed to start)."""
        import shutil

        names = {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()
        if names <= {CONFIG, METRICS, ATTACKERS} and not self.read_metrics():
            shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.toml`` (None values are left out: TOML has no null)."""
        atomic_write_text(self.path / CONFIG, tomli_w.dumps(_drop_none(config)))

    def read_config(self) -> dict[str, Any]:
        """The resolved configuration this run started with."""
        import tomllib

        with (self.path / CONFIG).open("rb") as fh:
            return tomllib.load(fh)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        line = json.dumps(_jsonable(record), sort_keys=False)
        with (self.path / METRICS).open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (a torn last line is skipped)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def rewrite_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically (used when resuming to drop torn rows)."""
        text = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
        atomic_write_text(self.path / METRICS, text)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        atomic_write_text(self.path / SUMMARY, json.dumps(_jsonable(summary), indent=2) + "\n")

    def write_attackers(self, record: Mapping[str, Any]) -> None:
        """Write ``attackers.json``: which clients attack and how (robustness runs)."""
        atomic_write_text(self.path / ATTACKERS, json.dumps(_jsonable(record), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """The summary of a finished run."""
        return dict(json.loads((self.path / SUMMARY).read_text(encoding="utf-8")))

    def save_model(self, weights: Weights, name: str = MODEL) -> Path:
        """Write weights as safetensors, atomically."""
        path = self.path / name
        atomic_write_bytes(path, encode(weights))
        return path

    def write_report(self, title: str) -> Path:
        """Draw ``report.png`` from ``metrics.jsonl``."""
        from fedlearn.report import plot_metrics

        path = self.path / REPORT
        plot_metrics(self.read_metrics(), path, title=title)
        return path


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``final_<metric>`` of the last record for every metric it has (server and federated)."""
    last = history[-1] if history else {}
    skip = {"round", "update", "version", "seconds", "clients", "sampled", "examples",
            "attempts", "staleness", "mean_staleness", "buffered", "fed_clients",
            "fed_examples", "train_seconds", "virtual_time", "round_virtual_seconds",
            "dropped", "refused", "staleness_mean", "staleness_max", "distinct_clients"}
    out = {f"final_{k}": v for k, v in last.items()
           if k not in skip and not k.startswith("secagg_")}
    out.setdefault("final_accuracy", last.get("accuracy"))
    out.setdefault("final_loss", last.get("loss"))
    return out


def load_model_file(path: Path) -> Weights:
    """Read a ``model.safetensors`` file, with a clear error when it is missing or bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RunStateError(f"cannot read model file {path}: {exc.strerror}.") from exc
    return decode(data, max_bytes=1 << 34)


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value
