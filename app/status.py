"""GET /status: per model version, what the metrics say (requests, errors, latency, cache, drift, accuracy), as JSON."""

import math
from collections import defaultdict

from flask import Blueprint, Response, current_app

from app import errors
from app.auth import auth
from app.metrics import ROLES
from app.openapi import json_answer
from app.protocols import json_response

bp = Blueprint("status", __name__)
errors.register_handlers(bp)


@bp.get("/status")
@auth.login_required(role=ROLES)
def status() -> Response:
    """Per model version: requests, error rate, latency p50/p99, cache hit ratio, rows, drift and accuracy, summed
    across workers since the server started; needs the admin or metrics role (the figures /metrics serves)."""
    registry = current_app.extensions["sibyl.registry"]
    versions = [(m.name, m.version) for m in registry.loaded()]
    figures = summarize(current_app.extensions["sibyl.metrics"].families(), versions)
    return json_response({"models": figures, "generation": registry.generation})


def summarize(families: list, versions: list[tuple[str, str]]) -> list[dict]:
    """The figures of each (model, version) served, read from Prometheus metric families."""
    samples = defaultdict(list)  # (sample name, model, version) -> [(labels, value)]
    for family in families:
        for s in family.samples:
            samples[s.name, s.labels.get("model"), s.labels.get("version")].append((s.labels, s.value))

    def of(name: str, model: str, version: str) -> list[tuple[dict, float]]:
        return samples.get((name, model, version), [])

    out = []
    for model, version in versions:
        answered = of("sibyl_requests_total", model, version)
        requests = sum(v for _, v in answered)
        errors_ = sum(v for lb, v in answered if int(lb["status"]) >= 400)
        buckets = defaultdict(float)  # upper bound -> cumulative count, summed over endpoints and protocols
        for lb, v in of("sibyl_request_duration_seconds_bucket", model, version):
            buckets[float(lb["le"])] += v
        outcomes = {lb["outcome"]: int(v) for lb, v in of("sibyl_cache_requests_total", model, version) if v}
        cached = sum(outcomes.values())
        features = {lb["feature"]: v for lb, v in of("sibyl_feature_drift_psi", model, version)}
        prediction_psi = _one(of("sibyl_prediction_drift_psi", model, version))
        out.append(
            {
                "name": model,
                "version": version,
                "requests": int(requests),
                "errors": int(errors_),
                "error_rate": errors_ / requests if requests else None,
                "latency_ms": {f"p{round(q * 100)}": _quantile(q, buckets) for q in (0.5, 0.99)},
                "rows": int(_one(of("sibyl_rows_predicted_total", model, version)) or 0),
                "cache": {
                    "requests": cached,
                    "hit_ratio": outcomes.get("hit", 0) / cached if cached else None,
                    "outcomes": outcomes,
                },
                "drift": {"prediction_psi": prediction_psi, "features": features}
                if features or prediction_psi is not None
                else None,
                "feedback": {
                    "rows": int(_one(of("sibyl_feedback_rows_total", model, version)) or 0),
                    **{
                        key: _one(of(name, model, version))
                        for key, name in (
                            ("accuracy", "sibyl_accuracy"),
                            ("mae", "sibyl_regression_mae"),
                            ("rmse", "sibyl_regression_rmse"),
                        )
                    },
                },
            }
        )
    return out


def _one(found: list[tuple[dict, float]]) -> float | None:
    """The value of a series that has one sample per version (summed, should workers each report one)."""
    return sum(v for _, v in found) if found else None


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile in milliseconds from cumulative histogram buckets, interpolated within its bucket as Prometheus's
    histogram_quantile does; None without observations."""
    bounds = sorted(buckets)
    total = buckets[math.inf] if bounds else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):  # past the last finite bucket: its bound is all that is known
                return round(lower * 1000, 3)
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((lower + (upper - lower) * share) * 1000, 3)
        lower, below = upper, count
    return None


def openapi_operation(endpoint: str, method: str, registry, config) -> dict | None:
    """GET /status's answer in GET /openapi.json."""
    return {"ok": json_answer("Per model version, the service's figures since it started.", _SCHEMA)}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SCHEMA = {
    "type": "object",
    "required": ["models", "generation"],
    "properties": {
        "generation": {"type": "integer"},
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "version", "requests", "errors", "error_rate", "latency_ms", "rows", "cache"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "requests": {"type": "integer", "description": "requests that reached this version, any status"},
                    "errors": {"type": "integer", "description": "of them, answered with a status of 400 or more"},
                    "error_rate": _NUMBER_OR_NULL,
                    "latency_ms": {
                        "type": "object",
                        "properties": {"p50": _NUMBER_OR_NULL, "p99": _NUMBER_OR_NULL},
                    },
                    "rows": {"type": "integer"},
                    "cache": {
                        "type": "object",
                        "properties": {
                            "requests": {"type": "integer"},
                            "hit_ratio": _NUMBER_OR_NULL,
                            "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
                        },
                    },
                    "drift": {
                        "type": ["object", "null"],
                        "properties": {
                            "prediction_psi": _NUMBER_OR_NULL,
                            "features": {"type": "object", "additionalProperties": {"type": "number"}},
                        },
                    },
                    "feedback": {
                        "type": "object",
                        "properties": {
                            "rows": {"type": "integer"},
                            "accuracy": _NUMBER_OR_NULL,
                            "mae": _NUMBER_OR_NULL,
                            "rmse": _NUMBER_OR_NULL,
                        },
                    },
                },
            },
        },
    },
}
