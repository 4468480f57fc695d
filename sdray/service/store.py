"""The job store: SQLite in WAL mode, behind a small repository (plain ``sqlite3``).

One row per job (its document, state, conditions and latest progress) plus the loss curve and the latest
sample grid. Every write is one ``BEGIN IMMEDIATE`` transaction (it takes SQLite's write lock before it
reads, so two writers cannot both read the same next sequence number), and the sequence column is
UNIQUE; a killed service leaves the store consistent, and on restart the service reconciles what the
store says is running with the backend. One service replica owns one database: the queue, quotas and
retries are decided in the process, not in SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sdray.states import ACTIVE, STATES, JobState

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    labels TEXT NOT NULL,
    document TEXT NOT NULL,
    demand TEXT NOT NULL,
    handle TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    conditions TEXT NOT NULL DEFAULT '[]',
    progress_token_hash TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS points (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, name, step)
);
CREATE TABLE IF NOT EXISTS samples (
    job_id TEXT PRIMARY KEY,
    png BLOB NOT NULL,
    step INTEGER,
    updated REAL NOT NULL
);
"""

_JSON = ("labels", "document", "demand", "progress", "conditions")


@dataclass
class JobRecord:
    id: str
    seq: int
    tenant: str
    name: str
    kind: str  # "train" or "tune"
    state: str
    labels: dict
    document: dict
    demand: dict  # resources the job takes while it runs: {"CPU": 2, "GPU": 0, "workers": 2}
    progress_token_hash: str
    created: float
    updated: float
    handle: str | None = None
    attempts: int = 0
    progress: dict = field(default_factory=dict)
    conditions: list = field(default_factory=list)
    started: float | None = None
    finished: float | None = None


