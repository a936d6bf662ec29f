"""(5) Per-row answers from this worker's memory, then Redis; fail-open: a Redis problem is a miss, never an error."""

import functools
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

import hiredis
import numpy as np
import orjson
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

log = logging.getLogger(__name__)


# A batch's store: KEYS are the rows' keys; ARGV[1] is the TTL and ARGV[i + 1] the value for KEYS[i]. Sent with
# EVAL (Redis caches the compiled script by its digest), so a restarted Redis never answers NOSCRIPT to a store
# nobody waits for. One row is a plain SET, which costs Redis a third of the script's time.
_STORE_SCRIPT = b"for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end"
# Stores of more rows than this are sent at once: Redis takes about 2 us a row to run one, and a lookup
# queued behind it in the same write would wait that long, for a saving of one send (about 50 us).
_QUEUE_MAX_ROWS = 16
# Store replies a connection may owe before a store reads them: bounds what a run of lookup-free requests
# (Cache-Control: no-cache) leaves in the socket.
_MAX_UNREAD = 32
# A stored value is "<expiry: unix time in ms, 13 digits> <answer as JSON>". A worker that fetches it keeps its
# local copy until then, so the copy never outlives Redis's (which expires CACHE_TTL after the SET, a little later).
_HEAD = len(b"1733090000123 ")


