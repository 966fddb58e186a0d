"""How the gateway answers errors: OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with the status, type and code of each SmmfError from one table (`STATUS`).
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from .errors import (
    BrokerUnavailable,
    BudgetExceeded,
    InvalidKey,
    JobFailed,
    JobTimeout,
    KeyAliasTaken,
    ModelNotAllowed,
    NoLiveWorker,
    QueueFull,
    RateLimited,
    RequestError,
    SmmfError,
    UnknownJob,
    UnknownKey,
    UnknownModel,
    UnsupportedParameter,
)

#: seconds a client should wait before sending again a request answered 503.
RETRY_AFTER_S = 2
#: SmmfError class → (HTTP status, OpenAI error type, code); the first match wins.
STATUS: list[tuple[type[SmmfError], int, str, str | None]] = [
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (UnknownJob, 404, "invalid_request_error", "stream_not_found"),
    (UnknownKey, 404, "invalid_request_error", "key_not_found"),
    (KeyAliasTaken, 409, "invalid_request_error", "key_alias_taken"),
    (UnsupportedParameter, 400, "invalid_request_error", "unsupported_parameter"),
    (RequestError, 400, "invalid_request_error", None),
    (InvalidKey, 401, "invalid_request_error", "invalid_api_key"),
    (ModelNotAllowed, 403, "invalid_request_error", "model_not_allowed"),
    (BudgetExceeded, 429, "insufficient_quota", "insufficient_quota"),
    (RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (NoLiveWorker, 503, "server_error", "no_live_worker"),
    (BrokerUnavailable, 503, "server_error", "broker_unavailable"),
    (JobTimeout, 504, "server_error", "job_timeout"),
    (JobFailed, 502, "server_error", "job_failed"),
    (SmmfError, 500, "server_error", None),
]


def classify(exc: SmmfError) -> tuple[int, str, str | None]:
    for cls, status, kind, code in STATUS:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", None


def error_response(status: int, message: str, kind: str, code: str | None,
                   param: str | None = None, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error; a 503 (Redis, or every worker of the model, down) and a 429 (a
    full queue, a key over its limits) also say when to try again, as clients and load
    balancers expect: `retry_after_s` where the error knows it, else RETRY_AFTER_S."""
    if status in (429, 503):
        wait = RETRY_AFTER_S if retry_after_s is None else max(1, math.ceil(retry_after_s))
        headers = {"Retry-After": str(wait), **(headers or {})}
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)
