"""Liveness and readiness probes for orchestrators; no auth, nothing revealed."""

import logging

import numpy as np
from flask import Blueprint, Response, current_app

from app.errors import error_response
from app.protocols import json_response

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    """Readiness: this worker's backend answers a sample row. A Redis outage is "degraded", still 200: predictions
    still work."""
    model = current_app.extensions["sibyl.model"]
    # One row through the backend (tens of microseconds): a worker whose runtime broke after fork is not ready.
    shipped = model.metadata.get("sample_rows")
    row = np.asarray(shipped[:1] if shipped else [[0.0] * model.n_features], dtype=np.float64)
    try:
        model.backend.predict(row, False)
    except Exception:
        log.exception("not ready: the model failed to answer a sample row")
        return error_response(503, "unavailable", "The model did not answer a sample row; the server log says why.")
    cache = current_app.extensions["sibyl.cache"]
    state = cache.check()
    degraded = state in {"down", "read-only"}
    body = {"status": "degraded" if degraded else "ready", "model": "ok", "cache": state}
    if degraded:
        body["cache_reason"] = cache.reason
    return json_response(body)