# The stored value's format, in every key: replicas of another Sibyl release (a rolling upgrade) keep separate
# entries instead of overwriting each other's as unreadable.
_FORMAT = "v2"


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

    def failed(self, reason: str) -> bool:
        """Start (or extend) the back-off; True if this call is the one that took it down."""
        with self._lock:
            self._until = time.monotonic() + self.seconds
            if self.down:
                return False
            self.down, self.reason = True, reason
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
        self,
        url: str,
        ttl: int,
        prefix: str,
        timeout_ms: int,
        retry_seconds: float,
        local_entries: int = 0,
        store_delay_ms: float = 0,
        local_bytes: int = 64 * 1024 * 1024,
        per_user: bool = False,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        # How long a store may wait for this thread's next command to carry it (0: send each store at once).
        self.store_delay = store_delay_ms / 1000
        self.enabled = bool(url)
        # CACHE_SCOPE=user: each user's rows have their own keys, so a HIT never says someone else sent the row.
        self.per_user = per_user
        # Connection breaker: Redis down, slow or refusing us. Write breaker: Redis readable but refusing
        # writes (OOM under noeviction, a READONLY replica), where cached reads are still worth having.
        self._conn = _Breaker(retry_seconds)
        self._writes = _Breaker(retry_seconds)
        self._pool = None
        self._pid = None
        self._links = threading.local()
        self._link_set: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._flusher: _Flusher | None = None
        self._flusher_lock = threading.Lock()
        # This worker's own copy of recent answers, so a repeated row costs no round trip. An answer is a pure
        # function of its key (model sha256, backend, kind, row), so a local copy is never wrong, only kept
        # no longer than Redis keeps it. Bounded in entries and in bytes (keys and stored values): a 1,000-class
        # model's probabilities are about 20 kB a row. Values are kept encoded, as Redis holds them, so the byte
        # count is what they weigh; a hit decodes its row (about 0.2 us for iris probabilities).
        self.local_entries = local_entries if local_bytes else 0
        self.local_bytes = local_bytes
        # OrderedDict: least recently used first; dropping a plain dict's oldest key leaves tombstones that every
        # later drop rescans (3.5 ms per 1000 inserts once full, against 0.2 ms here).
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._local_size = 0  # bytes of its keys and values
        self._local_lock = threading.Lock()  # threaded workers: the size must stay the sum of what is held

    @property
    def state(self) -> str:
        """off (not configured), ok, down (serving uncached), or read-only (hits served, nothing stored)."""
        if not self.enabled:
            return "off"
        return "down" if self._conn.down else "read-only" if self._writes.down else "ok"

    @property
    def reason(self) -> str:
        """Why the cache is degraded, for the unauthenticated /ready: auth, timeout, down or read-only (the log
        has redis-py's message, which names hosts, ports and socket paths)."""
        return self._conn.reason or self._writes.reason

    def usable(self) -> bool:
        """Whether to try Redis now: configured, and not inside a back-off after a failure."""
        return self.enabled and self._conn.allows()

    def keys(self, scope: str, X: np.ndarray, user: str | None = None) -> list[str]:
        """One key per row: prefix + scope (+ the user's digest, per-user scope) + a digest of the row's canonical
        float64 bytes."""
        if self.per_user:
            scope = f"{scope}:u{_user_digest(user or '')}"
        # Adding 0.0 turns -0.0 into 0.0, so the two spellings of zero share a key.
        data = np.ascontiguousarray(X + 0.0).tobytes()
        width = X.shape[1] * 8
        head = f"{self.prefix}{_FORMAT}:{scope}:"
        blake = hashlib.blake2b
        return [head + blake(data[i : i + width], digest_size=16).hexdigest() for i in range(0, len(data), width)]

    def lookup(self, keys: list[str], valid: Callable[[object], bool], remember: bool = True) -> tuple[list, bool]:
        """Answers for keys (None where absent) from this worker's memory, then Redis; and whether Redis answered.

        A stored value that doesn't decode, or that `valid` rejects (another version's format), is a miss. Rows
        fetched from Redis are kept locally unless remember is False (Cache-Control: no-store).
        """
        now = time.monotonic()
        local = self._local
        values = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            entry = local.get(key)
            if entry is not None and entry[0] > now:
                values[i] = orjson.loads(entry[1][_HEAD:])
                # Least recently used goes first. try, not contextlib.suppress: 24 ns a hit against 330.
                try:  # noqa: SIM105
                    local.move_to_end(key)
                except KeyError:  # another thread dropped it meanwhile
                    pass
            else:
                missing.append(i)
        if not missing:
            return values, True
        stored = self.get_many([keys[i] for i in missing])
        if stored is None:
            return values, False
        found, wall = [], time.time()
        for i, raw in zip(missing, stored):
            if raw is not None:
                expires, value = _decode(raw)
                if value is not None and valid(value):
                    values[i] = value
                    if expires > wall:
                        found.append((keys[i], now + expires - wall, raw))
        if remember:
            self._remember(found)
        return values, True

    def store(self, items: list[tuple[str, object]]) -> None:
        """Keep fresh answers in this worker's memory and send them to Redis (its reply is read later)."""
        send = self.usable() and self._writes.allows()
        if not items or not (send or self.local_entries):
            return  # checked before encoding: a dead Redis costs no work per request
        # The concatenation copies each answer out of orjson's 1 KiB buffer: kept alive by the thousand (a batch's
        # command, the local tier) those cost 1.9 us each to allocate and 1 KiB each to hold.
        head = b"%013d " % ((time.time() + self.ttl) * 1000)
        encoded = [(key, head + orjson.dumps(value)) for key, value in items]
        if self.local_entries:
            expires = time.monotonic() + self.ttl
            self._remember([(key, expires, raw) for key, raw in encoded])
        if send:
            self.set_many(encoded)
            if os.environ.get("SIBYL_CACHE_SYNC"):  # TEMPORARY (issue 9): wait for the store's reply before answering
                self.settle()

    def _remember(self, entries: list[tuple[str, float, bytes]]) -> None:
        """Add (key, expires, stored value) entries to the local copy, then drop the least recently used while it
        holds more than local_entries entries or local_bytes bytes."""
        if not self.local_entries or not entries:
            return
        local = self._local
        with self._local_lock:
            for key, expires, raw in entries:
                old = local.pop(key, None)  # popped, not overwritten: a new entry goes last
                if old is not None:
                    self._local_size -= len(key) + len(old[1])
                local[key] = (expires, raw)
                self._local_size += len(key) + len(raw)
            while len(local) > self.local_entries or self._local_size > self.local_bytes:
                key, (_, raw) = local.popitem(last=False)
                self._local_size -= len(key) + len(raw)

    def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """Stored values in key order in one round trip, or None when Redis can't be used."""
        if not self.usable():
            return None
        try:
            values = self._call(b"MGET", *keys)
        except (redis.RedisError, OSError) as e:
            self._failed(self._conn, e)
            return None
        self._succeeded(self._conn)
        return values

    def set_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store encoded answers with the TTL as one command, without waiting for its reply (read by this connection's
        next call). A small store waits up to store_delay for that call to carry it in the same write, which
        saves a send and a Redis wake-up per miss; the flusher sends it if no call comes. Failures only open
        a breaker."""
        if not items or not self.usable() or not self._writes.allows():
            return
        if len(items) == 1:
            ((key, value),) = items
            command = (b"SET", key, value, b"EX", self.ttl)
        else:
            keys, values = zip(*items)
            command = (b"EVAL", _STORE_SCRIPT, len(keys), *keys, self.ttl, *values)
        try:
            link = self._link()
        except redis.RedisError as e:
            self._failed(self._conn, e)
            return
        with link.lock:
            try:
                if link.unread + len(link.queued) >= _MAX_UNREAD:
                    self._send(link)
                    self._settle(link)
                if not link.queued:
                    link.since = time.monotonic()
                link.queued.append(hiredis.pack_command(command))
                if not self.store_delay or len(items) > _QUEUE_MAX_ROWS:
                    self._send(link)
            except (redis.RedisError, OSError) as e:
                self._lost(link, e)
                return
        if link.queued:
            self._flusher_for_this_process().wake()

    def settle(self) -> None:
        """Send this thread's queued stores and read the replies to all it sent: afterwards they are in Redis."""
        try:
            link = self._link()
        except redis.RedisError as e:
            self._failed(self._conn, e)
            return
        with link.lock:
            try:
                self._send(link)
                self._settle(link)
            except (redis.RedisError, OSError) as e:
                self._lost(link, e)

    def check(self) -> str:
        """Probe Redis for /ready (respecting the back-off) and return the state."""
        if self.usable():
            try:
                self._call(b"PING")
                self._succeeded(self._conn)
            except (redis.RedisError, OSError) as e:
                self._failed(self._conn, e)
        return self.state

    def _link(self) -> "_Link":
        """This thread's connection; made after fork, so workers never share a socket. Any failure to set it up
        (a URL redis-py refuses, a bad TLS option) is a redis.ConnectionError: the cache is down, not the request."""
        link = getattr(self._links, "link", None) if self._pid == os.getpid() else None
        if link is not None:
            return link
        try:
            if self._pid != os.getpid():
                self._pool = redis.ConnectionPool.from_url(
                    self.url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    # No retries: one timeout per breaker period is all a dead Redis may cost.
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                )
                self._links = threading.local()
                self._link_set = weakref.WeakSet()
                self._flusher = None  # threads don't survive a fork
                self._pid = os.getpid()
            link = self._links.link = _Link(self._pool.make_connection())
        except Exception as e:
            raise redis.ConnectionError(f"cannot set up a Redis connection: {_describe(e)}") from e
        self._link_set.add(link)  # weak: a finished thread's link goes with it
        return link

    def _flusher_for_this_process(self) -> "_Flusher":
        """The thread that sends stores no request carried; started on first use in each process."""
        if self._flusher is None:
            with self._flusher_lock:
                if self._flusher is None:
                    self._flusher = _Flusher(self)
                    self._flusher.start()
        return self._flusher

    def flush(self, waited: float = 0.0) -> bool:
        """Send every thread's queued stores that have waited `waited` seconds (all of them by default, as a
        worker exits); True while some are still waiting."""
        now, waiting = time.monotonic(), False
        for link in list(self._link_set):
            if not link.queued:
                continue
            # A busy link's owner is talking to Redis and takes its queue along; try again next round.
            if now - link.since < waited or not link.lock.acquire(blocking=False):
                waiting = True
                continue
            try:
                self._send(link)
            except (redis.RedisError, OSError) as e:
                self._lost(link, e)
            finally:
                link.lock.release()
        return waiting

    def _call(self, *args: bytes | str) -> object:
        """One command and its reply, sent with this thread's queued stores, after the replies it still owes."""
        link = self._link()
        with link.lock:
            while True:
                try:
                    self._send(link, hiredis.pack_command(args))
                    self._settle(link)
                    reply = link.conn.read_response()
                except redis.ResponseError:
                    raise  # an answer: the connection is fine
                except (redis.RedisError, OSError) as e:
                    if self._lost(link, e, report=False):
                        continue  # reconnect once, as redis-py would
                    raise
                link.used = True
                return reply

    @staticmethod
    def _send(link: "_Link", command: bytes = b"") -> None:
        """Write the queued stores and then command, in one write; their replies are owed from then on."""
        if link.queued or command:
            # join returns a lone command itself: a big MGET is not copied when nothing is queued.
            link.conn.send_packed_command([b"".join([*link.queued, command])])
            link.unread += len(link.queued)
            link.queued.clear()

    def _settle(self, link: "_Link") -> None:
        """Read the replies to earlier stores: a refused one opens the write breaker, an accepted one closes it."""
        while link.unread:
            try:
                link.conn.read_response()
            except redis.ResponseError as e:  # Redis answered, but refused the write (OOM, READONLY)
                link.unread -= 1
                self._failed(self._writes, e)
                continue
            link.unread -= 1
            self._succeeded(self._writes)

    def _lost(self, link: "_Link", e: Exception, report: bool = True) -> bool:
        """Drop a connection that failed mid-conversation (its queued stores and unread replies with it), and
        open the breaker unless the server had merely closed it while idle; True in that case (reconnect)."""
        # One that answered before and now fails at once (not a timeout) was closed by a restart, a failover
        # or Redis's `timeout`: not an outage, the next call reconnects.
        stale = link.used and not isinstance(e, redis.TimeoutError)
        link.conn.disconnect()
        link.unread, link.used = 0, False
        link.queued.clear()
        if report and not stale:
            self._failed(self._conn, e)
        return stale

    def _failed(self, breaker: _Breaker, e: Exception) -> None:
        """Open a breaker with a coarse reason, logging only the transition, with the detail."""
        if breaker.failed(_reason(e) if breaker is self._conn else "read-only"):
            what = "cache down, serving uncached" if breaker is self._conn else "cache writes refused, not storing"
            log.warning("%s; retrying every %.0fs: %s", what, breaker.seconds, _describe(e))

    def _succeeded(self, breaker: _Breaker) -> None:
        """Close a breaker, logging only the recovery."""
        if breaker.succeeded():
            log.warning("cache back up, caching resumed" if breaker is self._conn else "cache writes accepted again")


