"""Upstream accounts: what an API key at a provider allows, shared by every worker calling it.

Every call an API proxy makes first passes its account's gate (`enter`): it waits out a
cool-down that a 429 started at any worker, and, for an account with limits (`[accounts.<name>]`
with `rpm`/`tpm`), waits for room in the current minute and counts the call (model_limits.py's
windows, on the account's prefix). A 429 that says `Retry-After` starts a cool-down (`hold`)
that every worker waits out before its next call of that account, rather than meeting the 429
too. Workers count each finished job's tokens to its account's tpm (`count_tokens`).

An account is named by its `[accounts.<name>]` table, or else by its endpoint and a digest of
its key (api_proxy.account), so that models on one key share a cool-down without any config.

The state lives in Redis once a worker gave a client (`share`); until then (a provider used
outside a worker) cool-downs are this process's own and limits are not kept. A Redis error in
the gate lets the call go ahead unchecked, logged: the upstream still enforces its own limits,
and a job must not fail for bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from . import keys
from .config import AccountSettings
from .model_limits import RateWindows

log = logging.getLogger(__name__)

#: most seconds one upstream call waits for its account in all; past it the job fails with
#: UpstreamBusy (and a chat with fallbacks goes to the next model).
MAX_WAIT_S = 120.0

#: keeps an account's cool-down at least ARGV[1] ms (a later, shorter 429 does not shorten it).
_HOLD = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
"""


class UpstreamBusy(Exception):
    """The account stayed in a cool-down or over its limits for MAX_WAIT_S."""


class UpstreamAccounts:
    """Each account's cool-down and limits, in Redis once `share` gave a client."""

    def __init__(self) -> None:
        self._redis: redis.Redis | None = None
        self._limits: dict[str, AccountSettings] = {}
        self._local_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def share(self, client: redis.Redis, limits: dict[str, AccountSettings]) -> None:
        """Keep cool-downs and `limits` (by account name) in Redis, for every worker."""
        self._redis, self._limits = client, limits
        self._windows = RateWindows(client)
        self._hold = client.register_script(_HOLD)

    def enter(self, account: str) -> None:
        """Wait until `account` may be called, and count the call against its rpm."""
        waited = 0.0
        while (wait := self._wait_s(account)) > 0:
            if waited + wait > MAX_WAIT_S:
                raise UpstreamBusy(f"upstream account '{account}' stayed rate-limited for {waited:.0f} s "
                                   f"(cooling down after a 429, or over its [accounts] limits)")
            time.sleep(wait)
            waited += wait

    def hold(self, account: str, seconds: float) -> None:
        """Start (or lengthen) the account's cool-down: a 429 said to come back in `seconds`."""
        if self._redis is None:
            with self._lock:
                until = max(self._local_until.get(account, 0.0), time.monotonic() + seconds)
                self._local_until[account] = until
            return
        try:
            self._hold(keys=[keys.account_cooldown(account)], args=[max(1, int(seconds * 1000))])
        except redis.RedisError as exc:
            log.warning("cool-down of upstream account %s not shared: %s", account, exc)

    def count_tokens(self, account: str, tokens: int) -> None:
        """Add a finished job's tokens to its account's minute (accounts with a tpm only)."""
        limits = self._limits.get(account)
        if self._redis is None or limits is None or limits.tpm is None:
            return
        try:
            self._windows.count(keys.account_limits(account), tokens)
        except redis.RedisError as exc:
            log.warning("tokens not counted to upstream account %s: %s", account, exc)

    def _wait_s(self, account: str) -> float:
        """Seconds to wait before calling `account`; 0 once the call was counted."""
        if self._redis is None:
            return max(0.0, self._local_until.get(account, 0.0) - time.monotonic())
        try:
            cooling_ms = self._redis.pttl(keys.account_cooldown(account))
            if cooling_ms > 0:
                return cooling_ms / 1000
            limits = self._limits.get(account)
            if limits is None or (limits.rpm is None and limits.tpm is None):
                return 0.0
            refusal = self._windows.take(keys.account_limits(account), limits.rpm, limits.tpm)
            return 0.0 if refusal is None else float(refusal.reset_s)
        except redis.RedisError as exc:
            log.warning("upstream account %s called unchecked: %s", account, exc)
            return 0.0


#: the accounts of this process's API proxies; a worker shares them through its Redis.
ACCOUNTS = UpstreamAccounts()
