"""(5) Per-row answers from this worker's memory, then Redis; fail-open: a Redis problem is a miss, never an error."""

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain

import hiredis
import numpy as np
import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    NoPermissionError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

from app import process
from config import SENTINEL_SCHEMES, sentinel_url

log = logging.getLogger(__name__)


# A batch's store in a Redis that doesn't evict by itself: KEYS are the rows' keys; ARGV[1] is the TTL and ARGV[i + 1]
# the value for KEYS[i]. One EVAL (Redis caches the compiled script by its digest, and a restarted Redis never answers
# NOSCRIPT): redis-py spends 8.8 ms of CPU on a 1000-SET pipeline against 1.5 ms on this one command
# (docs/benchmark.md). A Redis that evicts gets one MSET instead: about half the Redis CPU per row (README, Cache).
_STORE_SCRIPT = "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end"
# A stored value is "<expiry: unix time in ms, 13 digits> <answer as JSON>". A worker that fetches it keeps its
# local copy until then, so the copy never outlives Redis's (which expires CACHE_TTL after the SET, a little later).
_HEAD = len(b"1733090000123 ")


# The stored value's format, in every key: replicas of another Sibyl release (a rolling upgrade) keep separate
# entries instead of overwriting each other's as unreadable. v3: a value past its expiry is a miss (MSET sets none).
# v4: the scope is in the row's digest, not spelled out in the key.
_FORMAT = "v4"

# What a failed Redis call raises: redis-py's errors, socket errors, and the cluster client's own exception (no node
# reachable, a slot no node serves), which is not a RedisError.
_FAILURES = (redis.RedisError, OSError, RedisClusterException)
# Cluster replies that are ResponseErrors but say the cluster's layout changed (MOVED, ASK, TRYAGAIN), it is down, or
# a command spans slots (a plain client on a cluster node): the cache is out of reach, not refusing writes.
_LAYOUT = (AskError, TryAgainError, ClusterDownError, ClusterCrossSlotError)


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


# The worker's tier keeps and serves the answers of requests of up to this many rows only. Repeated small requests are
# what it saves a round trip for; a batch of new rows would pay its copies (about 0.5 us a row, and a batch's rows
# push out the small requests' answers) for rows Redis holds anyway. A model whose tiers are "local" (CACHE_POLICY=auto
# found its rows cheaper than a Redis round trip) skips the cache for larger requests: there the digests alone cost
# more than the model takes to predict a row of a batch (1 to 6 us, compiled) (docs/benchmark.md).
LOCAL_MAX_ROWS = 8


class Worth:
    """Whether this worker's tier pays for a scope (a model, its backend, labels or probabilities): judged from
    its hit rate.

    A miss costs the tier a digest, a lookup, an encoding and an evicting insert: about 10 us in process, 28-36 us
    of a worker's CPU under load (docs/benchmark.md), as much as a compiled model's one-row predict (what a hit
    saves where the tier is a model's only one) and a fraction of a Redis round trip (what it saves in front of
    Redis). So, where the tier is a model's only one, while fewer than MIN_HIT_RATE of the rows looked up in it are
    hits, only one request in SAMPLE_EVERY uses the tier; the others are served uncached. The samples keep storing
    and looking up, so rows that start repeating are found again and the tier is used for every request once the
    samples' hit rate is back. Counts are per worker and only approximate under threads (an unlocked count may lose
    an increment): a judgement, not a ledger.
    """

    MIN_HIT_RATE = 0.25
    SAMPLE_EVERY = 16
    WINDOW_ROWS = 256  # rows looked up per judgement while the tier is used for every request
    SAMPLE_ROWS = 64  # rows looked up per judgement while sampling (about SAMPLE_EVERY times as many requests)

    def __init__(self) -> None:
        self.sampling = False
        self._requests = self._rows = self._hits = 0

    def use(self) -> bool:
        """Whether this request goes through the tier."""
        if not self.sampling:
            return True
        self._requests += 1
        return self._requests % self.SAMPLE_EVERY == 0

    def saw(self, rows: int, hits: int) -> None:
        """Count a request's rows looked up in the tier and how many it held; judge at the end of a window."""
        self._rows += rows
        self._hits += hits
        if self._rows >= (self.SAMPLE_ROWS if self.sampling else self.WINDOW_ROWS):
            self.sampling = self._hits < self._rows * self.MIN_HIT_RATE
            self._rows = self._hits = 0


