"""Persistent federated-round state (SQLite, in the controller's registry file).

A controller killed mid-round restarts from here: the run's global head and strategy
state, the round's selection and deadline, which tasks were already sent (never sent
twice to the same device for the same round) and every update already received.
"""
from __future__ import annotations

from dataclasses import dataclass
import io
import json
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..db import Database, add_missing_columns, as_database, baseline, connect, migrate, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS fl_runs(
    id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL,
    round_no INTEGER NOT NULL DEFAULT 0, global_version INTEGER NOT NULL DEFAULT 0,
    head BLOB, strategy_state TEXT, error TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS fl_rounds(
    run_id TEXT NOT NULL, round_no INTEGER NOT NULL, status TEXT NOT NULL, started REAL NOT NULL,
    deadline REAL NOT NULL, selected TEXT NOT NULL, steps TEXT NOT NULL, tasks_sent TEXT NOT NULL,
    finished REAL, metrics TEXT, PRIMARY KEY(run_id, round_no));
CREATE TABLE IF NOT EXISTS fl_updates(
    run_id TEXT NOT NULL, round_no INTEGER NOT NULL, device_id TEXT NOT NULL, received REAL NOT NULL,
    accepted INTEGER NOT NULL, reason TEXT, num_samples INTEGER, base_version INTEGER, meta TEXT,
    update_blob BLOB, acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(run_id, round_no, device_id));
"""
#: columns older files lack
ADD_COLUMNS = {"fl_updates": {"acked": "INTEGER NOT NULL DEFAULT 0"}}
#: versioned migrations of the round tables (controller/db.py ``migrate``); 1 is the baseline
MIGRATIONS = [
    baseline(SCHEMA, ADD_COLUMNS),
    # 2: why no round can start now, for `round start --wait` (issue 17)
    lambda db: add_missing_columns(db, {"fl_runs": {"waiting": "TEXT"}}),
]


def pack_head(head: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in head.items()})
    return buf.getvalue()


def unpack_head(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class RunRow:
    id: str
    created: float
    status: str
    config: dict[str, Any]
    round_no: int
    global_version: int
    head: dict[str, np.ndarray] | None
    strategy_state: dict[str, Any] | None
    error: str | None
    waiting: str | None = None   # why no round can start now (no device eligible, and why), for `round start --wait`


@dataclass(frozen=True)
class RoundRow:
    run_id: str
    round_no: int
    status: str
    started: float
    deadline: float
    selected: tuple[str, ...]
    steps: dict[str, int]
    tasks_sent: frozenset[str]
    finished: float | None
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class UpdateRow:
    device_id: str
    received: float
    accepted: bool
    reason: str | None
    num_samples: int
    base_version: int
    meta: dict[str, Any]
    update: dict[str, np.ndarray] | None


class RoundStore:
    def __init__(self, db: Database) -> None:
        self.db = as_database(db)
        migrate(self.db, "fl", MIGRATIONS)

    @classmethod
    def open(cls, db_path: str) -> "RoundStore":
        return cls(connect(db_path))

    def set_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        """Replace a run's config (uncommitted: the runner's tick commits)."""
        self.db.execute("UPDATE fl_runs SET config=? WHERE id=?", (json.dumps(dict(config)), run_id))

    # -- runs --------------------------------------------------------------
    def create_run(self, run_id: str, config: Mapping[str, Any], head: Mapping[str, np.ndarray],
                   version: int = 0) -> None:
        self.db.execute("INSERT INTO fl_runs(id, created, status, config, head, global_version, updated) "
                        "VALUES(?,?,?,?,?,?,?)",
                        (run_id, time.time(), "pending", json.dumps(dict(config)), pack_head(head), version,
                         time.time()))
        self.db.commit()

    def _run(self, r: tuple) -> RunRow:
        return RunRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], unpack_head(r[6]) if r[6] else None,
                      json.loads(r[7]) if r[7] else None, r[8], r[9])

    _RUN = "id, created, status, config, round_no, global_version, head, strategy_state, error, waiting"

    def run(self, run_id: str) -> RunRow | None:
        r = self.db.execute(f"SELECT {self._RUN} FROM fl_runs WHERE id=?", (run_id,)).fetchone()
        return self._run(r) if r else None

    def runs(self, status: tuple[str, ...] | None = None, limit: int = 50) -> list[RunRow]:
        q = f"SELECT {self._RUN} FROM fl_runs"
        args: list[Any] = []
        if status:
            q += f" WHERE status IN ({','.join('?' * len(status))})"
            args += list(status)
        q += " ORDER BY created DESC LIMIT ?"
        return [self._run(r) for r in self.db.execute(q, args + [limit])]

    def update_run(self, run_id: str, **fields: Any) -> None:
        cols, args = [], []
        for k, v in fields.items():
            if k == "head":
                v = pack_head(v)
            elif k in ("strategy_state", "config"):
                v = json.dumps(v)
            cols.append(f"{k}=?")
            args.append(v)
        cols.append("updated=?")
        args.append(time.time())
        # an operator's stop is final: the runner's later writes (done, failed…) never undo it
        self.db.execute(f"UPDATE fl_runs SET {', '.join(cols)} WHERE id=? AND status != 'stopped'", args + [run_id])
        self.db.commit()

    # -- rounds ------------------------------------------------------------
    def create_round(self, run_id: str, round_no: int, started: float, deadline: float,
                     selected: tuple[str, ...], steps: Mapping[str, int]) -> None:
        self.db.execute("INSERT INTO fl_rounds(run_id, round_no, status, started, deadline, selected, steps, "
                        "tasks_sent) VALUES(?,?,?,?,?,?,?,?)",
                        (run_id, round_no, "running", started, deadline, json.dumps(list(selected)),
                         json.dumps(dict(steps)), "[]"))
        self.db.commit()

    def start_round(self, run_id: str, round_no: int, started: float, deadline: float,
                    selected: tuple[str, ...], steps: Mapping[str, int], tasks_sent: frozenset[str] = frozenset()
                    ) -> None:
        """Open round ``round_no`` and make it the run's current round, in one transaction (a crash
        between the two would leave a round the run does not know, and a primary-key clash forever)."""
        with transaction(self.db):
            self.db.execute("INSERT INTO fl_rounds(run_id, round_no, status, started, deadline, selected, steps, "
                            "tasks_sent) VALUES(?,?,?,?,?,?,?,?)",
                            (run_id, round_no, "running", started, deadline, json.dumps(list(selected)),
                             json.dumps(dict(steps)), json.dumps(sorted(tasks_sent))))
            self.db.execute("UPDATE fl_runs SET round_no=?, updated=? WHERE id=?", (round_no, time.time(), run_id))

    def aggregate_round(self, run_id: str, round_no: int, head: Mapping[str, np.ndarray], version: int,
                        strategy_state: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
        """The new global head and its round's close, in one transaction: a crash never leaves a new
        version whose round is still open (a restart would aggregate it again)."""
        row = self.round(run_id, round_no)
        merged = {**((row.metrics or {}) if row else {}), **metrics}
        with transaction(self.db):
            # a run stopped meanwhile (``round stop``, another connection) is never aggregated again
            if self.db.execute("UPDATE fl_runs SET head=?, global_version=?, strategy_state=?, updated=? "
                               "WHERE id=? AND status IN ('pending', 'running')",
                               (pack_head(head), version, json.dumps(dict(strategy_state)), time.time(),
                                run_id)).rowcount == 0:
                return False
            self.db.execute("UPDATE fl_rounds SET status='aggregated', finished=?, metrics=? "
                            "WHERE run_id=? AND round_no=?", (time.time(), json.dumps(merged), run_id, round_no))
        return True

    def stop_run(self, run_id: str, reason: str) -> bool:
        """End a pending or running run now (``round stop``): the run and its open round become
        ``stopped`` in one transaction; nothing aggregates after it. False: it had already ended."""
        now = time.time()
        with transaction(self.db):
            if self.db.execute("UPDATE fl_runs SET status='stopped', error=?, updated=? WHERE id=? "
                               "AND status IN ('pending', 'running')", (reason, now, run_id)).rowcount == 0:
                return False
            self.db.execute("UPDATE fl_rounds SET status='stopped', finished=? WHERE run_id=? AND status='running'",
                            (now, run_id))
        return True

    def mark_task_sent(self, run_id: str, round_no: int, device_id: str) -> None:
        row = self.round(run_id, round_no)
        if row is None or device_id in row.tasks_sent:
            return
        sent = sorted(row.tasks_sent | {device_id})
        self.db.execute("UPDATE fl_rounds SET tasks_sent=? WHERE run_id=? AND round_no=?",
                        (json.dumps(sent), run_id, round_no))
        self.db.commit()

    def note_round(self, run_id: str, round_no: int, notes: Mapping[str, Any]) -> None:
        """Add to a round's metrics while it runs (e.g. the steps sizing lowered); a dict value is
        merged with the one already noted under its key."""
        row = self.round(run_id, round_no)
        if row is None:
            return
        metrics = dict(row.metrics or {})
        for k, v in notes.items():
            metrics[k] = {**metrics[k], **v} if isinstance(v, Mapping) and isinstance(metrics.get(k), dict) else v
        self.db.execute("UPDATE fl_rounds SET metrics=? WHERE run_id=? AND round_no=?",
                        (json.dumps(metrics), run_id, round_no))
        self.db.commit()

    def finish_round(self, run_id: str, round_no: int, status: str, metrics: Mapping[str, Any]) -> None:
        """Close a round; what ``note_round`` recorded while it ran is kept."""
        row = self.round(run_id, round_no)
        merged = {**((row.metrics or {}) if row else {}), **metrics}
        self.db.execute("UPDATE fl_rounds SET status=?, finished=?, metrics=? WHERE run_id=? AND round_no=? "
                        "AND status != 'stopped'", (status, time.time(), json.dumps(merged), run_id, round_no))
        self.db.commit()

    def _round(self, r: tuple) -> RoundRow:
        return RoundRow(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), json.loads(r[6]),
                        frozenset(json.loads(r[7])), r[8], json.loads(r[9]) if r[9] else None)

    _ROUND = "run_id, round_no, status, started, deadline, selected, steps, tasks_sent, finished, metrics"

    def round(self, run_id: str, round_no: int) -> RoundRow | None:
        r = self.db.execute(f"SELECT {self._ROUND} FROM fl_rounds WHERE run_id=? AND round_no=?",
                            (run_id, round_no)).fetchone()
        return self._round(r) if r else None

    def rounds(self, run_id: str) -> list[RoundRow]:
        return [self._round(r) for r in self.db.execute(
            f"SELECT {self._ROUND} FROM fl_rounds WHERE run_id=? ORDER BY round_no", (run_id,))]

    # -- updates -----------------------------------------------------------
    def add_update(self, run_id: str, round_no: int, u: UpdateRow) -> bool:
        """Store an update once per device per round; False if one was already stored."""
        cur = self.db.execute(
            "INSERT INTO fl_updates(run_id, round_no, device_id, received, accepted, reason, num_samples, "
            "base_version, meta, update_blob) VALUES(?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(run_id, round_no, device_id) DO NOTHING",
            (run_id, round_no, u.device_id, u.received, int(u.accepted), u.reason, u.num_samples, u.base_version,
             json.dumps(u.meta), pack_head(u.update) if u.update is not None else None))
        self.db.commit()
        return cur.rowcount == 1

    def add_site_update(self, run_id: str, round_no: int, site: UpdateRow, boards: Sequence[UpdateRow]) -> list[str]:
        """A site's aggregate and one row per board it stands for, in one transaction: all or nothing.
        Returns the boards that already had a row (nothing is written then): a board counts once,
        whether it came direct or through a site; [] = stored."""
        with transaction(self.db):
            ids = [b.device_id for b in boards] + [site.device_id]
            rows = self.db.execute(
                f"SELECT device_id FROM fl_updates WHERE run_id=? AND round_no=? AND device_id IN "
                f"({','.join('?' * len(ids))})", [run_id, round_no, *ids]).fetchall()
            if rows:
                return sorted(r[0] for r in rows)
            for u in (site, *boards):
                self.db.execute(
                    "INSERT INTO fl_updates(run_id, round_no, device_id, received, accepted, reason, num_samples, "
                    "base_version, meta, update_blob) VALUES(?,?,?,?,?,?,?,?,?,?)",
                    (run_id, round_no, u.device_id, u.received, int(u.accepted), u.reason, u.num_samples,
                     u.base_version, json.dumps(u.meta), pack_head(u.update) if u.update is not None else None))
        return []

    def update_row(self, run_id: str, round_no: int, device_id: str, task_round: bool = False) -> UpdateRow | None:
        """The update recorded from ``device_id`` for ``round_no`` (``task_round``: async, where an update
        is filed under the window it arrived in and ``meta.task_round`` names the task's round)."""
        if not task_round:
            return next((u for u in self.updates(run_id, round_no) if u.device_id == device_id), None)
        rows = self.db.execute("SELECT round_no FROM fl_updates WHERE run_id=? AND device_id=? AND round_no>=?",
                               (run_id, device_id, round_no)).fetchall()
        for (r,) in rows:
            for u in self.updates(run_id, r):
                if u.device_id == device_id and u.meta.get("task_round") == round_no:
                    return u
        return None

    def mark_acked(self, run_id: str, round_no: int, device_id: str) -> None:
        """The broker acknowledged our ``fl.ack`` for the update answering task ``round_no`` (async files
        it under the window it arrived in, with ``meta.task_round``)."""
        rows = self.db.execute("SELECT round_no, meta FROM fl_updates WHERE run_id=? AND device_id=? AND acked=0",
                               (run_id, device_id)).fetchall()
        for r, meta in rows:   # meta is JSON text: read here, not with a backend's JSON functions
            if r == round_no or (json.loads(meta) if meta else {}).get("task_round") == round_no:
                self.db.execute("UPDATE fl_updates SET acked=1 WHERE run_id=? AND device_id=? AND round_no=?",
                                (run_id, device_id, r))
        self.db.commit()

    def unacked(self, run_ids: tuple[str, ...]) -> list[tuple[str, str, bool, str | None, int]]:
        """``(run_id, device_id, accepted, reason, task_round)`` of updates whose ``fl.ack`` the
        broker never acknowledged (a crash between recording and acking)."""
        if not run_ids:
            return []
        rows = self.db.execute(
            f"SELECT run_id, round_no, device_id, accepted, reason, meta FROM fl_updates "
            f"WHERE acked=0 AND run_id IN ({','.join('?' * len(run_ids))})", run_ids).fetchall()
        return [(r[0], r[2], bool(r[3]), r[4], int((json.loads(r[5]) if r[5] else {}).get("task_round", r[1])))
                for r in rows]

    def updates(self, run_id: str, round_no: int) -> list[UpdateRow]:
        rows = self.db.execute(
            "SELECT device_id, received, accepted, reason, num_samples, base_version, meta, update_blob "
            "FROM fl_updates WHERE run_id=? AND round_no=? ORDER BY received", (run_id, round_no))
        return [UpdateRow(r[0], r[1], bool(r[2]), r[3], r[4] or 0, r[5] or 0, json.loads(r[6]) if r[6] else {},
                          unpack_head(r[7]) if r[7] else None) for r in rows]
