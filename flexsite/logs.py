"""Log filters for what a monitor's probes of /health/ write while a service is down."""

from __future__ import annotations

import logging

from django.urls import reverse


class HealthProbes(logging.Filter):
    """A failing health check on one line, once per probe: the check, what failed and its
    cause, with no traceback; and no "Internal Server Error" line for the 500 that /health/
    answers by design. A monitor probing every few seconds while the broker is down would
    otherwise write a traceback and an error at each probe. An exception the checks did not
    expect, in a check or in the view, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "django.request":
            request = getattr(record, "request", None)
            return not (
                record.exc_info is None
                and getattr(record, "status_code", None) == 500
                and request is not None
                and request.path == reverse("health")
            )
        if record.levelno == logging.WARNING and record.exc_info:
            exc = record.exc_info[1]
            cause = exc.__cause__ if exc is not None else None
            # A check that timed out carries asyncio's TimeoutError, which has no message.
            line = f"{record.getMessage()}: {str(exc) or type(exc).__name__}"
            if cause is not None and str(cause):
                line += f" ({type(cause).__name__}: {cause})"
            record.msg, record.args, record.exc_info, record.exc_text = line, (), None, None
        return True
