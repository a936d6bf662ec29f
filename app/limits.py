"""(1) How often a caller may ask: requests per user and refused logins per address, counted in Redis; 429 past them."""

import hashlib
import math
import threading
import time
from collections import OrderedDict

from flask import Flask
from redis.cluster import PipelineCommand

from app.audit import audit
from app.cache import PredictionCache
from app.errors import ApiError
from config import Rate

# Fixed windows, one counter per key. KEYS are counters; ARGV[2i-1] is KEYS[i]'s window in ms and ARGV[2i] what to add
# to it (0 only reads it). Returns {count, ms until the window ends} per key. One call, atomic: a counter is never left
# without its expiry (INCR and PEXPIRE sent apart could be split by the key expiring in between, leaving a counter
# that never ends), and every replica sees one window, timed by Redis's clock rather than each replica's.
_COUNT_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local add = tonumber(ARGV[2 * i])
  local count = add > 0 and redis.call('INCRBY', key, add) or tonumber(redis.call('GET', key) or '0')
  local left = redis.call('PTTL', key)
  if add > 0 and left < 0 then
    left = tonumber(ARGV[2 * i - 1])
    redis.call('PEXPIRE', key, left)
  end
  out[i] = {count, left}
end
return out
"""
# Counters each worker keeps (when it counts alone, and its view of Redis's); past this, the least recently counted is
# forgotten, so a flood of addresses costs bounded memory.
MAX_LOCAL_KEYS = 10_000
# How stale this worker's view of a counter in Redis may get before a request sends its count and reads it again.
# Requests between syncs are counted here and sent with the next one: a user costs a Redis round trip every 100 ms per
# worker, not one per request (the round trip was 44% of a cached 1-row answer's time, docs/benchmark.md).
SYNC_SECONDS = 0.1
# ... and sooner, once a worker's unsent count reaches this share of what the limit has left, so near the limit
# (fewer than SHARE requests left) every request is counted in Redis before it is let through.
SHARE = 8


class _LocalWindows:
    """Fixed windows in this worker's memory: without Redis, and for refused logins while Redis is down."""

    def __init__(self) -> None:
        self._windows: OrderedDict[str, list] = OrderedDict()  # key -> [window end (monotonic), count]
        self._lock = threading.Lock()  # gthread workers count from several threads

    def count(self, key: str, window_ms: int, add: int) -> tuple[int, int]:
        """Add to key's counter (0 only reads it); its count and the ms until its window ends."""
        now = time.monotonic()
        with self._lock:
            window = self._windows.pop(key, None)
            if window is None or window[0] <= now:
                if not add:
                    return 0, 0
                window = [now + window_ms / 1000, 0]
            window[1] += add
            self._windows[key] = window
            if len(self._windows) > MAX_LOCAL_KEYS:
                self._windows.popitem(last=False)
            return window[1], math.ceil((window[0] - now) * 1000)


class _Seen:
    """One Redis counter as this worker last read it, plus what it has counted since and not yet sent."""

    __slots__ = ("ends", "known", "pending", "synced")

    def __init__(self) -> None:
        self.ends = self.synced = -math.inf  # monotonic: when the window ends, when Redis was last asked
        self.known = self.pending = 0


