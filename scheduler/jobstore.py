"""The durable job queue: SQLite in WAL mode, synchronous=FULL.

A job is committed (and fsynced) before SubmitEditJob replies, so a scheduler restart loses
no accepted job. Only state changes are persisted; fine-grained progress (optimisation steps)
lives in memory (``events.EventBus``) because it is worthless after a restart.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    request_digest TEXT NOT NULL,
    model TEXT NOT NULL,
    base_checkpoint TEXT NOT NULL,
    edits TEXT NOT NULL,
    method TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    checkpoint TEXT NOT NULL DEFAULT '',
    parent_checkpoint TEXT NOT NULL DEFAULT '',
    batch TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL
);
CREATE INDEX IF NOT EXISTS jobs_model_state ON jobs (model, state, seq);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of the queue, decoded."""

    seq: int
    id: str
    request_id: str
    request_digest: str
    model: str
    base_checkpoint: str
    edits: list[dict[str, Any]]
    method: str
    options: dict[str, Any]
    state: str
    stage: str
    message: str
    error: dict[str, Any] | None
    checkpoint: str
    parent_checkpoint: str
    batch: str
    attempts: int
    create_time: float
    start_time: float | None
    end_time: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        d = dict(row)
        d["request_id"] = d["request_id"] or ""
        d["edits"] = json.loads(d["edits"])
        d["options"] = json.loads(d["options"])
        d["error"] = json.loads(d["error"]) if d["error"] else None
        return cls(**d)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobStore:
    """Thread-safe access to the job table (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode}); use a local file system")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[JobRecord]:
        with self._lock:
            return [JobRecord.from_row(r) for r in self._db.execute(sql, args).fetchall()]

    def _write(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def submit(self, *, request_id: str, request_digest: str, model: str, base_checkpoint: str,
               edits: list[dict[str, Any]], method: str, options: dict[str, Any]) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job, or return the job already holding ``request_id``.

        Returns ``(job, created)``. Committed before returning.
        """
        job_id = uuid.uuid4().hex[:16]
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (id, request_id, request_digest, model, base_checkpoint, edits, method, options,"
                " state, stage, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(request_id) DO NOTHING",
                (job_id, request_id or None, request_digest, model, base_checkpoint,
                 json.dumps(edits, ensure_ascii=False), method, json.dumps(options), QUEUED, "QUEUED", time.time()),
            )
            created = cursor.rowcount == 1
            key, value = ("id", job_id) if created else ("request_id", request_id)
            row = self._db.execute(f"SELECT * FROM jobs WHERE {key} = ?", (value,)).fetchone()
        return JobRecord.from_row(row), created

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, model: str = "", limit: int = 50, before_seq: int | None = None) -> list[JobRecord]:
        """Jobs newest first, optionally of one model, older than ``before_seq`` (paging)."""
        where, args = [], []
        if model:
            where.append("model = ?")
            args.append(model)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._query(f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit))

    def queued(self, model: str, limit: int = 1000) -> list[JobRecord]:
        """A model's queued jobs in submission order."""
        return self._query("SELECT * FROM jobs WHERE model = ? AND state = ? ORDER BY seq LIMIT ?", (model, QUEUED, limit))

    def models_with_queued(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT model, MIN(seq) AS first FROM jobs WHERE state = ? GROUP BY model"
                                    " ORDER BY first", (QUEUED,)).fetchall()
        return [r["model"] for r in rows]

    def mark_running(self, job_ids: Sequence[str], batch: str, parent_checkpoint: str) -> None:
        """Dispatch: QUEUED -> RUNNING for every job of a batch, in one transaction."""
        with self._lock, self._transaction():
            for job_id in job_ids:
                self._db.execute(
                    "UPDATE jobs SET state = ?, stage = 'DISPATCHED', batch = ?, parent_checkpoint = ?,"
                    " attempts = attempts + 1, start_time = ?, message = '' WHERE id = ? AND state = ?",
                    (RUNNING, batch, parent_checkpoint, time.time(), job_id, QUEUED))

    def set_stage(self, job_ids: Sequence[str], stage: str, message: str = "") -> None:
        with self._lock, self._transaction():
            for job_id in job_ids:
                self._db.execute("UPDATE jobs SET stage = ?, message = ? WHERE id = ? AND state = ?",
                                 (stage, message, job_id, RUNNING))

    def finish(self, job_ids: Sequence[str], state: str, *, checkpoint: str = "",
               error: dict[str, Any] | None = None, message: str = "") -> None:
        """End running (or queued) jobs: SUCCEEDED with a checkpoint, FAILED with an error."""
        if state not in TERMINAL:
            raise ValueError(f"{state} is not a terminal state")
        stage = {SUCCEEDED: "DONE", FAILED: "FAILED", CANCELLED: "CANCELLED"}[state]
        with self._lock, self._transaction():
            for job_id in job_ids:
                self._db.execute(
                    "UPDATE jobs SET state = ?, stage = ?, checkpoint = ?, error = ?, message = ?, end_time = ?"
                    " WHERE id = ? AND state IN (?, ?)",
                    (state, stage, checkpoint, json.dumps(error) if error else None, message, time.time(),
                     job_id, QUEUED, RUNNING))

    def requeue(self, job_ids: Sequence[str], message: str) -> None:
        """RUNNING -> QUEUED (a batch split or an interrupted dispatch); keeps submission order."""
        with self._lock, self._transaction():
            for job_id in job_ids:
                self._db.execute("UPDATE jobs SET state = ?, stage = 'QUEUED', message = ?, batch = '',"
                                 " parent_checkpoint = '' WHERE id = ? AND state = ?", (QUEUED, message, job_id, RUNNING))

    def cancel(self, job_id: str) -> bool:
        """QUEUED -> CANCELLED; False when the job is not queued (any more)."""
        return self._write("UPDATE jobs SET state = ?, stage = 'CANCELLED', end_time = ? WHERE id = ? AND state = ?",
                           (CANCELLED, time.time(), job_id, QUEUED)) == 1

    def recover(self, max_attempts: int) -> tuple[list[JobRecord], list[JobRecord]]:
        """At startup: jobs left RUNNING by a stopped scheduler go back to the queue.

        A job already dispatched ``max_attempts`` times fails instead, so a job that crashes
        its worker cannot crash-loop the service. Returns ``(requeued, failed)``.
        """
        interrupted = self._query("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (RUNNING,))
        retry = [j for j in interrupted if j.attempts < max_attempts]
        give_up = [j for j in interrupted if j.attempts >= max_attempts]
        self.requeue([j.id for j in retry], "re-dispatched after a scheduler restart")
        self.finish([j.id for j in give_up], FAILED, error={
            "message": f"interrupted {max_attempts} times (scheduler restarts); not retried again"})
        return retry, give_up

    def _transaction(self) -> "_Tx":
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK around a group of writes."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")