class _InFront(Worth):
    """The worker's tier in front of Redis: used for every small request, so its hits need no counting."""

    def saw(self, rows: int, hits: int) -> None:
        """Nothing to judge."""


_IN_FRONT = _InFront()


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
        local_bytes: int = 64 * 1024 * 1024,
        per_user: bool = False,
        cluster: bool = False,
    ) -> None:
        self.url = url
        # REDIS_CLUSTER: url names one node of a Redis Cluster; each row's key goes to its slot's node.
        self.cluster = cluster
        # redis+sentinel:// (config.sentinel_url): Sentinels name the primary each new connection goes to.
        self.sentinel = url.startswith(SENTINEL_SCHEMES)
        self.ttl = ttl
        self.prefix = prefix
        self._head = f"{prefix}{_FORMAT}:"  # every key's start, built once
        self.timeout = timeout_ms / 1000
        self.enabled = bool(url)
        # CACHE_SCOPE=user: each user's rows have their own keys, so a HIT never says someone else sent the row.
        self.per_user = per_user
        # Connection breaker: Redis down, slow or refusing us. Write breaker: Redis readable but refusing
        # writes (OOM under noeviction, a READONLY replica), where cached reads are still worth having.
        self._conn = _Breaker(retry_seconds)
        self._writes = _Breaker(retry_seconds)
        self._client: redis.Redis | RedisCluster | None = None
        self._own = threading.local()  # this thread's connection and the client it came from (see _call)
        self._pid: int | None = None
        self._relayout = False  # a cluster call failed: read the cluster's layout again before the next
        # Whether Redis evicts keys by itself (maxmemory set, an allkeys-* policy), read before this process's first
        # store (None: not yet): then answers are stored with one MSET and no per-key expiry, which the value's own
        # expiry stands in for.
        self._evicts: bool | None = None
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
        self._worth: dict[str, Worth] = {}  # whether the tier pays, per scope (model, backend, kind) on local tiers

    def worker_tier(self, scope: str, rows: int, shared: bool) -> Worth | None:
        """This worker's tier for a request of `rows` rows in scope, to pass to lookup; None when the request skips
        it: a batch of more than LOCAL_MAX_ROWS, no tier configured (CACHE_LOCAL_ENTRIES=0), or, where the tier is
        the model's only one (not shared through Redis), a request its sampling passes over (Worth)."""
        if rows > LOCAL_MAX_ROWS or not self.local_entries:
            return None
        if shared:
            # In front of Redis the tier is always used, unjudged: what a miss costs it there was not measurable
            # beside the round trips on the machine Worth was measured on (docs/benchmark.md, fourth pass).
            return _IN_FRONT
        judge = self._worth.get(scope)
        if judge is None:
            judge = self._worth[scope] = Worth()
        return judge if judge.use() else None

    @property
    def state(self) -> str:
        """off (not configured), ok, down (serving uncached), or read-only (hits served, nothing stored)."""
        if not self.enabled:
            return "off"
        return "down" if self._conn.down else "read-only" if self._writes.down else "ok"

    @property
    def breaker_open(self) -> bool:
        """Whether Redis failed and its back-off is on (requests served uncached): one attribute read, per request."""
        return self._conn.down

    @property
    def reason(self) -> str:
        """Why the cache is degraded, for the unauthenticated /ready: auth, timeout, down or read-only (the log
        has redis-py's message, which names hosts, ports and socket paths)."""
        return self._conn.reason or self._writes.reason

    def usable(self) -> bool:
        """Whether to try Redis now: configured, and not inside a back-off after a failure."""
        return self.enabled and self._conn.allows()

    def keys(self, scope: str, X: np.ndarray, user: str | None = None) -> list[str]:
        """One key per row: prefix + format + a 128-bit BLAKE2b digest of the row's canonical float64 bytes,
        personalised by the scope (model, backend, kind; and the user, per-user scope)."""
        # The scope goes into the digest as BLAKE2b's personalisation (a distinct hash per scope, at no cost per
        # byte) rather than into the key as text: a 41-byte key (default prefix) instead of 66 cost Redis 0.35 us
        # less CPU a row stored (docs/benchmark.md).
        # A copy of the scope's hasher, not a new one per row: a third less time a row (docs/benchmark.md).
        new = _hasher(scope, (user or "") if self.per_user else None).copy
        # Adding 0.0 turns -0.0 into 0.0, so the two spellings of zero share a key; tobytes is C order whatever X's.
        data = (X + 0.0).tobytes()
        width = X.shape[1] * 8
        head = self._head
        keys = []
        for i in range(0, len(data), width):
            digest = new()
            digest.update(data[i : i + width])
            keys.append(head + digest.hexdigest())
        return keys

    def lookup(
        self,
        keys: list[str],
        valid: Callable[[object], bool],
        remember: bool = True,
        shared: bool = True,
        tier: Worth | None = None,
    ) -> tuple[list, bool]:
        """Answers for keys (None where absent) from this worker's memory when tier (worker_tier's) is given, then
        Redis unless shared is False (a model whose cache policy keeps it out of Redis); and whether the tiers asked
        answered.

        A stored value that doesn't decode, or that `valid` rejects (another version's format), is a miss. Rows
        fetched from Redis are kept locally when tier is given, unless remember is False (Cache-Control: no-store).
        """
        now = time.monotonic()
        values = [None] * len(keys)
        if tier is None:
            missing, remember = range(len(keys)), False
        else:
            missing = self._from_local(keys, values, now)
            tier.saw(len(keys), len(keys) - len(missing))
        if not missing or not shared:
            return values, True
        stored = self.get_many([keys[i] for i in missing])
        if stored is None:
            return values, False
        found, wall = [], time.time()
        for i, raw in zip(missing, stored):
            if raw is not None:
                expires, value = _decode(raw)
                # Past its expiry is a miss: an MSET-stored value has no Redis expiry, so CACHE_TTL is kept here.
                if value is not None and expires > wall and valid(value):
                    values[i] = value
                    if remember:
                        found.append((keys[i], now + expires - wall, raw))
        if remember:
            self._remember(found)
        return values, True

    def _from_local(self, keys: list[str], values: list, now: float) -> list[int]:
        """Fill values from this worker's tier; the places of the keys it does not hold."""
        local = self._local
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
        return missing

    def store(self, items: list[tuple[str, object]], shared: bool = True, tier: Worth | None = None) -> None:
        """Keep fresh answers in this worker's memory (when tier, worker_tier's, is given) and in Redis (when
        shared), stored before this returns."""
        send = shared and self.usable() and self._writes.allows()
        local = tier is not None and self.local_entries
        if not items or not (send or local):
            return  # checked before encoding: a dead Redis costs no work per request
        # The concatenation copies each answer out of orjson's 1 KiB buffer: kept alive by the thousand (a batch's
        # command, the local tier) those cost 1.9 us each to allocate and 1 KiB each to hold.
        head = b"%013d " % ((time.time() + self.ttl) * 1000)
        encoded = [(key, head + orjson.dumps(value)) for key, value in items]
        if local:
            expires = time.monotonic() + self.ttl
            self._remember([(key, expires, raw) for key, raw in encoded])
        if send:
            self.set_many(encoded)

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
        """Stored values in key order in one MGET (on a cluster, a GET per key, one write and one read per node), or
        None when Redis can't be used."""
        if not self.usable():
            return None
        try:
            client = self._redis()
            if self.cluster:
                values = _on_their_nodes(client, [("GET", key) for key in keys])
            else:
                values = self._call(client, "MGET", *keys)
        except _FAILURES as e:
            self._failed(self._conn, e)
            return None
        self._succeeded(self._conn)
        return values

    def set_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store encoded answers and wait for Redis's reply, so the next request on any worker finds them: in a Redis
        that evicts by itself, one MSET; else with the TTL, one SET for a row, one EVAL of _STORE_SCRIPT for a batch
        (on a cluster, whose script could only touch one slot, a SET per row, one write and one read per node).
        Failures only open a breaker. store() checks, before encoding, that there is something to send and that Redis
        may be used now."""
        try:
            client = self._redis()
            if self.cluster:
                _on_their_nodes(client, [("SET", key, value, "EX", self.ttl) for key, value in items])
            elif self._evicts or (self._evicts is None and self._read_eviction(client)):
                self._call(client, "MSET", *chain.from_iterable(items))
            elif len(items) == 1:
                ((key, value),) = items
                self._call(client, "SET", key, value, "EX", self.ttl)
            else:
                keys, values = zip(*items)
                self._call(client, "EVAL", _STORE_SCRIPT, len(keys), *keys, self.ttl, *values)
        except _FAILURES as e:
            self._failed(self._writes if _refused(e) else self._conn, e)
            return
        self._succeeded(self._conn)
        self._succeeded(self._writes)

    def _call(self, client: redis.Redis, *args: object) -> object:
        """One command's reply, on this thread's own connection of client (this process's, from _redis; not a
        cluster's). redis-py's command methods borrow
        a connection from the pool and poll it, per command: 66 us of CPU for a GET and a SET here, against 32 on a
        kept connection (docs/benchmark.md). The pool's poll is what replaced a connection the server closed while
        idle (a Redis restart, a failover): here a kept connection that fails is replaced once, at once."""
        own = self._own
        if getattr(own, "client", None) is not client:  # this thread's first command in this process
            own.client, own.conn = client, client.connection_pool.get_connection()
        conn = own.conn
        retry = conn.is_connected  # one more try, on a new connection, for one the server may have closed
        while True:
            try:
                if not conn.is_connected:
                    conn.connect()  # its own connect, not send's: a Sentinel's asks which server is the primary now
                # Packed by hiredis directly: redis-py's packer first copies every argument in Python, 0.2-0.6 us
                # a row of a batch's MGET or MSET (docs/benchmark.md).
                conn.send_packed_command([hiredis.pack_command(args)])
                return conn.read_response()
            except redis.ConnectionError:
                conn.disconnect()
                if not retry:
                    raise
                retry = False
            except redis.ResponseError:
                raise  # Redis's refusal (OOM, NOPERM), read whole: the connection is fine
            except BaseException:
                conn.disconnect()  # as redis-py's client does: a reply left half read would be the next command's
                raise

    def _read_eviction(self, client: redis.Redis) -> bool:
        """Whether this Redis drops keys by itself when full (a maxmemory and an allkeys-* policy), as the shipped
        deploy files and `make run` configure it; False when CONFIG is refused (an ACL user without +config|get).
        Read once per process; a connection failure propagates, like the store's own, and leaves it unread."""
        try:
            config = client.config_get("maxmemory*")
        except redis.ResponseError:
            config = {}
        self._evicts = int(config.get("maxmemory") or 0) > 0 and config.get("maxmemory-policy", "").startswith(
            "allkeys-"
        )
        return self._evicts

    def attempt(self, command: Callable[[redis.Redis], object]) -> tuple[bool, object]:
        """Run command(client) under this cache's breakers, for the other users of its Redis (feedback): (True, its
        result), or (False, None) when Redis can't be used now or the command failed, which only opens a breaker."""
        if not self.usable():
            return False, None
        try:
            result = command(self._redis())
        except _FAILURES as e:
            self._failed(self._writes if _refused(e) else self._conn, e)
            return False, None
        self._succeeded(self._conn)
        return True, result

    def round_trip(self, probes: int = 15) -> float | None:
        """Seconds one Redis round trip takes here (the median PING; on a cluster, of one node, as a batch's
        commands go to its nodes side by side), or None when Redis can't be used now."""
        one_node = {"target_nodes": RedisCluster.DEFAULT_NODE} if self.cluster else {}
        times = []
        for _ in range(probes):
            if not self.usable():
                return None
            start = time.perf_counter()
            try:
                client = self._redis()
                client.ping(**one_node) if self.cluster else self._call(client, "PING")
            except _FAILURES as e:
                self._failed(self._conn, e)
                return None
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def check(self) -> str:
        """Probe Redis for /ready (respecting the back-off; on a cluster, every node) and return the state."""
        if self.usable():
            try:
                client = self._redis()
                client.ping() if self.cluster else self._call(client, "PING")
                self._succeeded(self._conn)
            except _FAILURES as e:
                self._failed(self._conn, e)
        return self.state

    def _redis(self) -> redis.Redis | RedisCluster:
        """This process's client; made after fork, so workers never share a socket. Any failure to set it up
        (a URL redis-py refuses, a bad TLS option, no cluster node answering) is a redis.ConnectionError: the cache
        is down, not the request. A cluster client reads the cluster's layout (which node serves which slots) as it
        is made, and again after a failure, from any node it knows (so not only REDIS_URL's)."""
        pid = process.pid()
        if self._relayout and self._pid == pid:
            self._client.nodes_manager.initialize()
            self._relayout = False
        if self._pid != pid:
            options = {
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                # No retries: one timeout per breaker period is all a dead Redis may cost. (A connection the
                # server closed while idle is still replaced at once: the pool checks it before use.)
                "retry": Retry(NoBackoff(), 0),
                "health_check_interval": 0,
            }
            try:
                if self.sentinel:
                    # Each new connection asks the Sentinels in turn (each within the timeout) which server is the
                    # primary. A failed call closes its connection, so the probe after a back-off asks again: a
                    # failover (or an old primary now a replica, whose READONLY redis-py reports as a connection
                    # error) is an outage until the Sentinels name the new primary.
                    sentinels, name, primary, own = sentinel_url(self.url)
                    self._client = Sentinel(sentinels, sentinel_kwargs={**options, **own}).master_for(
                        name, **{**options, **primary}
                    )
                else:
                    self._client = (RedisCluster if self.cluster else redis.Redis).from_url(self.url, **options)
            except Exception as e:
                raise redis.ConnectionError(f"cannot set up a Redis connection: {_describe(e)}") from e
            self._pid, self._relayout, self._evicts = pid, False, None
        return self._client

    def _failed(self, breaker: _Breaker, e: Exception) -> None:
        """Open a breaker with a coarse reason, logging only the transition, with the detail."""
        if self.cluster and breaker is self._conn:
            # Redirections are not followed (_on_their_nodes): the probe after the back-off reads the layout again,
            # so after a failover or a resharding it asks the nodes that serve now.
            self._relayout = True
        if breaker.failed(_reason(e) if breaker is self._conn else "read-only"):
            what = "cache down, serving uncached" if breaker is self._conn else "cache writes refused, not storing"
            detail = _describe(e)
            if not self.cluster and isinstance(e, AskError | ClusterCrossSlotError):
                detail += "; REDIS_URL names a Redis Cluster node: set REDIS_CLUSTER=true"
            log.warning("%s; retrying every %.0fs: %s", what, breaker.seconds, detail)

    def _succeeded(self, breaker: _Breaker) -> None:
        """Close a breaker, logging only the recovery."""
        if breaker.succeeded():
            log.warning("cache back up, caching resumed" if breaker is self._conn else "cache writes accepted again")


def shared_redis(config: dict, cache: PredictionCache) -> PredictionCache | None:
    """The Redis the limits and feedback use: the cache's own client and breakers when the cache uses REDIS_URL (a
    dead Redis then costs one timeout, not one per user of it), else (CACHE_ENABLED off) one client of their own;
    None without REDIS_URL."""
    if not config["REDIS_URL"]:
        return None
    if cache.url == config["REDIS_URL"]:
        return cache
    return PredictionCache(
        config["REDIS_URL"],
        config["CACHE_TTL"],
        config["CACHE_PREFIX"],
        config["CACHE_TIMEOUT_MS"],
        config["CACHE_RETRY_SECONDS"],
        cluster=config["REDIS_CLUSTER"],
    )


def _on_their_nodes(client: RedisCluster, commands: list[tuple]) -> list:
    """Run one-key commands (the key second) as one cluster pipeline, each on the node serving its key's slot: one
    write and one read per node, the nodes side by side; the replies in command order, or the first error raised.

    Redirections (MOVED, ASK) and connection errors are not retried: redis-py would resend each failed command
    alone, one CACHE_TIMEOUT_MS each behind a hung node (5.5 s for a 300-row batch at 50 ms, measured). A failure
    opens the breaker like any Redis outage, and the probe after the back-off reads the cluster's layout again."""
    node = client.get_node_from_key
    stack = [PipelineCommand(args, {"target_nodes": node(args[1])}, i) for i, args in enumerate(commands)]
    return client.pipeline().send_cluster_commands(stack, allow_redirections=False)


def _refused(e: Exception) -> bool:
    """Whether Redis answered but refused the command (OOM, READONLY, NOPERM), rather than being out of reach."""
    return isinstance(e, redis.ResponseError) and not isinstance(e, _LAYOUT)


def _decode(raw: bytes) -> tuple[float, object]:
    """A stored value's expiry (unix seconds) and answer; (0, None) when it is in another format."""
    if raw[_HEAD - 1 : _HEAD] != b" " or not raw[: _HEAD - 1].isdigit():
        return 0.0, None
    try:
        return int(raw[: _HEAD - 1]) / 1000, orjson.loads(raw[_HEAD:])
    except orjson.JSONDecodeError:
        return 0.0, None


@functools.lru_cache(maxsize=4096)
def _hasher(scope: str, user: str | None) -> hashlib.blake2b:
    """The BLAKE2b hasher (128-bit) of a scope's row digests, never updated itself: personalised by the scope (and a
    user's name, per-user scope, which so never reaches Redis) through a 16-byte digest of it."""
    text = scope if user is None else f"{scope}\0user\0{user}"
    return hashlib.blake2b(digest_size=16, person=hashlib.blake2b(text.encode(), digest_size=16).digest())


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
