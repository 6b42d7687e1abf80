"""SQLite persistence for training jobs, uploaded datasets and a little server state (`settings`).

One connection shared by every thread behind a lock: the admin API writes a handful of small rows per second at
most, so a lock is simpler than a connection per thread and just as fast. WAL mode lets an operator read the
file with `sqlite3` while the server writes it. The schema is versioned with `PRAGMA user_version`; each entry in
`MIGRATIONS` moves the file one version up, so an older database is upgraded in place on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Job lifecycle. `queued` and `running` are live; the rest are terminal (a resume re-queues a terminal job).
QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = "succeeded", "failed", "cancelled", "interrupted"
LIVE_STATUSES = (QUEUED, RUNNING)
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT,
        status TEXT NOT NULL,
        request TEXT NOT NULL,          -- the validated request body, JSON
        args TEXT NOT NULL,             -- trainer arguments after `train`, JSON list (no --resume)
        run_dir TEXT NOT NULL,
        serve_when_done INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        queued_at REAL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        exit_code INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        step INTEGER,
        total_steps INTEGER,
        resumed_from_step INTEGER,
        params INTEGER,
        train_loss REAL,
        val_loss REAL,
        best_val_loss REAL,
        lr REAL,
        tokens_per_s REAL,
        tokens_seen INTEGER,
        elapsed_s REAL,
        eta_s REAL,
        last_checkpoint TEXT,
        best_checkpoint TEXT,
        error TEXT,
        served_checkpoint TEXT,
        serve_error TEXT
    );
    CREATE INDEX jobs_status ON jobs (status, queued_at);
    CREATE TABLE datasets (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        path TEXT NOT NULL,             -- relative to the data root
        bytes INTEGER NOT NULL,
        lines INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # v2: small server state that must outlive a restart (the hot-swapped checkpoint: app/jobs/served.py)
    """
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,            -- JSON
        updated_at REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Job:
    """One row of `jobs`. `request` is the validated request body, `args` the trainer arguments."""

    id: str
    status: str
    request: dict[str, Any]
    args: list[str]
    run_dir: str
    created_at: float
    name: str | None = None
    serve_when_done: bool = False
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    attempts: int = 0
    pid: int | None = None
    exit_code: int | None = None
    cancel_requested: bool = False
    step: int | None = None
    total_steps: int | None = None
    resumed_from_step: int | None = None
    params: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    tokens_seen: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    error: str | None = None
    served_checkpoint: str | None = None
    serve_error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Dataset:
    """One row of `datasets`: an uploaded text file under the data root."""

    id: str
    filename: str
    path: str
    bytes: int
    lines: int
    sha256: str
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_JOB_COLUMNS = tuple(f.name for f in fields(Job))
_JSON_COLUMNS = {"request", "args"}
_BOOL_COLUMNS = {"serve_when_done", "cancel_requested"}


def _job_from_row(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row is not a Mapping)
    for k in _JSON_COLUMNS:
        data[k] = json.loads(data[k])
    for k in _BOOL_COLUMNS:
        data[k] = bool(data[k])
    return Job(**data)


def _to_sql(key: str, value: Any) -> Any:
    if key in _JSON_COLUMNS:
        return json.dumps(value)
    if key in _BOOL_COLUMNS:
        return int(bool(value))
    return value


class JobStore:
    """Thread-safe access to the jobs/datasets database at `path` (created and migrated on open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit; each statement is its own transaction unless one is opened explicitly.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
                "upgrade pocketgpt or point POCKETGPT_DB at another file"
            )
        for v in range(version, SCHEMA_VERSION):
            self._db.executescript(f"BEGIN; {MIGRATIONS[v]}; PRAGMA user_version = {v + 1}; COMMIT;")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ----------------------------------------------------------------------------------------------
    def insert_job(self, job: Job) -> Job:
        """Insert a new job row; returns it."""
        job.updated_at = time.time()
        cols = ", ".join(_JOB_COLUMNS)
        marks = ", ".join("?" for _ in _JOB_COLUMNS)
        values = [_to_sql(k, getattr(job, k)) for k in _JOB_COLUMNS]
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", values)
        return job

    def update_job(self, job_id: str, **changes: Any) -> Job:
        """Set the given columns of a job (unknown column names raise) and return the updated row."""
        unknown = set(changes) - set(_JOB_COLUMNS) - {"updated_at"}
        if unknown or "id" in changes:
            raise ValueError(f"cannot update job column(s) {sorted(unknown | ({'id'} & set(changes)))}")
        changes["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in changes)
        values = [_to_sql(k, v) for k, v in changes.items()]
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job_from_row(row)

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row is not None else None

    def list_jobs(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally only those with `status`."""
        sql, params = "SELECT * FROM jobs", []
        if status is not None:
            sql, params = sql + " WHERE status = ?", [status]
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql, params = sql + " LIMIT ?", [*params, limit]
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_job_from_row(r) for r in rows]

    def queued_jobs(self) -> list[Job]:
        """Queued jobs in FIFO order (a resumed job joins the back of the queue)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY queued_at, rowid", (QUEUED,)
            ).fetchall()
        return [_job_from_row(r) for r in rows]

    # -- datasets ------------------------------------------------------------------------------------------
    def insert_dataset(self, ds: Dataset) -> Dataset:
        cols = [f.name for f in fields(Dataset)]
        with self._lock:
            self._db.execute(
                f"INSERT INTO datasets ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [getattr(ds, c) for c in cols],
            )
        return ds

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        return Dataset(**dict(row)) if row is not None else None

    def list_datasets(self) -> list[Dataset]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM datasets ORDER BY created_at DESC, rowid DESC").fetchall()
        return [Dataset(**dict(r)) for r in rows]

    # -- settings ------------------------------------------------------------------------------------------
    def get_setting(self, key: str) -> Any:
        """The JSON value stored under `key`, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def set_setting(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable `value` under `key` (replacing any previous one)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, json.dumps(value), time.time()),
            )
