"""The PostgreSQL test fixture itself: a real server, a fresh database per module, restart keeps data."""
from __future__ import annotations

import psycopg


def test_fresh_database_and_restart_keeps_commits(postgres_server, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()[0] == 0
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        c.execute("INSERT INTO t VALUES (1), (2)")
    postgres_server.restart()
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    other = postgres_server.create_database("other")
    assert other != pg_url
    with psycopg.connect(other) as c:
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()[0] == 0
