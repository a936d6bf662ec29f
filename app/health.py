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
    """Readiness: every model this worker loaded answers a sample row. A Redis outage is "degraded", still 200:
    predictions still work."""
    if not models_answer():
        return error_response(503, "unavailable", "A model did not answer a sample row; the server log says why.")
    cache = current_app.extensions["sibyl.cache"]
    state = cache.check()
    degraded = state in {"down", "read-only"}
    body = {"status": "degraded" if degraded else "ready", "model": "ok", "cache": state}
    if degraded:
        body["cache_reason"] = cache.reason
    return json_response(body)


def models_answer(models: list | None = None) -> bool:
    """Whether each of models (by default every model this worker loaded) answers its sample row, the server log
    saying which did not: the fact behind /ready and the V2 protocol's readiness probes."""
    # Every loaded model, not just the default: each has its own backend (its own onnxruntime session, opened after
    # fork), and requests can name any of them, so a worker where one is broken should not get traffic. A row costs
    # tens of microseconds per model.
    for model in current_app.extensions["sibyl.registry"].loaded() if models is None else models:
        try:
            model.backend.predict(np.asarray([model.sample_row], dtype=np.float64), False)
        except Exception:
            log.exception("not ready: model %s version %s failed to answer a sample row", model.name, model.version)
            return False
    return True
