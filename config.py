"""Every Sibyl setting, read once from the environment, with its default and meaning."""

import os


def _env(name: str, default: str) -> str:
    """Return an environment variable, treating an empty value as unset."""
    return os.environ.get(name) or default


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

    # Users: "name:sha256hex" entries, comma-separated, and/or a file with one entry per line.
    SIBYL_USERS = _env("SIBYL_USERS", "")
    SIBYL_USERS_FILE = _env("SIBYL_USERS_FILE", "")

    # Request limits: rows per request and body bytes (Flask answers 413 past the latter).
    MAX_ROWS = int(_env("MAX_ROWS", "1000"))
    MAX_CONTENT_LENGTH = int(_env("MAX_BODY_BYTES", str(1024 * 1024)))

    # Prediction cache. An empty REDIS_URL disables it (make run starts a private Redis).
    REDIS_URL = _env("REDIS_URL", "")
    CACHE_ENABLED = _flag("CACHE_ENABLED", True)
    CACHE_TTL = int(_env("CACHE_TTL", "3600"))
    CACHE_PREFIX = _env("CACHE_PREFIX", "sibyl:")
    # Redis must answer within this, or the request is served uncached.
    CACHE_TIMEOUT_MS = int(_env("CACHE_TIMEOUT_MS", "50"))
    # After a Redis failure, skip the cache this long before probing again.
    CACHE_RETRY_SECONDS = float(_env("CACHE_RETRY_SECONDS", "5"))

    # One JSON line per request on stdout; "text" is for reading by eye.
    LOG_LEVEL = _env("LOG_LEVEL", "INFO").upper()
    LOG_FORMAT = _env("LOG_FORMAT", "json")