class _Link:
    """One thread's connection to Redis: stores not sent yet, and how many replies it has not read yet."""

    def __init__(self, conn: redis.Connection) -> None:
        self.conn = conn
        self.unread = 0
        self.used = False  # answered before: a later instant failure means the server dropped it
        self.queued: list[bytes] = []  # packed store commands waiting for the next write
        self.since = 0.0  # when the oldest of them was queued
        self.lock = threading.Lock()  # the owning thread and the flusher both write to conn


class _Flusher(threading.Thread):
    """Sends stores that waited store_delay with no command to carry them (an idle worker's last misses).

    Asleep while nothing waits; under load it wakes once per store_delay and finds the queues already sent."""

    def __init__(self, cache: PredictionCache) -> None:
        super().__init__(name="sibyl-cache-flusher", daemon=True)
        self.cache = cache
        self._wakeup = threading.Event()

    def wake(self) -> None:
        """Something was queued: make sure a round is coming (costs nothing when one already is)."""
        if not self._wakeup.is_set():
            self._wakeup.set()

    def run(self) -> None:
        """Sleep until woken, then send what waited long enough, for as long as anything waits."""
        while True:
            self._wakeup.wait()
            time.sleep(self.cache.store_delay)
            # Cleared before looking: a store queued during the round either is seen or sets the event again.
            self._wakeup.clear()
            try:
                waiting = self.cache.flush(self.cache.store_delay)
            except Exception:  # a dead flusher would leave every idle worker's last stores unsent, silently
                log.exception("cache flusher failed; the stores it held go out with the next request")
                waiting = False
            if waiting:
                self._wakeup.set()


