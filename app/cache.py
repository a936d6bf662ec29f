"""(5) Per-row answers from this worker's memory, then Redis; fail-open: a Redis problem is a miss, never an error."""

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.errors import StartupError

log = logging.getLogger(__name__)


# KEYS are the rows' keys; ARGV[1] is the TTL and ARGV[i + 1] the value for KEYS[i].
_STORE_SCRIPT = "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end"


class _Breaker:
    """Skip a failing operation for a back-off period; report only the transitions, not every failure."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.down = False
        self.reason = ""
        self._until = 0.0
        self._lock = threading.Lock()

    def allows(self) -> bool:
        """Whether to try now: healthy, or the back-off has passed (the next call is the probe)."""
        return not self.down or time.monotonic() >= self._until

    def failed(self, e: Exception) -> bool:
        """Start (or extend) the back-off; True if this call is the one that took it down."""
        with self._lock:
            self._until = time.monotonic() + self.seconds
            if self.down:
                return False
            self.down, self.reason = True, _describe(e)
            return True

    def succeeded(self) -> bool:
        """Close the breaker; True if this call is the one that brought it back."""
        if not self.down:
            return False
        with self._lock:
            was_down, self.down, self.reason = self.down, False, ""
            return was_down


class PredictionCache:
    """Rows in, stored answers out; circuit breakers keep a failing Redis from costing each request."""

    def __init__(
        self, url: str, ttl: int, prefix: str, timeout_ms: int, retry_seconds: float, local_entries: int = 0
    ) -> None:
        if ttl < 1:
            raise StartupError("CACHE_TTL must be at least 1 second (set CACHE_ENABLED=false to turn caching off)")
        self.url = url
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        self.enabled = bool(url)
        # Connection breaker: Redis down, slow or refusing us. Write breaker: Redis readable but refusing
        # writes (OOM under noeviction, a READONLY replica), where cached reads are still worth having.
        self._conn = _Breaker(retry_seconds)
        self._writes = _Breaker(retry_seconds)
        self._client = None
        self._pid = None
        self._store = None
        # This worker's own copy of recent answers, so a repeated row costs no round trip. An answer is a pure
        # function of its key (model sha256, backend, kind, row), so a local copy is never wrong, only kept
        # no longer than Redis would keep it.
        self.local_entries = local_entries
        # OrderedDict: dropping a plain dict's oldest key leaves tombstones that every later drop rescans
        # (3.5 ms per 1000 inserts once full, against 0.2 ms here).
        self._local: OrderedDict[str, tuple[float, object]] = OrderedDict()

    @property
    def state(self) -> str:
        """off (not configured), ok, down (serving uncached), or read-only (hits served, nothing stored)."""
        if not self.enabled:
            return "off"
        return "down" if self._conn.down else "read-only" if self._writes.down else "ok"

    @property
    def reason(self) -> str:
        """Why the cache is degraded, for /ready; never the URL (it may hold a password)."""
        return self._conn.reason or self._writes.reason

    def usable(self) -> bool:
        """Whether to try Redis now: configured, and not inside a back-off after a failure."""
        return self.enabled and self._conn.allows()

    def keys(self, scope: str, X: np.ndarray) -> list[str]:
        """One key per row: prefix + scope + a digest of the row's canonical float64 bytes."""
        # Adding 0.0 turns -0.0 into 0.0, so the two spellings of zero share a key.
        data = np.ascontiguousarray(X + 0.0).tobytes()
        width = X.shape[1] * 8
        head = f"{self.prefix}{scope}:"
        blake = hashlib.blake2b
        return [head + blake(data[i : i + width], digest_size=16).hexdigest() for i in range(0, len(data), width)]

    def lookup(self, keys: list[str], valid: Callable[[object], bool]) -> tuple[list, bool]:
        """Answers for keys (None where absent) from this worker's memory, then Redis; and whether Redis answered.

        A stored value that doesn't decode, or that `valid` rejects (another version's format), is a miss.
        """
        now = time.monotonic()
        local = self._local
        values = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            entry = local.get(key)
            if entry is not None and entry[0] > now:
                values[i] = entry[1]
            else:
                missing.append(i)
        if not missing:
            return values, True
        stored = self.get_many([keys[i] for i in missing])
        if stored is None:
            return values, False
        for i, raw in zip(missing, stored):
            if raw is not None:
                value = _decode(raw)
                if value is not None and valid(value):
                    values[i] = value
                    self._remember(keys[i], value, now)
        return values, True

    def store(self, items: list[tuple[str, object]]) -> None:
        """Keep fresh answers in this worker's memory and in Redis (one round trip)."""
        now = time.monotonic()
        for key, value in items:
            self._remember(key, value, now)
        self.set_many(items)

    def _remember(self, key: str, value: object, now: float) -> None:
        """Add to the local copy, dropping the oldest entry when full."""
        if not self.local_entries:
            return
        local = self._local
        while len(local) >= self.local_entries:
            try:
                local.popitem(last=False)
            except KeyError:  # another thread emptied it first
                break
        local[key] = (now + self.ttl, value)

    def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """Stored values in key order in one round trip, or None when Redis can't be used."""
        if not self.usable():
            return None
        try:
            values = self._redis().mget(keys)
        except (redis.RedisError, OSError) as e:
            self._failed(self._conn, e)
            return None
        self._succeeded(self._conn)
        return values

    def set_many(self, items: list[tuple[str, object]]) -> None:
        """Store answers with the TTL in one command and one round trip; failures only open a breaker."""
        if not items or not self.usable() or not self._writes.allows():
            return  # checked before encoding: a dead Redis costs no work per request
        keys, values = zip(*items)
        try:
            self._store(keys=keys, args=[self.ttl, *map(orjson.dumps, values)], client=self._redis())
        except redis.ResponseError as e:  # Redis answered, but refused the write
            self._failed(self._writes, e)
            return
        except (redis.RedisError, OSError) as e:
            self._failed(self._conn, e)
            return
        self._succeeded(self._writes)

    def check(self) -> str:
        """Probe Redis for /ready (respecting the back-off) and return the state."""
        if self.usable():
            try:
                self._redis().ping()
                self._succeeded(self._conn)
            except (redis.RedisError, OSError) as e:
                self._failed(self._conn, e)
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
            # One EVALSHA sets every row with its TTL: a pipeline of N SETs costs 5x more in redis-py's packing.
            self._store = self._client.register_script(_STORE_SCRIPT)
            self._pid = os.getpid()
        return self._client

    def _failed(self, breaker: _Breaker, e: Exception) -> None:
        """Open a breaker, logging only the transition."""
        if breaker.failed(e):
            what = "cache down, serving uncached" if breaker is self._conn else "cache writes refused, not storing"
            log.warning("%s; retrying every %.0fs: %s", what, breaker.seconds, breaker.reason)

    def _succeeded(self, breaker: _Breaker) -> None:
        """Close a breaker, logging only the recovery."""
        if breaker.succeeded():
            log.warning("cache back up, caching resumed" if breaker is self._conn else "cache writes accepted again")


def _decode(raw: bytes) -> object:
    """A stored answer, or None when it isn't JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _describe(e: Exception) -> str:
    """A one-line reason for a Redis failure with nothing secret in it."""
    if isinstance(e, redis.AuthenticationError) or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
        return "authentication failed (check the user and password in REDIS_URL)"
    if isinstance(e, redis.TimeoutError):
        return "Redis did not answer in time (CACHE_TIMEOUT_MS)"
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:200]}"
