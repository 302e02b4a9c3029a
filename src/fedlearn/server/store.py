"""SQLite records of a run (clients, rounds, metrics) and atomic model checkpoints.

The database commit is the commit point of a round: the checkpoint file for
version V is written (write, fsync, rename) *before* the transaction that says
"checkpoint V" commits, so after a crash the recorded checkpoint always exists.
The two newest checkpoint files are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlearn.errors import FedlearnError, RunStateError
from fedlearn.fsutil import atomic_write_bytes
from fedlearn.types import Weights
from fedlearn.weights import decode, encode, read_metadata, unusable

log = logging.getLogger("fedlearn.server")

DB_NAME = "run.sqlite"
CHECKPOINTS = "checkpoints"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    credential_hash TEXT NOT NULL,
    num_examples INTEGER,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    accuracy REAL, loss REAL, seconds REAL,
    clients INTEGER, examples INTEGER, attempts INTEGER,
    record TEXT NOT NULL,
    finished_at REAL NOT NULL
);
"""


def hash_secret(secret: str) -> str:
    """SHA-256 of a token or credential; only hashes are stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ClientRow:
    """A registered client as stored."""

    client_id: str
    credential_hash: str
    num_examples: int | None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as read back: its key (round or update count), its arrays and the
    text metadata of its header."""

    key: int
    arrays: Weights
    metadata: dict[str, str] = field(default_factory=dict)


class Store:
    """One run's SQLite database and checkpoint folder (thread-safe)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINTS
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.run_dir / DB_NAME, check_same_thread=False, isolation_level=None
            )
            os.chmod(self.run_dir / DB_NAME, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise RunStateError(f"cannot open the run database in {self.run_dir}: {exc}.") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # -- meta -----------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        """Store one JSON value under ``key``."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value under ``key``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # -- clients --------------------------------------------------------------
    def upsert_client(self, client_id: str, credential_hash: str, num_examples: int | None) -> None:
        """Record a (re-)registration."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?)",
                (client_id, credential_hash, num_examples, time.time()),
            )

    def clients(self) -> list[ClientRow]:
        """Every registered client."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, credential_hash, num_examples FROM clients ORDER BY client_id"
            ).fetchall()
        return [ClientRow(*r) for r in rows]

    # -- rounds and checkpoints -----------------------------------------------
    def commit_round(
        self,
        record: dict[str, Any] | None,
        weights: Weights | None,
        extra_meta: dict[str, Any],
        *,
        key: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Record one finished round; with ``weights``, checkpoint them first.

        ``record`` needs ``round`` unless ``key`` is given: the number the record
        and the checkpoint are filed under (an async run files them by update
        count, and may checkpoint without a record: ``record`` None).
        ``extra_meta`` is stored in the same transaction (counters);
        ``metadata`` goes into the checkpoint file's header (a sync run's
        strategy state, whose arrays are ``weights``).
        """
        if key is None:
            if record is None:
                raise ValueError("commit_round needs a record with 'round' or a key")
            key = int(record["round"])
        version = int(key)
        checksums: dict[str, str] = {}
        if weights is not None:
            bad = unusable(weights)
            if bad is not None:
                raise RunStateError(f"refusing to checkpoint version {version}: {bad}.")
            data = encode(weights, metadata)
            atomic_write_bytes(self._checkpoint_path(version), data)
            kept = self.get_meta("checksums", {}) or {}
            newest = sorted(kept, key=int)[-1:]
            checksums = {k: kept[k] for k in newest if int(k) != version}
            checksums[str(version)] = hashlib.sha256(data).hexdigest()
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if record is not None:
                    cur.execute(
                        "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            version, record.get("accuracy"), record.get("loss"),
                            record.get("seconds"), record.get("clients"),
                            record.get("examples"), record.get("attempts"),
                            json.dumps(record), time.time(),
                        ),
                    )
                if weights is not None:
                    cur.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('checkpoint', ?)",
                        (json.dumps(version),),
                    )
                    cur.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('checksums', ?)",
                        (json.dumps(checksums),),
                    )
                for name, value in extra_meta.items():
                    cur.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value))
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        if weights is not None:
            self._prune_checkpoints(keep_from=version)

    def update_round(self, record: dict[str, Any], key: int | None = None) -> None:
        """Replace the stored record filed under ``key`` (default ``record["round"]``)."""
        with self._lock:
            self._db.execute(
                "UPDATE rounds SET record = ?, accuracy = ?, loss = ? WHERE round = ?",
                (json.dumps(record), record.get("accuracy"), record.get("loss"),
                 int(record["round"] if key is None else key)),
            )

    def rounds(self) -> list[dict[str, Any]]:
        """Every recorded round's (or async update's) metrics record, in order of key."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM rounds ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows]

    def truncate_rounds(self, after: int) -> int:
        """Forget records filed after key ``after`` (redone on resume); returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM rounds WHERE round > ?", (after,))
            return int(cur.rowcount)

    def latest_checkpoint(self) -> tuple[int, Weights] | None:
        """(key, arrays) of the newest good checkpoint, or None before the first
        (see :meth:`load_checkpoint`)."""
        found = self.load_checkpoint()
        return None if found is None else (found.key, found.arrays)

    def load_checkpoint(self) -> Checkpoint | None:
        """The newest good checkpoint, or None before the first.

        The key is the round for a sync run and the update count for an async one.
        Each checkpoint's SHA-256 is in the database: a damaged (truncated,
        bit-flipped) or missing file is named in the log and the older one kept
        beside it is used; when none is good the run cannot be resumed.
        """
        version = self.get_meta("checkpoint")
        if version is None:
            return None
        sums = self.get_meta("checksums", {}) or {}
        candidates = sorted({int(version), *(int(k) for k in sums)}, reverse=True)
        problems = []
        for v in candidates:
            if v > int(version):
                continue
            path = self._checkpoint_path(v)
            try:
                data = path.read_bytes()
            except OSError as exc:
                problems.append(f"{path} cannot be read ({exc.strerror})")
                continue
            want = sums.get(str(v))
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                problems.append(f"{path} is damaged (its checksum does not match)")
                continue
            try:
                weights = decode(data, max_bytes=1 << 40)
                metadata = read_metadata(data)
            except FedlearnError as exc:
                problems.append(f"{path} is damaged ({exc})")
                continue
            for problem in problems:
                log.warning("%s; resuming from the older checkpoint %s", problem, path.name)
            return Checkpoint(v, weights, metadata)
        raise RunStateError(f"no usable checkpoint: {'; '.join(problems)}; the run directory "
                            "is damaged and cannot be resumed.")

    def remove_leftovers(self) -> int:
        """Delete temporary files of interrupted writes; how many were removed."""
        count = 0
        for folder in (self.run_dir, self.checkpoint_dir):
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)
                count += 1
        return count

    def _checkpoint_path(self, version: int) -> Path:
        return self.checkpoint_dir / f"global-{version:06d}.safetensors"

    def _prune_checkpoints(self, keep_from: int) -> None:
        files = sorted(self.checkpoint_dir.glob("global-*.safetensors"))
        for path in files[:-2]:
            path.unlink(missing_ok=True)
