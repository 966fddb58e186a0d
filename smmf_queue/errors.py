"""One error tree for smmf-queue, so callers catch by meaning, not by origin.

    SmmfError
    ├── ConfigError                       a config file is malformed
    ├── RequestError                      the request itself is wrong (a 4xx)
    │   ├── UnknownModel
    │   ├── UnknownJob
    │   ├── UnsupportedParameter
    │   └── WrongModelKind
    ├── DispatchError                     the job could not be handed to a worker
    │   ├── BrokerUnavailable
    │   ├── NoLiveWorker
    │   └── QueueFull                     the model's queue is at max_queue_depth
    ├── JobError                          the job was taken but did not succeed
    │   ├── JobFailed
    │   └── JobTimeout (also a TimeoutError)
    └── ProviderUnavailable               a worker cannot serve a model on this host

Errors carry `model` and `job_id` where they know them. Messages never contain an API key or a
prompt: they cross the wire and land in logs and in Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def validation_message(error: Mapping[str, Any]) -> str:
    """One pydantic error's message, without the "Value error, " pydantic puts before the words
    of our own validators (json_types.JsonBody, the config's checks)."""
    return str(error["msg"]).removeprefix("Value error, ")


class SmmfError(Exception):
    """Root of every error smmf-queue raises on purpose."""

    def __init__(self, message: str, *, model: str | None = None, job_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.model = model
        self.job_id = job_id


class ConfigError(SmmfError):
    """Raised when a config file cannot be read, parsed or validated; the message names the file and key."""


class RequestError(SmmfError):
    """Raised when a request is invalid before anything is enqueued."""


class UnknownModel(RequestError):
    """Raised when a request names a model that the config does not define."""


class UnknownJob(RequestError):
    """Raised when a replay names a job that Redis holds nothing of: never taken by a worker,
    or its event log expired."""


class UnsupportedParameter(RequestError):
    """Raised when a request asks for something its model cannot honour (e.g. `tools` of a model
    whose provider has no tool calling): refused rather than silently ignored. `param` names it."""

    def __init__(self, message: str, *, param: str, model: str | None = None):
        super().__init__(message, model=model)
        self.param = param


class WrongModelKind(RequestError):
    """Raised when a chat goes to an embedding model or an embedding to an LLM."""


class UnknownKey(RequestError):
    """Raised when an admin call names a virtual key that does not exist (never made, or revoked)."""


class KeyAliasTaken(RequestError):
    """Raised when an admin call gives a virtual key an alias another key has."""


class InvalidKey(SmmfError):
    """Raised when a request's API key is unknown, revoked or expired (virtual_keys.py)."""


class ModelNotAllowed(SmmfError):
    """Raised when a virtual key may not call the model a request names."""


class RateLimited(SmmfError):
    """Raised when a virtual key or a model is over its requests or tokens per minute: nothing
    was enqueued; try again after `retry_after_s`. `headers`: OpenAI's `x-ratelimit-*` values."""

    def __init__(self, message: str, *, retry_after_s: float, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class BudgetExceeded(RateLimited):
    """Raised when a virtual key has used its token budget for the current period."""


class DispatchError(SmmfError):
    """Raised when a job cannot be handed to the queues."""


class BrokerUnavailable(DispatchError):
    """Raised when Redis (or the broker) cannot be reached."""


class NoLiveWorker(DispatchError):
    """Raised, when the caller asks to fail fast, if no live worker serves the model."""


class QueueFull(DispatchError):
    """Raised when a model's queue holds `max_queue_depth` jobs already: nothing was enqueued;
    try again after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float, model: str | None = None):
        super().__init__(message, model=model)
        self.retry_after_s = retry_after_s


class JobError(SmmfError):
    """Raised when an accepted job did not produce a result."""


class JobFailed(JobError):
    """Raised when the worker reported an error; `error_type` is the provider-side class of it."""

    def __init__(self, message: str, *, error_type: str = "JobFailed", model: str | None = None,
                 job_id: str | None = None):
        super().__init__(message, model=model, job_id=job_id)
        self.error_type = error_type


class JobTimeout(JobError, TimeoutError):
    """Raised when a job's result did not arrive within the caller's timeout (it may still run)."""


class ProviderUnavailable(SmmfError):
    """Raised when a provider cannot run here: wrong hardware, or its package is not installed."""
