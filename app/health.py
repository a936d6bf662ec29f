"""Liveness and readiness probes for orchestrators; no auth, nothing revealed."""

from flask import Blueprint, Response, current_app

from app.protocols import json_response

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    """Readiness: the model is loaded. A Redis outage is "degraded", still 200: predictions still work."""
    cache = current_app.extensions["sibyl.cache"]
    state = cache.check()
    degraded = state in {"down", "read-only"}
    body = {"status": "degraded" if degraded else "ready", "model": "loaded", "cache": state}
    if degraded:
        body["cache_reason"] = cache.reason
    return json_response(body)