def _decode(raw: bytes) -> tuple[float, object]:
    """A stored value's expiry (unix seconds) and answer; (0, None) when it is in another format."""
    if raw[_HEAD - 1 : _HEAD] != b" " or not raw[: _HEAD - 1].isdigit():
        return 0.0, None
    try:
        return int(raw[: _HEAD - 1]) / 1000, orjson.loads(raw[_HEAD:])
    except orjson.JSONDecodeError:
        return 0.0, None


@functools.lru_cache(maxsize=4096)
def _user_digest(user: str) -> str:
    """A short digest of a user name for keys: names stay out of Redis, and any name makes a safe key part."""
    return hashlib.blake2b(user.encode(), digest_size=8).hexdigest()


def _reason(e: Exception) -> str:
    """A connection failure's reason from a fixed vocabulary (auth, timeout, down), safe for anyone to read."""
    if isinstance(e, redis.AuthenticationError | NoPermissionError) or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
        return "auth"
    return "timeout" if isinstance(e, redis.TimeoutError) else "down"


def _describe(e: Exception) -> str:
    """A one-line reason for a Redis failure, for the log: never the password, but hosts and paths, yes."""
    reason = _reason(e)
    if reason == "auth":
        return "authentication failed (check the user and password in REDIS_URL)"
    if reason == "timeout":
        return "Redis did not answer in time (CACHE_TIMEOUT_MS)"
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:200]}"
