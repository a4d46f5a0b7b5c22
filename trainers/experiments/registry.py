"""The sweep's registry: experiments, control requests, pruning decisions and events, in one
SQLite file (``<sweep dir>/sweep.db``, WAL mode).

It is the control channel: ``scripts/experiments.py`` writes requests (stop, resume, clone)
and reads the experiments' status and latest metrics; the driver applies pending requests
between chunks and answers each. A request written while no driver runs waits for the next
one, and everything the driver decided (status, pruning decisions, which Hydra job is which
experiment) survives its restart. SQLite serialises the two writers; neither holds a
transaction open for longer than one statement group.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_FILE = "sweep.db"
STATUSES = ("active", "stopped", "pruned", "done", "failed")
REQUEST_KINDS = ("stop", "resume", "clone")

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY, job INTEGER UNIQUE, overrides TEXT NOT NULL, diff TEXT NOT NULL,
    parent INTEGER, warm_start INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}', note TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, experiment INTEGER NOT NULL, overrides TEXT NOT NULL,
    warm_start INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', answer TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, answered REAL);
CREATE TABLE IF NOT EXISTS decisions (
    experiment INTEGER NOT NULL, rung INTEGER NOT NULL, kept INTEGER NOT NULL, PRIMARY KEY (experiment, rung));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, experiment INTEGER, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ExperimentRecord:
    id: int
    job: int | None  # the Hydra job number it came from (None: a clone)
    overrides: tuple[str, ...]  # the Hydra overrides that compose its configuration
    diff: dict[str, str]  # what sets it apart from the sweep's other experiments
    parent: int | None
    warm_start: bool
    status: str
    step: int  # its last completed step
    metrics: dict[str, Any]  # its latest metrics (evaluation included)
    note: str


@dataclass(frozen=True)
class Request:
    id: int
    kind: str
    experiment: int
    overrides: tuple[str, ...]
    warm_start: bool
    state: str  # pending | done | refused
    answer: str


class Registry:
    def __init__(self, sweep_dir: str | Path):
        self.path = Path(sweep_dir) / DB_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    @staticmethod
    def exists(sweep_dir: str | Path) -> bool:
        return (Path(sweep_dir) / DB_FILE).is_file()

    # ---- experiments ------------------------------------------------------------------
    def add(self, overrides: list[str], diff: dict[str, str], job: int | None = None, parent: int | None = None,
            warm_start: bool = False) -> int:
        """A new active experiment; ids count from 0 (a fresh sweep's match its Hydra job numbers)."""
        cur = self.db.execute(
            "INSERT INTO experiments (id, job, overrides, diff, parent, warm_start, status, created) "
            "VALUES ((SELECT COALESCE(MAX(id) + 1, 0) FROM experiments), ?, ?, ?, ?, ?, 'active', ?)",
            (job, json.dumps(list(overrides)), json.dumps(diff), parent, int(warm_start), time.time()))
        return cur.lastrowid

    def _record(self, row) -> ExperimentRecord:
        (id_, job, overrides, diff, parent, warm, status, step, metrics, note) = row
        return ExperimentRecord(id_, job, tuple(json.loads(overrides)), json.loads(diff), parent, bool(warm),
                                status, step, json.loads(metrics), note)

    _COLUMNS = "id, job, overrides, diff, parent, warm_start, status, step, metrics, note"

    def experiments(self) -> list[ExperimentRecord]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM experiments ORDER BY id").fetchall()
        return [self._record(r) for r in rows]

    def get(self, experiment: int) -> ExperimentRecord | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM experiments WHERE id = ?", (experiment,)).fetchone()
        return self._record(row) if row else None

    def by_job(self, job: int) -> ExperimentRecord | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM experiments WHERE job = ?", (job,)).fetchone()
        return self._record(row) if row else None

    def set_overrides(self, experiment: int, overrides: list[str], diff: dict[str, str]) -> None:
        """A job run again with other overrides (say, more trainer.steps) keeps its experiment."""
        self.db.execute("UPDATE experiments SET overrides = ?, diff = ? WHERE id = ?",
                        (json.dumps(list(overrides)), json.dumps(diff), experiment))

    def set_status(self, experiment: int, status: str, note: str = "") -> None:
        assert status in STATUSES, status
        self.db.execute("UPDATE experiments SET status = ?, note = ? WHERE id = ?", (status, note, experiment))
        self.event(experiment, status, note)

    def progress(self, experiment: int, step: int, metrics: dict[str, Any]) -> None:
        self.db.execute("UPDATE experiments SET step = ?, metrics = ? WHERE id = ?",
                        (step, json.dumps(metrics), experiment))

    # ---- control requests -------------------------------------------------------------
    def request(self, kind: str, experiment: int, overrides: list[str] = (), warm_start: bool = False) -> int:
        assert kind in REQUEST_KINDS, kind
        cur = self.db.execute("INSERT INTO requests (kind, experiment, overrides, warm_start, created) "
                              "VALUES (?, ?, ?, ?, ?)",
                              (kind, experiment, json.dumps(list(overrides)), int(warm_start), time.time()))
        return cur.lastrowid

    def _request(self, row) -> Request:
        id_, kind, experiment, overrides, warm, state, answer = row
        return Request(id_, kind, experiment, tuple(json.loads(overrides)), bool(warm), state, answer)

    def pending(self) -> list[Request]:
        rows = self.db.execute("SELECT id, kind, experiment, overrides, warm_start, state, answer FROM requests "
                               "WHERE state = 'pending' ORDER BY id").fetchall()
        return [self._request(r) for r in rows]

    def get_request(self, request: int) -> Request:
        return self._request(self.db.execute("SELECT id, kind, experiment, overrides, warm_start, state, answer "
                                             "FROM requests WHERE id = ?", (request,)).fetchone())

    def answer(self, request: int, done: bool, answer: str) -> None:
        self.db.execute("UPDATE requests SET state = ?, answer = ?, answered = ? WHERE id = ?",
                        ("done" if done else "refused", answer, time.time(), request))

    # ---- pruning decisions, events, metadata -----------------------------------------------
    def decisions(self) -> dict[tuple[int, int], bool]:
        """(experiment, rung) -> kept, for every decision taken."""
        return {(e, r): bool(k) for e, r, k in self.db.execute("SELECT experiment, rung, kept FROM decisions")}

    def decide(self, experiment: int, rung: int, kept: bool) -> None:
        self.db.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?)", (experiment, rung, int(kept)))

    def event(self, experiment: int | None, kind: str, detail: str = "") -> None:
        self.db.execute("INSERT INTO events (time, experiment, kind, detail) VALUES (?, ?, ?, ?)",
                        (time.time(), experiment, kind, detail))

    def events(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT time, experiment, kind, detail FROM events ORDER BY id").fetchall()
        return [{"time": t, "experiment": e, "kind": k, "detail": d} for t, e, k, d in rows]

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def close(self) -> None:
        self.db.close()
