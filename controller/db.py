"""The one place that opens the controller's SQLite file.

Every store (``registry.Registry``, ``fl.store.RoundStore``, ``rollouts.store.RolloutStore``)
keeps its own SQL in its own module and shares a connection opened here, so the pragmas, the
read-only mode the CLI uses, schema creation and column migrations are written once.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator, Mapping


class DatabaseMissing(RuntimeError):
    """A read-only open of a file that does not exist (yet)."""


def connect(path: str | Path, *, readonly: bool = False, timeout: float = 10.0) -> sqlite3.Connection:
    """Open ``path``: WAL with synchronous=NORMAL for writers; ``readonly`` never creates or writes."""
    path = str(path)
    if readonly:
        if not os.path.exists(path):
            raise DatabaseMissing(path)
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def ensure_schema(db: sqlite3.Connection, schema: str,
                  add_columns: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the tables of ``schema`` if missing, then add columns that older files lack.

    ``add_columns`` maps a table to ``{column: SQL type}``: the migration for files made before
    a column existed (``CREATE TABLE IF NOT EXISTS`` leaves an old table as it was).
    """
    db.executescript(schema)
    for table, columns in (add_columns or {}).items():
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for col, sql_type in columns.items():
            if col not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {sql_type}")
    db.commit()


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Commit what the block wrote, or roll all of it back if the block raises."""
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def end_read(db: sqlite3.Connection) -> None:
    """End an open read transaction so the next query sees other connections' commits."""
    db.rollback()