class JobStore:
    """Thread-safe repository of jobs over one SQLite file (``:memory:`` for throwaway stores)."""

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it consistent
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._unique_seq()
        self._one_vocabulary()

    def _unique_seq(self) -> None:
        """The UNIQUE index on ``seq``; a store written before it, whose racing writers left duplicate sequence
        numbers, is renumbered in insertion order first."""
        with self._write():
            try:
                self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_seq ON jobs (seq)")
            except sqlite3.IntegrityError:
                self._db.execute("UPDATE jobs SET seq = seq + (SELECT MAX(seq) FROM jobs) + rowid")
                self._db.execute("UPDATE jobs SET seq = (SELECT COUNT(*) FROM jobs AS j WHERE j.rowid <= jobs.rowid)")
                self._db.execute("CREATE UNIQUE INDEX jobs_seq ON jobs (seq)")

    def _one_vocabulary(self) -> None:
        """Rows a service wrote before the one set of job states (``sdray.states``) say ``pending`` …
        ``preempted``: read them as the same states. A ``pending`` job that the backend had not been given is
        Queued, one it had is Pending (starting)."""
        old = {state.lower(): state for state in STATES}
        with self._write():
            self._db.execute("UPDATE jobs SET state = ? WHERE state = 'pending' AND handle IS NULL", (JobState.QUEUED,))
            for lower, state in old.items():
                self._db.execute("UPDATE jobs SET state = ? WHERE state = ?", (state, lower))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: SQLite's write lock from its first statement (BEGIN IMMEDIATE), committed
        at the end, rolled back on an error. (The connection is in autocommit mode, where ``with db:``
        alone would open no transaction at all.)"""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def ping(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1").fetchone()[0] == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ---------------------------------------------------------------------------------------
    def insert(self, rec: JobRecord) -> JobRecord:
        with self._write():
            rec.seq = (self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0])
            row = self._row_of(rec)
            self._db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             list(row.values()))
        return rec

    def update(self, job_id: str, **fields) -> JobRecord | None:
        fields["updated"] = time.time()
        row = {k: json.dumps(v) if k in _JSON else v for k, v in fields.items()}
        with self._write():
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?",
                             [*row.values(), job_id])
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._record(row) if row else None

    def list(self, *, tenant: str | None = None, states: list[str] | None = None, labels: dict | None = None,
             after_seq: int = 0, limit: int | None = None, newest_first: bool = False) -> list[JobRecord]:
        """Jobs in submission order (``newest_first``: the reverse, and ``after_seq`` then means "submitted
        before"; 0 starts at the newest), filtered in SQL; with ``limit``, one row more than asked when
        there are more (which tells the caller that a next page exists)."""
        if newest_first:
            sql, args = ("SELECT * FROM jobs WHERE seq < ?", [after_seq]) if after_seq else ("SELECT * FROM jobs WHERE 1", [])
        else:
            sql, args = "SELECT * FROM jobs WHERE seq > ?", [after_seq]
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        for key, value in (labels or {}).items():  # label keys may hold dots and slashes: no JSON paths
            sql += " AND EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE json_each.key = ? AND json_each.value = ?)"
            args.extend([key, value])
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._record(row) for row in rows]

    def active_usage(self, tenant: str) -> tuple[int, float, float]:
        """A tenant's active jobs (queued, pending, running): how many, and the workers and GPUs they take."""
        active = sorted(ACTIVE)
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(json_extract(demand, '$.workers')), 0), "
                "COALESCE(SUM(json_extract(demand, '$.GPU')), 0) FROM jobs "
                f"WHERE tenant = ? AND state IN ({', '.join('?' * len(active))})", (tenant, *active)).fetchone()
        return int(row[0]), float(row[1]), float(row[2])

    def queue_depth(self) -> dict[str, int]:
        """Queued jobs not yet handed to the backend, by tenant."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, COUNT(*) FROM jobs WHERE state = ? AND handle IS NULL "
                                    "GROUP BY tenant", (JobState.QUEUED,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def oldest_pending(self) -> dict[str, float]:
        """When each tenant's oldest waiting job (Queued, or Pending: submitted and not started) was created."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, MIN(created) FROM jobs WHERE state IN (?, ?) GROUP BY tenant",
                                    (JobState.QUEUED, JobState.PENDING)).fetchall()
        return {r[0]: r[1] for r in rows}

    def recent_progress(self, finished_since: float) -> list[tuple[str, str, str, str, dict, dict]]:
        """``(id, tenant, name, state, progress, demand)`` of jobs with progress that are unfinished or
        finished since ``finished_since``; only these columns are read (no documents)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, name, state, progress, demand FROM jobs WHERE progress != '{}' "
                "AND (finished IS NULL OR finished >= ?) ORDER BY seq", (finished_since,)).fetchall()
        return [(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (state, tenant)."""
        with self._lock:
            rows = self._db.execute("SELECT state, tenant, COUNT(*) FROM jobs GROUP BY state, tenant").fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    # -- loss curve and samples --------------------------------------------------------------------
    def add_points(self, job_id: str, points: Iterable[tuple[str, int, float]]) -> None:
        """Curve points ``(name, step, value)``, in one transaction; a repeated (name, step) is replaced."""
        now = time.time()
        with self._write():
            self._db.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?)",
                                 [(job_id, step, name, value, now) for name, step, value in points])

    def points(self, job_id: str) -> dict[str, list[tuple[int, float]]]:
        with self._lock:
            rows = self._db.execute("SELECT name, step, value FROM points WHERE job_id = ? ORDER BY step",
                                    (job_id,)).fetchall()
        out: dict[str, list] = {}
        for name, step, value in rows:
            out.setdefault(name, []).append((step, value))
        return out

    def put_sample(self, job_id: str, png: bytes, step: int | None) -> None:
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?)", (job_id, png, step, time.time()))

    def sample(self, job_id: str) -> tuple[bytes, int | None] | None:
        with self._lock:
            row = self._db.execute("SELECT png, step FROM samples WHERE job_id = ?", (job_id,)).fetchone()
        return (row[0], row[1]) if row else None

    # -- rows --------------------------------------------------------------------------------------
    @staticmethod
    def _row_of(rec: JobRecord) -> dict:
        return {k: json.dumps(v) if k in _JSON else v for k, v in rec.__dict__.items()}

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(**{k: json.loads(row[k]) if k in _JSON else row[k] for k in row.keys()})
