"""How every command logs: lines for people, or with `--log-format json` (or SMMF_LOG_FORMAT=json)
one JSON object per line for a log pipeline: time, level, logger, message, and `job_id`, `model`
and `attempt` wherever a job is in scope (`job_scope`, set by the worker around each delivery).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import os
from collections.abc import Iterator
from typing import Any

from pythonjsonlogger.json import JsonFormatter

#: the environment variable that picks the format; `--log-format` sets it for child processes.
LOG_FORMAT_ENV = "SMMF_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: the fields of the job in scope (None: none is).
_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("smmf_job", default=None)


class LogFormat(str, enum.Enum):
    """What `--log-format` takes."""

    TEXT = "text"
    JSON = "json"


@contextlib.contextmanager
def job_scope(**fields: Any) -> Iterator[None]:
    """Every record logged inside carries `fields` (job_id, model, attempt) as its own."""
    token = _JOB.set({**(_JOB.get() or {}), **fields})
    try:
        yield
    finally:
        _JOB.reset(token)


class _JobFields(logging.Filter):
    """Puts the job in scope on each record (a handler's filter: it sees every logger's records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_JOB.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def current_format() -> LogFormat:
    """The format SMMF_LOG_FORMAT names (text when unset)."""
    return LogFormat(os.environ.get(LOG_FORMAT_ENV, LogFormat.TEXT.value).lower())


def configure(level: str = "INFO") -> None:
    """One stderr handler on the root logger, in the format SMMF_LOG_FORMAT names."""
    handler = logging.StreamHandler()
    if current_format() is LogFormat.JSON:
        handler.setFormatter(JsonFormatter("{levelname}{name}{message}", style="{", timestamp="time",
                                           rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_JobFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
