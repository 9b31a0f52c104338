"""A task the platform worker under test loads besides its own (``celery worker -I``): it
answers which PostgreSQL server process its database connection is on."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="tests.backend_pid")
def backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]
