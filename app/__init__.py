"""Sibyl: serve a scikit-learn model over HTTP. create_app() wires the request's path together."""

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import auth, errors, limits, metrics, request_log
from app.cache import PredictionCache, shared_redis
from app.drift import Drift
from app.errors import StartupError
from app.registry import load_registry
from config import Config, check


def create_app(config: dict | None = None) -> Flask:
    """Build the app: load and verify every model once, then register every step of the request path."""
    app = Flask(__name__)
    # A doubled slash is a 404, not a redirect to another path (Werkzeug's default would merge them).
    app.url_map.merge_slashes = False
    app.config.from_object(Config)
    app.config.update(config or {})
    try:
        check(app.config)  # the environment's values were checked on import; a mapping's are checked here
    except ValueError as e:
        raise StartupError(str(e)) from None
    request_log.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    cache = app.extensions["sibyl.cache"] = PredictionCache(
        app.config["REDIS_URL"] if app.config["CACHE_ENABLED"] else "",
        ttl=app.config["CACHE_TTL"],
        prefix=app.config["CACHE_PREFIX"],
        timeout_ms=app.config["CACHE_TIMEOUT_MS"],
        retry_seconds=app.config["CACHE_RETRY_SECONDS"],
        local_entries=app.config["CACHE_LOCAL_ENTRIES"],
        local_bytes=app.config["CACHE_LOCAL_BYTES"],
        per_user=app.config["CACHE_SCOPE"] == "user",
        cluster=app.config["REDIS_CLUSTER"],
    )
    # The limits and feedback share one Redis client and its breakers: the cache's, or one of their own.
    redis = shared_redis(app.config, cache)
    limits.init_app(app, redis)
    # Imported here: `python -m app.cli` must not find app.cli half-imported through this package.
    from app import admin, direct, feedback, health, openapi, page, status
    from app.protocols import kserve, mlflow, native, refuse_encoded_slash, v2

    # CACHE_POLICY=auto weighs each model's predict cost against this Redis round trip.
    registry = app.extensions["sibyl.registry"] = load_registry(app.config, cache.round_trip)
    # Drift windows and kept predictions: what POST /feedback and the monitoring gauges read.
    app.extensions["sibyl.drift"] = Drift(registry.loaded(), app.config["DRIFT_WINDOW"])
    app.extensions["sibyl.feedback"] = feedback.store_for(app.config, redis)
    app.before_request(refuse_encoded_slash)
    for module in (health, native, mlflow, kserve, v2, feedback, admin, openapi, page, status):
        app.register_blueprint(module.bp)
    metrics.init_app(app)  # it records the models loaded above, and serves /metrics
    direct.wrap(app)  # the common POST /predict, around Flask's dispatch
    if hops := app.config["TRUSTED_PROXY_HOPS"]:
        # The client's address (limits, request and audit logs) from the X-Forwarded-For the proxies in front append.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=0)
    return app