class Limits:
    """Per-user request limits by role and per-address refused-login limits, in the cache's Redis (its client and
    breakers) when there is one: a Redis problem lets predictions through and counts refused logins per worker.

    Refused logins are sent to Redis as they happen. Allowed requests are counted in the worker and sent at most
    SYNC_SECONDS apart (sooner near the limit), so across W workers a user may exceed a limit by what W - 1 workers
    let through in SYNC_SECONDS while under an eighth of the limit was left; a refusal is never wrong, since Redis's
    count only grows within a window."""

    def __init__(
        self, redis: PredictionCache | None, prefix: str, by_role: dict[str, Rate | None], logins: Rate | None
    ):
        self.redis = redis
        self.by_role = by_role
        self.logins = logins
        # The prefix, then digests: no user name or address is readable in Redis, and any makes a safe key part.
        self._user_head = f"{prefix}limit:user:"
        self._address_head = f"{prefix}limit:login:"
        self._local = _LocalWindows()
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def rate_for(self, roles: tuple[str, ...]) -> Rate | None:
        """A user's limit: their highest role's (admin, else metrics, else predict)."""
        role = "admin" if "admin" in roles else "metrics" if "metrics" in roles else "predict"
        return self.by_role[role]

    def count(self, user: str | None, roles: tuple[str, ...], address: str | None, sent: bool = True) -> None:
        """Count a request whose credentials were just checked (user None: refused; sent: whether it carried any),
        from the client's address. Raise a 429 when the address has too many refused logins (whatever the credentials
        were, so a throttled address learns nothing from its guesses), or when the user is over their limit. At most
        one Redis round trip settles both."""
        if user is None and not sent:
            return  # no credentials sent (a browser's first request): nothing was refused
        counts = {}  # what -> (key, window in ms, what to add)
        if self.logins:
            counts["address"] = (
                self._address_head + _digest(address or ""),
                self.logins.seconds * 1000,
                int(user is None),
            )
        rate = self.rate_for(roles) if user is not None else None
        if rate:
            counts["user"] = (self._user_head + _digest(user), rate.seconds * 1000, 1)
        if not counts:
            return
        found = self._counted(counts, rate) if self.redis else None
        if found is None:
            # Refused logins are counted in this worker; without Redis configured, users too; else they pass.
            found = {what: self._local.count(*c) for what, c in counts.items() if what == "address" or not self.redis}
        if "address" in found:
            refused, left = found["address"]
            # A refused login counts itself: the limit-th is still a 401, the next one a 429.
            if refused > self.logins.count - (user is not None):
                if user is None and refused == self.logins.count + 1:
                    # The first refusal past the limit: one line per window across every worker and replica.
                    burst = {"count": self.logins.count, "window_seconds": self.logins.seconds}
                    audit("login", "refused", reason="login rate limit", **burst)
                message = "Too many refused logins from this address: wait Retry-After seconds before trying again."
                raise _too_many("too_many_failed_logins", message, left)
        if "user" in found:
            used, left = found["user"]
            if used > rate.count:
                message = f"Over this user's limit of {rate.count} requests per {_per(rate)}; retry after Retry-After."
                raise _too_many("rate_limited", message, left)

    def _counted(self, counts: dict[str, tuple], rate: Rate | None) -> dict[str, tuple[int, int]] | None:
        """Each counter's (count, ms left) as this worker sees it, after sending Redis what is due (see the class);
        None when Redis failed."""
        now = time.monotonic()
        due = {}  # what -> (key, window in ms, what to send)
        # This request's counters, judged from these objects even if a flood of other keys pushes them out of the
        # worker's view meanwhile (counting the user may push out the address, with MAX_LOCAL_KEYS small).
        views: dict[str, _Seen] = {}
        with self._lock:
            for what, (key, window, add) in counts.items():
                seen = views[what] = self._seen.pop(key, None) or _Seen()
                self._seen[key] = seen  # most recently counted last
                if seen.ends <= now:  # a new window: Redis's counter expired, or was never read
                    seen.known = seen.pending = 0
                seen.pending += add
                # Refused logins are sent at once (the login limit must hold across workers to the attempt); the
                # rest when the view is stale, or the unsent count is a large share of what the limit has left (not
                # once the limit is used up: this worker then refuses without asking).
                left = rate.count - seen.known if what == "user" else 0
                if (what == "address" and add) or now - seen.synced >= SYNC_SECONDS or 0 < left <= seen.pending * SHARE:
                    due[what] = (key, window, seen.pending)
            while len(self._seen) > MAX_LOCAL_KEYS:
                self._seen.popitem(last=False)
        if due:
            replies = self._count_in_redis(list(due.values()))
            if replies is None:
                return None
            with self._lock:
                for (what, (_, _, sent)), (total, left) in zip(due.items(), replies):
                    seen = views[what]
                    seen.known, seen.pending = total, max(0, seen.pending - sent)
                    # A counter that doesn't exist (only read, never added to) has no window yet: read it again
                    # after SYNC_SECONDS.
                    seen.synced, seen.ends = now, now + (left / 1000 if left > 0 else SYNC_SECONDS)
        return {what: (s.known + s.pending, math.ceil((s.ends - now) * 1000)) for what, s in views.items()}

    def _count_in_redis(self, counts: list[tuple]) -> list[tuple[int, int]] | None:
        """Each (key, window ms, add) counter's (count, ms left) from one EVAL (on a cluster, one per key, the nodes
        side by side), or None when there is no Redis or it failed (the cache's breaker then spares the next requests
        the wait)."""
        if self.redis is None:
            return None
        cluster = self.redis.cluster

        def command(client):
            if not cluster:
                keys = [key for key, *_ in counts]
                return client.eval(
                    _COUNT_SCRIPT, len(keys), *keys, *(v for _, window, add in counts for v in (window, add))
                )
            # A cluster script may touch one slot only: an EVAL per key, each on its node, in one pipeline.
            node = client.get_node_from_key
            stack = [
                PipelineCommand(("EVAL", _COUNT_SCRIPT, 1, key, window, add), {"target_nodes": node(key)}, i)
                for i, (key, window, add) in enumerate(counts)
            ]
            return [reply[0] for reply in client.pipeline().send_cluster_commands(stack, allow_redirections=False)]

        ok, replies = self.redis.attempt(command)
        return [(int(count), int(left)) for count, left in replies] if ok else None


def _per(rate: Rate) -> str:
    """A rate's window in words."""
    names = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
    return names.get(rate.seconds, f"{rate.seconds} seconds")


def _too_many(code: str, message: str, left_ms: int) -> ApiError:
    """A 429 whose Retry-After is the whole seconds until the window ends (at least 1)."""
    return ApiError(429, code, message, {"Retry-After": str(max(1, math.ceil(left_ms / 1000)))})


def _digest(text: str) -> str:
    """A short digest for a key: a name or address never appears in Redis as it is."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def init_app(app: Flask, redis: PredictionCache | None) -> None:
    """Count in `redis` (cache.shared_redis: the cache's client, or one of its own), or per worker without one."""
    config = app.config
    by_role = {role: config[f"RATE_LIMIT_{role.upper()}"] for role in ("predict", "admin", "metrics")}
    app.extensions["sibyl.limits"] = Limits(redis, config["CACHE_PREFIX"], by_role, config["RATE_LIMIT_LOGIN_FAILURES"])
