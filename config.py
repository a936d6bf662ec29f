"""Every Sibyl setting, read once from the environment, with its default and meaning."""

import os


def _env(name: str, default: str) -> str:
    """Return an environment variable, treating an empty value as unset."""
    return os.environ.get(name) or default


# Each numeric setting's rule by Config key: (environment variable, type, minimum). check_numbers() applies
# the same rules to a merged config, so settings passed as a mapping (tests, embedders) meet them too.
NUMBERS: dict[str, tuple[str, type, float]] = {}


def _as_number(name: str, raw: object, kind: type, minimum: float) -> int | float:
    """raw (an environment string or a value from a mapping) as a kind >= minimum, or ValueError naming name."""
    if isinstance(raw, str):
        try:
            value = kind(raw)
        except ValueError:
            value = None
    else:  # a mapping's value must already be a number of the right kind (True is not 1, 2.5 is not 2)
        value = raw if type(raw) is kind or (kind is float and type(raw) is int) else None
    if value is None or value < minimum:
        what = "whole number" if kind is int else "number"
        raise ValueError(f"{name}={raw!r} must be a {what} >= {minimum}")
    return value


def _number(name: str, default: str, kind: type = int, minimum: float = 0, key: str = "") -> int | float:
    """Read a numeric setting; a bad value stops startup with one line naming the variable."""
    NUMBERS[key or name] = (name, kind, minimum)
    try:
        return _as_number(name, _env(name, default), kind, minimum)
    except ValueError as e:
        raise SystemExit(f"sibyl: cannot start: {e}") from None


def check_numbers(config: dict) -> None:
    """Apply every numeric setting's rule to a merged config, turning strings into numbers; ValueError names
    the first setting that breaks its rule."""
    for key, (name, kind, minimum) in NUMBERS.items():
        config[key] = _as_number(name, config[key], kind, minimum)


def _flag(name: str, default: bool) -> bool:
    """Read a boolean environment variable (1/true/yes/on)."""
    return _env(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


class Config:
    """Settings for create_app(); tests pass a mapping of overrides instead of a subclass."""

    # "production" refuses to start without real users and rejects the dev credentials `make run` writes.
    SIBYL_ENV = _env("SIBYL_ENV", "development")

    # The model artifact to serve; its metadata file sits beside it (same name, .json).
    MODEL_PATH = _env("MODEL_PATH", "models/iris.joblib")
    # Optional pin from deployment config: the artifact must have this sha256 (the metadata's own
    # digest only proves the two files agree, not that nobody swapped both).
    MODEL_SHA256 = _env("MODEL_SHA256", "")
    # auto: compiled ONNX when it converts and verifies, else scikit-learn; onnx: fail if it can't.
    INFERENCE_BACKEND = _env("INFERENCE_BACKEND", "auto")
    # Converting a model to ONNX at startup runs in a child process that is killed after this long.
    COMPILE_TIMEOUT_SECONDS = _number("COMPILE_TIMEOUT_SECONDS", "300", float, minimum=1)

    # Users: "name:sha256hex" entries, comma-separated, and/or a file with one entry per line.
    SIBYL_USERS = _env("SIBYL_USERS", "")
    SIBYL_USERS_FILE = _env("SIBYL_USERS_FILE", "")

    # Request limits: rows per request and body bytes (Flask answers 413 past the latter).
    MAX_ROWS = _number("MAX_ROWS", "1000", minimum=1)
    MAX_CONTENT_LENGTH = _number("MAX_BODY_BYTES", str(1024 * 1024), minimum=1, key="MAX_CONTENT_LENGTH")

    # Prediction cache. An empty REDIS_URL disables it (make run starts a private Redis).
    REDIS_URL = _env("REDIS_URL", "")
    CACHE_ENABLED = _flag("CACHE_ENABLED", True)
    CACHE_TTL = _number("CACHE_TTL", "3600", minimum=1)
    CACHE_PREFIX = _env("CACHE_PREFIX", "sibyl:")
    # Answers each worker also keeps in memory, so a repeated row costs no Redis round trip (0 turns it off).
    CACHE_LOCAL_ENTRIES = _number("CACHE_LOCAL_ENTRIES", "10000")
    # ... and at most this many bytes of them (keys and stored answers), whichever bound is reached first.
    CACHE_LOCAL_BYTES = _number("CACHE_LOCAL_BYTES", str(64 * 1024 * 1024))
    # shared: one user's cached row is a hit for every user. user: each user has their own entries, so X-Cache
    # never tells anyone that somebody else sent the same row.
    CACHE_SCOPE = _env("CACHE_SCOPE", "shared")
    # Redis must answer within this, or the request is served uncached.
    CACHE_TIMEOUT_MS = _number("CACHE_TIMEOUT_MS", "50", minimum=1)
    # A miss's store waits up to this long to share one write with the worker's next Redis call, saving a send
    # and a Redis wake-up per miss; a background thread sends what waited this long (0: send each at once).
    CACHE_STORE_DELAY_MS = _number("CACHE_STORE_DELAY_MS", "50", float)
    # After a Redis failure, skip the cache this long before probing again.
    CACHE_RETRY_SECONDS = _number("CACHE_RETRY_SECONDS", "5", float)

    # One JSON line per request on stdout; "text" is for reading by eye.
    LOG_LEVEL = _env("LOG_LEVEL", "INFO").upper()
    LOG_FORMAT = _env("LOG_FORMAT", "json")
