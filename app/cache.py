"""(5) Per-row Redis lookup and store, fail-open: a Redis problem is a miss, never an error."""

import hashlib
import logging
import os
import threading
import time

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


class PredictionCache:
    """Rows in, stored answers out; a circuit breaker keeps a dead Redis from costing each request."""

    def __init__(self, url: str, ttl: int, prefix: str, timeout_ms: int, retry_seconds: float) -> None:
        self.url = url
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        self.retry_seconds = retry_seconds
        self.enabled = bool(url)
        self.reason = ""  # why Redis is down, for /ready and the log; never the URL (it may hold a password)
        self._down_until = 0.0
        self._down = False
        self._client = None
        self._pid = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """off (not configured), ok, or down (serving uncached until the next probe)."""
        return "off" if not self.enabled else "down" if self._down else "ok"

    def usable(self) -> bool:
        """Whether to try Redis now: configured, and not inside a back-off after a failure."""
        return self.enabled and (not self._down or time.monotonic() >= self._down_until)

    def keys(self, scope: str, X: np.ndarray) -> list[str]:
        """One key per row: prefix + scope + a digest of the row's canonical float64 bytes."""
        # Adding 0.0 turns -0.0 into 0.0, so the two spellings of zero share a key.
        data = np.ascontiguousarray(X + 0.0).tobytes()
        width = X.shape[1] * 8
        head = f"{self.prefix}{scope}:"
        blake = hashlib.blake2b
        return [head + blake(data[i : i + width], digest_size=16).hexdigest() for i in range(0, len(data), width)]

    def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """Stored values in key order in one round trip, or None when Redis can't be used."""
        if not self.usable():
            return None
        try:
            values = self._redis().mget(keys)
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return None
        self._recovered()
        return values

    def set_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store values with the TTL in one pipelined round trip; failures only open the breaker."""
        if not items or not self.usable():
            return
        try:
            pipe = self._redis().pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=self.ttl)
            pipe.execute()
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return
        self._recovered()

    def check(self) -> str:
        """Probe Redis for /ready (respecting the back-off) and return the state."""
        if self.usable():
            try:
                self._redis().ping()
                self._recovered()
            except (redis.RedisError, OSError) as e:
                self._failed(e)
        return self.state

    def _redis(self) -> redis.Redis:
        """The client for this process; made after fork so workers never share a socket."""
        if self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # No retries: one timeout per breaker period is all a dead Redis may cost.
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self._pid = os.getpid()
        return self._client

    def _failed(self, e: Exception) -> None:
        """Open the breaker; log only the transition to down, not every failed request."""
        with self._lock:
            self._down_until = time.monotonic() + self.retry_seconds
            if self._down:
                return
            self._down = True
            self.reason = _describe(e)
        log.warning("cache down, serving uncached; retrying every %.0fs: %s", self.retry_seconds, self.reason)

    def _recovered(self) -> None:
        """Close the breaker after a successful call, logging the recovery once."""
        if self._down:
            with self._lock:
                if not self._down:
                    return
                self._down, self.reason = False, ""
            log.warning("cache back up, caching resumed")


def _describe(e: Exception) -> str:
    """A one-line reason for a Redis failure with nothing secret in it."""
    if isinstance(e, redis.AuthenticationError) or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
        return "authentication failed (check the user and password in REDIS_URL)"
    if isinstance(e, redis.TimeoutError):
        return "Redis did not answer in time (CACHE_TIMEOUT_MS)"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
