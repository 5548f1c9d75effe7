"""The cache's shared tier: a Redis server that several replicas (hosts) read and write, behind
the same three-method interface as the disk store (cache.CacheStore), and a two-tier store
that keeps each host's disk in front of it.

Consistency model: entries are immutable and content-addressed (a key names exactly one value),
so there is nothing to invalidate; a reader sees an entry whole or not at all (one SET of a
sealed value, checked on read: a damaged value is deleted and recomputed, never served). Locks
keep two replicas from fitting the same LoRA at once: a Redis lock per key, leased and renewed
while held, so a replica that dies releases it within one lease. Redis is an accelerator, never
a dependency: when it is down or slow, every operation falls back to the local tier (a miss, a
local-only write, a host-local lock), the failure is counted (`RemoteStatus`) and retried after
a back-off, and no request fails for it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from morph_protocol import limits

from .cache import CacheStore, _check_key, seal, unseal, wait_for_lock
from .interrupt import MorphStopped, StopCheck, never_stop

logger = logging.getLogger(__name__)

KEY_PREFIX = "diffmorpher:cache:"
LOCK_PREFIX = "diffmorpher:lock:"


@dataclass
class RemoteStatus:
    """What the shared tier did, for metrics and result metadata: `state` "ok" or "down"."""

    errors: int = 0  # operations that failed (connection refused, timeout, ...)
    hits: int = 0  # entries read from the shared tier (missing locally)
    down_until: float = 0.0  # monotonic time before which the tier is not tried again
    last_error: str = ""

    @property
    def state(self) -> str:
        return "down" if time.monotonic() < self.down_until else "ok"


@dataclass
class RedisStore:
    """Sealed entries in Redis, at most `max_entry_bytes` each (larger ones stay local); the
    server's `maxmemory` with an LRU policy caps the total (deploy/ and the tests set it).
    Every call raises the client's errors; TieredStore decides what a failure means."""

    url: str = field(repr=False)  # may carry a password
    max_entry_bytes: int = limits.CACHE_REDIS_MAX_ENTRY_BYTES
    lock_lease_s: float = 60.0
    lock_wait_s: float = 3600.0
    socket_timeout_s: float = 5.0
    client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.client is None:
            import redis  # only where a shared tier is configured

            self.client = redis.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout_s, socket_connect_timeout=self.socket_timeout_s
            )

    @property
    def where(self) -> str:
        """The server's address without credentials, for logs."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"

    def get(self, key: str) -> bytes | None:
        entry = self.client.get(KEY_PREFIX + _check_key(key))
        if entry is None:
            return None
        data = unseal(bytes(entry))
        if data is None:
            logger.warning("shared cache entry %s is damaged; removed, it will be recomputed", key)
            self.client.delete(KEY_PREFIX + key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_entry_bytes:
            logger.info("cache entry %s (%d bytes) exceeds the shared tier's entry cap; kept locally", key, len(data))
            return
        self.client.set(KEY_PREFIX + _check_key(key), seal(data))

    @contextlib.contextmanager
    def lock(self, key: str, stop: StopCheck = never_stop) -> Iterator[None]:
        """A leased lock (SET NX PX with a token), renewed every third of the lease while held;
        released only by its holder (compare-and-delete), and gone by itself within a lease of
        a holder's death (the key expires: nothing to clean up). A waiter asks `stop` between
        tries (cache.wait_for_lock)."""
        name, token = LOCK_PREFIX + _check_key(key), uuid.uuid4().hex
        lease_ms = int(self.lock_lease_s * 1000)
        wait_for_lock(lambda: bool(self.client.set(name, token, nx=True, px=lease_ms)), key, stop, self.lock_wait_s)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(name, token, lease_ms, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self._release(name, token)

    def _renew(self, name: str, token: str, lease_ms: int, stop: threading.Event) -> None:
        while not stop.wait(lease_ms / 3000):
            try:
                self.client.eval(_RENEW, 1, name, token, lease_ms)
            except Exception as error:  # noqa: BLE001 - the lease then lapses; the work goes on
                logger.warning("could not renew shared cache lock %s: %s", name, error)

    def _release(self, name: str, token: str) -> None:
        try:
            self.client.eval(_RELEASE, 1, name, token)
        except Exception as error:  # noqa: BLE001 - the lease lapses by itself
            logger.warning("could not release shared cache lock %s: %s", name, error)


# Lua, run atomically by Redis: only the holder (same token) extends or deletes its lock.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class TieredStore:
    """The host's disk store in front of a shared store: reads try the disk, then the shared
    tier (copying a shared hit to disk); writes go to both; locks hold the host's lock and the
    shared one. A failing shared tier is skipped for `retry_after_s` and counted."""

    def __init__(self, local: CacheStore, remote: CacheStore, retry_after_s: float = 30.0) -> None:
        self.local = local
        self.remote = remote
        self.retry_after_s = retry_after_s
        self.status = RemoteStatus()

    def __repr__(self) -> str:
        return f"TieredStore(local={self.local!r}, remote={getattr(self.remote, 'where', type(self.remote).__name__)})"

    def get(self, key: str) -> bytes | None:
        data = self.local.get(key)
        if data is not None:
            return data
        data = self._remote("get", lambda: self.remote.get(key))
        if data is not None:
            self.status.hits += 1
            self.local.put(key, data)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.local.put(key, data)
        self._remote("put", lambda: self.remote.put(key, data))

    @contextlib.contextmanager
    def lock(self, key: str, stop: StopCheck = never_stop) -> Iterator[None]:
        with self.local.lock(key, stop), contextlib.ExitStack() as stack:
            self._remote("lock", lambda: stack.enter_context(self.remote.lock(key, stop)))
            yield

    def _remote(self, operation: str, call: Any) -> Any:
        if self.status.state == "down":
            return None
        try:
            return call()
        except (TimeoutError, MorphStopped):
            raise  # a lock another replica holds too long, or the request stopped waiting: not a tier failure
        except Exception as error:  # noqa: BLE001 - any client failure: serve from the local tier
            self.status.errors += 1
            self.status.down_until = time.monotonic() + self.retry_after_s
            self.status.last_error = f"{type(error).__name__}: {error}"
            logger.warning("shared cache tier failed on %s (%s); local tier only for %.0f s",
                           operation, self.status.last_error, self.retry_after_s)
            return None
