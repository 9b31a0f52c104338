"""WeiField keeps every wei exactly, on PostgreSQL and on SQLite alike."""

from __future__ import annotations

import pytest
from django.db import connection, models
from django.db.utils import ConnectionHandler

from marketplace.models import Payout, WeiField

AMOUNTS = [0, 1, 2**63 - 1, 2**63, 2**63 + 1, 10**30 + 7, 2**256 - 1]


@pytest.fixture
def sqlite(django_db_blocker):
    """A real SQLite database (in memory), apart from the test database."""
    handler = ConnectionHandler(
        {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    )
    with django_db_blocker.unblock():
        conn = handler["default"]
        yield conn
        conn.close()


def _round_trip(conn, field: WeiField, amount: int) -> int:
    """Stores ``amount`` in a column of the field's own type and reads it back."""
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS wei_check (amount {field.db_type(conn)})")
        cursor.execute("DELETE FROM wei_check")
        cursor.execute(
            "INSERT INTO wei_check (amount) VALUES (%s)", [field.get_db_prep_value(amount, conn)]
        )
        cursor.execute("SELECT amount FROM wei_check")
        (stored,) = cursor.fetchone()
    return field.from_db_value(stored, None, conn)


@pytest.mark.parametrize("amount", AMOUNTS)
def test_sqlite_keeps_wei_above_2_to_the_63_exactly(sqlite, amount):
    field = WeiField()
    assert field.db_type(sqlite) == "text"
    assert _round_trip(sqlite, field, amount) == amount


def test_a_numeric_sqlite_column_would_lose_them(sqlite):
    # What the field avoids: SQLite's numeric affinity stores 2^63 + 1 as a float.
    field = models.DecimalField(max_digits=78, decimal_places=0)
    with sqlite.cursor() as cursor:
        cursor.execute("CREATE TABLE lossy (amount decimal)")
        cursor.execute("INSERT INTO lossy (amount) VALUES (%s)", [str(2**63 + 1)])
        cursor.execute("SELECT amount FROM lossy")
        (stored,) = cursor.fetchone()
    assert int(field.to_python(stored)) != 2**63 + 1


def test_sqlite_checks_positive_amounts_as_the_constraints_need(sqlite):
    field = WeiField()
    with sqlite.cursor() as cursor:
        cursor.execute("CREATE TABLE checked (amount text CHECK (amount > 0))")
        for amount in (1, 9, 10, 2**63 + 1, 2**256 - 1):
            cursor.execute(
                "INSERT INTO checked (amount) VALUES (%s)",
                [field.get_db_prep_value(amount, sqlite)],
            )
        with pytest.raises(Exception, match="CHECK"):
            cursor.execute(
                "INSERT INTO checked (amount) VALUES (%s)", [field.get_db_prep_value(0, sqlite)]
            )


@pytest.mark.django_db
def test_the_test_database_keeps_huge_payouts_exactly():
    field = Payout._meta.get_field("amount_wei")
    for amount in AMOUNTS:
        assert _round_trip(connection, field, amount) == amount


@pytest.mark.parametrize("amount", AMOUNTS)
def test_sqlite_reads_wei_back_through_the_orms_converters(sqlite, amount):
    # What a query does with a value read from SQLite: the backend's converters for the
    # field's type, then the field's own. None may pass it through a float.
    field = Payout._meta.get_field("amount_wei")
    column = field.get_col(Payout._meta.db_table)
    value = _round_trip(sqlite, field, amount)
    stored = field.get_db_prep_value(value, sqlite)
    for convert in [*sqlite.ops.get_db_converters(column), *field.get_db_converters(sqlite)]:
        stored = convert(stored, column, sqlite)
    assert stored == amount
