"""PostgreSQL databases of a test's own, for tests that run the platform as separate processes
(which cannot see pytest-django's test database)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from stack.backing import LOCAL_POSTGRES_URL, postgres_answers


def postgres_base() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        return url
    if postgres_answers(LOCAL_POSTGRES_URL):
        return LOCAL_POSTGRES_URL
    pytest.fail("this test needs PostgreSQL: set DATABASE_URL or run one on :5432")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))


def admin_connect(url: str) -> psycopg.Connection:
    return psycopg.connect(
        url.replace("postgres://", "postgresql://", 1), autocommit=True, connect_timeout=10
    )


@contextlib.contextmanager
def new_database() -> Iterator[str]:
    """A PostgreSQL database of the test's own; dropped after, connections and all."""
    base = postgres_base()
    name = f"flex_test_{secrets.token_hex(4)}"
    with admin_connect(base) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(base, name)
    finally:
        with admin_connect(base) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_connections(database_url: str) -> int:
    """Cut every connection to the platform's database from the server's side."""
    name = urlsplit(database_url).path.lstrip("/")
    with admin_connect(with_database(database_url, "postgres")) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)
