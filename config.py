"""Every Sibyl setting, read once from the environment, with its default and meaning."""

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

from redis.connection import parse_url

# Each setting's rule by Config key: (environment variable, parser). A parser turns an environment string or a
# mapping's value into the setting, or raises ValueError saying what is allowed. check() applies the same rules
# to a merged config, so settings passed as a mapping (tests, embedders) meet them too.
RULES: dict[str, tuple[str, Callable]] = {}
# Values never echoed in an error: a Redis URL may carry a password.
SECRET = {"REDIS_URL"}


def number(kind: type = int, minimum: float = 0) -> Callable:
    """A parser for a kind (int or float) >= minimum."""

    def parse(raw: object) -> int | float:
        if isinstance(raw, str):
            try:
                value = kind(raw)
            except ValueError:
                value = None
        else:  # a mapping's value must already be a number of the right kind (True is not 1, 2.5 is not 2)
            value = raw if type(raw) is kind or (kind is float and type(raw) is int) else None
        if value is None or not math.isfinite(value) or value < minimum:  # float() reads "nan" and "inf"
            raise ValueError(f"must be a {'whole number' if kind is int else 'number'} >= {minimum}")
        return value

    return parse


def choice(*allowed: str) -> Callable:
    """A parser for one of allowed, matched case-insensitively and returned as spelled in allowed."""
    by_fold = {a.casefold(): a for a in allowed}

    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().casefold() in by_fold:
            return by_fold[raw.strip().casefold()]
        raise ValueError(f"must be one of {', '.join(allowed)}")

    return parse


FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def flag(raw: object) -> bool:
    """A boolean: True/False, or 1/0, true/false, yes/no, on/off in any case."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in FLAGS:
        return FLAGS[raw.strip().lower()]
    raise ValueError("must be true or false (a bool, or 1/0, true/false, yes/no, on/off)")


def text(raw: object) -> str:
    """Any string."""
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def path(raw: object) -> str:
    """A file path: a string or a path object."""
    if not isinstance(raw, str | os.PathLike):
        raise ValueError("must be a file path")
    return os.fspath(raw)


def sha256_pin(raw: object) -> str:
    """Empty, or 64 hex digits."""
    if not (isinstance(raw, str) and re.fullmatch(r"([0-9a-fA-F]{64})?", raw)):
        raise ValueError("must be empty or 64 hex digits (a sha256)")
    return raw.lower()


def redis_url(raw: object) -> str:
    """Empty (no cache), a Sentinel URL (sentinel_url), or a URL redis-py can use; checked by redis-py's own parser,
    which does not connect."""
    if raw == "":
        return raw
    if text(raw).startswith(SENTINEL_SCHEMES):
        sentinel_url(raw)
        return raw
    try:
        parse_url(text(raw))
    except ValueError:  # redis-py's message may quote part of the URL, so it is not passed on
        raise ValueError("must be a redis://, rediss:// or unix:// URL with a valid port and options") from None
    return raw


# REDIS_URL naming Sentinels and the primary they watch (TLS to the primary with rediss+sentinel), as the
# redis-sentinel-url convention writes it: redis-py's own parser takes one host only.
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/@,\[\]]+)(?::(\d{1,5}))?")  # host[:port] or [ipv6][:port]


def sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict, dict]:
    """A redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<primary>[/<db>][?options] URL's parts: the
    Sentinels' (host, port) pairs (port 26379 by default), the primary's name, redis-py's options for connections to
    the primary (user, password, db, TLS and any query option, read by redis-py's own parser), and the Sentinels' own
    (query options sentinel_username and sentinel_password; none by default). ValueError, never quoting the URL."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    userinfo, at, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    name, _, db = path.partition("/")
    found = [_SENTINEL.fullmatch(host) for host in hosts.split(",")]
    sentinels = [(m[1].strip("[]"), int(m[2] or 26379)) for m in found if m]
    name = unquote(name)
    try:
        if len(sentinels) < len(found) or not all(0 < port < 65536 for _, port in sentinels):
            raise ValueError
        if not re.fullmatch(r"[^\s/]+", name) or not re.fullmatch(r"[0-9]*", db):
            raise ValueError
        # redis-py reads the rest as it reads a one-host URL's: the credentials, the database, the query's options.
        primary = parse_url(f"{scheme.removesuffix('+sentinel')}://{userinfo}{at}primary/{db}?{query}")
    except ValueError:
        raise ValueError(
            "must be redis+sentinel://[[user]:password@]host:port[,host:port...]/<primary name>[/<db>] "
            "(rediss+sentinel:// for TLS to the primary)"
        ) from None
    del primary["host"]
    if primary.pop("connection_class", None):  # rediss: redis-py's Sentinel pool takes ssl=True instead of a class
        primary["ssl"] = True
    own = {
        key.removeprefix("sentinel_"): primary.pop(key)
        for key in ("sentinel_username", "sentinel_password")
        if key in primary
    }
    return sentinels, name, primary, own


class Rate(NamedTuple):
    """A limit: at most count requests per window of seconds."""

    count: int
    seconds: int


_WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def rate(raw: object) -> Rate | None:
    """off (None: no limit), or <count>/<second|minute|hour|day>, e.g. 600/minute (a count of at least 1)."""
    if raw is None or isinstance(raw, Rate):  # check() re-applies the rule to values already parsed
        return raw
    if isinstance(raw, str):
        if raw.strip().lower() == "off":
            return None
        m = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*(second|minute|hour|day)\s*", raw.lower())
        if m and int(m[1]) >= 1:
            return Rate(int(m[1]), _WINDOWS[m[2]])
    raise ValueError("must be off or <count>/<second|minute|hour|day> with a count of at least 1, e.g. 600/minute")


def metrics_address(raw: object) -> str:
    """Empty (GET /metrics on the public port, behind auth), or host:port for a listener of its own."""
    host, sep, port = text(raw).rpartition(":")
    if raw != "" and not (sep and host and port.isdigit() and 1 <= int(port) <= 65535 and host.strip() == host):
        raise ValueError("must be empty or host:port, e.g. 127.0.0.1:9100")
    return raw


def apply(name: str, raw: object, parse: Callable) -> object:
    """raw parsed by its rule, or ValueError naming the variable (and its value, unless secret)."""
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{name if name in SECRET else f'{name}={raw!r}'} {e}") from None


def from_env(name: str, default: str, parse: Callable) -> object:
    """Read one variable (empty counts as unset); a bad value stops startup with one line naming it."""
    try:
        return apply(name, os.environ.get(name) or default, parse)
    except ValueError as e:
        raise SystemExit(f"sibyl: cannot start: {e}") from None


def _setting(name: str, default: str, parse: Callable = text, key: str = "") -> object:
    """Record the rule for Config key (default: name) and read the variable by it."""
    RULES[key or name] = (name, parse)
    return from_env(name, default, parse)


def check(config: dict) -> None:
    """Apply every setting's rule to a merged config, turning strings into values; ValueError names the first
    setting that breaks its rule."""
    for key, (name, parse) in RULES.items():
        config[key] = apply(name, config[key], parse)
    if config["REDIS_CLUSTER"] and config["REDIS_URL"]:
        cluster_url(config["REDIS_URL"])


def cluster_url(url: str) -> None:
    """A URL a cluster client can start from: a host (not a unix socket) and database 0, the only one a cluster has.
    ValueError otherwise, never quoting the URL."""
    if url.startswith(SENTINEL_SCHEMES):
        raise ValueError("REDIS_URL names Sentinels (one primary and its replicas), not a cluster: unset REDIS_CLUSTER")
    options = parse_url(url)
    if "path" in options or options.get("db", 0) != 0:
        raise ValueError("REDIS_URL must be a redis:// or rediss:// URL of database 0 with REDIS_CLUSTER=true")


def usable_cpus(cgroup: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (v2, else v1), at least 1."""
    cpus = len(os.sched_getaffinity(0))
    root = Path(cgroup)
    try:
        quota, period = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "150000 100000"
    except OSError:
        try:  # v1: a quota of -1 means none
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus
    if quota in ("max", "-1"):
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


# Log levels, spelled as LOG_LEVEL takes them (GUNICORN_LOG_LEVEL takes them in lower case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def web_concurrency() -> int:
    """WEB_CONCURRENCY by its rule (empty: the CPUs this process may use); serve.py and gunicorn.conf.py read it."""
    return from_env("WEB_CONCURRENCY", str(usable_cpus()), number(minimum=1))


class Config:
    """Settings for create_app(); tests pass a mapping of overrides instead of a subclass."""

    # "production" refuses to start without real users and rejects the dev credentials `make run` writes.
    SIBYL_ENV = _setting("SIBYL_ENV", "development", choice("development", "production"))

    # One model artifact to serve instead of MODEL_DIR; its metadata file sits beside it (same name, .json).
    MODEL_PATH = _setting("MODEL_PATH", "", path)
    # The registry: <name>/<version>/ folders, each with an artifact and its metadata, plus <name>/manifest.json.
    MODEL_DIR = _setting("MODEL_DIR", "models", path)
    # The model POST /predict serves (empty: the only one, when there is only one).
    DEFAULT_MODEL = _setting("DEFAULT_MODEL", "")
    # A bad artifact stops startup, unless this is set and it is not the default: then it is reported unavailable.
    SKIP_BAD_MODELS = _setting("SKIP_BAD_MODELS", "false", flag)
    # A model written by another scikit-learn version warns; with this set, it is refused.
    STRICT_SKLEARN_VERSION = _setting("STRICT_SKLEARN_VERSION", "false", flag)
    # Types a .skops artifact may hold beyond scikit-learn's own, comma-separated (anything else is refused).
    SKOPS_TRUSTED_TYPES = _setting("SKOPS_TRUSTED_TYPES", "")
    # Optional pin from deployment config: the artifact must have this sha256 (the metadata's own
    # digest only proves the two files agree, not that nobody swapped both).
    MODEL_SHA256 = _setting("MODEL_SHA256", "", sha256_pin)
    # auto: compiled ONNX when it converts and verifies, else scikit-learn; onnx: fail if it can't.
    INFERENCE_BACKEND = _setting("INFERENCE_BACKEND", "auto", choice("auto", "sklearn", "onnx"))
    # Converting a model to ONNX at startup runs in a child process that is killed after this long.
    COMPILE_TIMEOUT_SECONDS = _setting("COMPILE_TIMEOUT_SECONDS", "300", number(float, minimum=1))

    # Users: "name:sha256hex" entries, comma-separated, and/or a file with one entry per line.
    SIBYL_USERS = _setting("SIBYL_USERS", "")
    SIBYL_USERS_FILE = _setting("SIBYL_USERS_FILE", "", path)

    # Request limits: rows per request and body bytes (Flask answers 413 past the latter).
    MAX_ROWS = _setting("MAX_ROWS", "1000", number(minimum=1))
    MAX_CONTENT_LENGTH = _setting("MAX_BODY_BYTES", str(1024 * 1024), number(minimum=1), key="MAX_CONTENT_LENGTH")

    # Prediction cache. An empty REDIS_URL disables it (make run starts a private Redis); redis+sentinel:// names
    # the Sentinels that say which server is the primary (sentinel_url).
    REDIS_URL = _setting("REDIS_URL", "", redis_url)
    # REDIS_URL names one node of a Redis Cluster (any node: the client reads the cluster's layout from it).
    REDIS_CLUSTER = _setting("REDIS_CLUSTER", "false", flag)
    CACHE_ENABLED = _setting("CACHE_ENABLED", "true", flag)
    CACHE_TTL = _setting("CACHE_TTL", "3600", number(minimum=1))
    CACHE_PREFIX = _setting("CACHE_PREFIX", "sibyl:")
    # Where a model's manifest doesn't say: on (Redis and the worker tier), off (neither), auto (Redis only where
    # predicting a row costs more than a Redis round trip, measured at startup).
    CACHE_POLICY = _setting("CACHE_POLICY", "on", choice("on", "off", "auto"))
    # Answers each worker also keeps in memory, so a repeated row costs no Redis round trip (0 turns it off).
    CACHE_LOCAL_ENTRIES = _setting("CACHE_LOCAL_ENTRIES", "10000", number())
    # ... and at most this many bytes of them (keys and stored answers), whichever bound is reached first.
    CACHE_LOCAL_BYTES = _setting("CACHE_LOCAL_BYTES", str(64 * 1024 * 1024), number())
    # shared: one user's cached row is a hit for every user. user: each user has their own entries, so X-Cache
    # never tells anyone that somebody else sent the same row.
    CACHE_SCOPE = _setting("CACHE_SCOPE", "shared", choice("shared", "user"))
    # Redis must answer within this, or the request is served uncached.
    CACHE_TIMEOUT_MS = _setting("CACHE_TIMEOUT_MS", "50", number(minimum=1))
    # After a Redis failure, skip the cache this long before probing again.
    CACHE_RETRY_SECONDS = _setting("CACHE_RETRY_SECONDS", "5", number(float))

    # Monitoring. Each answer's predictions are kept in Redis (REDIS_URL) this many seconds, so POST /feedback can
    # join the true labels or values by request id; 0 keeps nothing (one more Redis write per request when on).
    FEEDBACK_TTL = _setting("FEEDBACK_TTL", "0", number())
    # Accuracy (classifiers) or MAE and RMSE (regressors) are over each version's last this many feedback rows.
    FEEDBACK_WINDOW = _setting("FEEDBACK_WINDOW", "1000", number(minimum=1))
    # Drift PSI is over each worker's last this many rows per model version; 0 turns drift metrics off.
    DRIFT_WINDOW = _setting("DRIFT_WINDOW", "1000", number())

    # One JSON line per request on stdout; "text" is for reading by eye.
    LOG_LEVEL = _setting("LOG_LEVEL", "INFO", choice(*LOG_LEVELS))
    LOG_FORMAT = _setting("LOG_FORMAT", "json", choice("json", "text"))
    # This many refused logins from one address within AUDIT_WINDOW_SECONDS write one audit line.
    AUDIT_LOGIN_FAILURES = _setting("AUDIT_LOGIN_FAILURES", "10", number(minimum=1))
    AUDIT_WINDOW_SECONDS = _setting("AUDIT_WINDOW_SECONDS", "60", number(float, minimum=1))

    # Requests per user, counted in REDIS_URL's Redis across every worker and replica (each worker on its own without
    # it; with Redis configured but down, not at all: predictions fail open). A user's limit is their highest role's:
    # admin, else metrics, else predict. Generous for people and services; a leaked scrape key (metrics role) can't
    # be turned into a prediction firehose.
    RATE_LIMIT_PREDICT = _setting("RATE_LIMIT_PREDICT", "60000/minute", rate)
    RATE_LIMIT_ADMIN = _setting("RATE_LIMIT_ADMIN", "60000/minute", rate)
    RATE_LIMIT_METRICS = _setting("RATE_LIMIT_METRICS", "600/minute", rate)
    # Refused logins per client address; past it, requests with credentials get 429 whatever the credentials. Keys
    # are 256-bit, so a real client fails only when misconfigured: a few tries are plenty.
    RATE_LIMIT_LOGIN_FAILURES = _setting("RATE_LIMIT_LOGIN_FAILURES", "10/minute", rate)
    # Proxies in front that each append the client's address to X-Forwarded-For (the shipped nginx: 1). 0 uses the
    # connection's own address: with no proxy, a client could otherwise pick its own address by sending the header.
    TRUSTED_PROXY_HOPS = _setting("TRUSTED_PROXY_HOPS", "0", number())

    # Empty: GET /metrics on the public port, for users with the admin or metrics role. host:port (e.g.
    # 127.0.0.1:9100, a private network's address): gunicorn also listens there, /metrics is served there alone and
    # without auth, and the public port answers 404 for it.
    METRICS_BIND = _setting("METRICS_BIND", "", metrics_address)
