"""Sibyl: serve a scikit-learn model over HTTP. create_app() wires the request's path together."""

from flask import Flask

from app import auth, errors, request_log
from app.backends import choose_backend
from app.cache import PredictionCache
from app.errors import StartupError
from app.registry import load_model
from config import Config, check


def create_app(config: dict | None = None) -> Flask:
    """Build the app: load and verify the model once, then register every step of the request path."""
    app = Flask(__name__)
    app.config.from_object(Config)
    app.config.update(config or {})
    try:
        check(app.config)  # the environment's values were checked on import; a mapping's are checked here
    except ValueError as e:
        raise StartupError(str(e)) from None
    request_log.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    model = load_model(app.config["MODEL_PATH"], app.config["MODEL_SHA256"])
    model.backend = choose_backend(model, app.config["INFERENCE_BACKEND"], app.config["COMPILE_TIMEOUT_SECONDS"])
    app.extensions["sibyl.model"] = model
    app.extensions["sibyl.cache"] = PredictionCache(
        app.config["REDIS_URL"] if app.config["CACHE_ENABLED"] else "",
        ttl=app.config["CACHE_TTL"],
        prefix=app.config["CACHE_PREFIX"],
        timeout_ms=app.config["CACHE_TIMEOUT_MS"],
        retry_seconds=app.config["CACHE_RETRY_SECONDS"],
        local_entries=app.config["CACHE_LOCAL_ENTRIES"],
        local_bytes=app.config["CACHE_LOCAL_BYTES"],
        per_user=app.config["CACHE_SCOPE"] == "user",
    )
    # Imported here: `python -m app.cli` must not find app.cli half-imported through this package.
    from app import health
    from app.protocols import native

    app.register_blueprint(health.bp)
    app.register_blueprint(native.bp)
    return app
