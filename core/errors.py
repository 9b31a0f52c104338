"""FLEX's error root: every error a user can meet has a stable code, a message and fields."""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar


class FlexError(Exception):
    """Root of every FLEX error: a stable ``code``, a message, and the fields that explain it.

    The same shape reaches every user: the API returns ``{"code", "message", "fields"}``,
    forms show the message beside the field, command-line tools print it and exit non-zero.
    """

    code: ClassVar[str] = "flex_error"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.message = message or self.default_message(**fields)
        self.fields = fields
        super().__init__(self.message)

    def default_message(self, **fields: Any) -> str:
        return (self.__doc__ or self.code).strip().splitlines()[0]

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fields": self.fields}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Keep the fields when the error crosses a process boundary (Celery pickles it).
        return (functools.partial(type(self), self.message, **self.fields), ())


def dropped(*kinds: type[FlexError], log: logging.Logger, why: str):
    """A Celery task body that drops its job with one warning line when it raises one of
    ``kinds`` (an expected condition, such as a job naming a task this chain does not have,
    left in the broker by an earlier run): no traceback, no retry, returns None."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except kinds as exc:
                fields = ", ".join(f"{k}={v}" for k, v in exc.fields.items())
                log.warning("%s dropped: %s (%s); %s", fn.__name__, exc.message, fields, why)
                return None

        return run

    return wrap
