"""Sibyl's own protocol: POST /predict with features or instances, GET /models."""

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import RequestCacheControl
from werkzeug.http import parse_cache_control_header

from app import pipeline
from app.auth import auth
from app.protocols import cache_headers, json_response, read_json
from app.validation import field_name, invalid, to_matrix

bp = Blueprint("native", __name__)

_FIELDS = ("features", "instances")
_KEYS = {*_FIELDS, "probabilities"}
_TRUE = {"1", "true", "yes"}
_FLAGS = _TRUE | {"", "0", "false", "no"}


@bp.post("/predict")
@auth.login_required
def predict() -> Response:
    """Predict every row of the body; add class probabilities when asked."""
    body = read_json()
    model = current_app.extensions["sibyl.model"]
    field = _rows_field(body)
    proba = _wants_probabilities(body)
    if proba and not model.has_proba:
        raise invalid(f"model {model.name} is a {model.task} model and gives no probabilities; drop 'probabilities'")
    X = to_matrix(body[field], model, current_app.config["MAX_ROWS"], field)
    # Parse Cache-Control only when sent: werkzeug's parser costs more than the rest of a cache hit. Lowercased
    # first: directives are case-insensitive (RFC 9111 5.2), werkzeug matches them exactly.
    bypass, store = False, True
    if "Cache-Control" in request.headers:
        cc = parse_cache_control_header(request.headers["Cache-Control"].lower(), cls=RequestCacheControl)
        bypass, store = bool(cc.no_cache), not cc.no_store
    result = pipeline.predict(model, X, proba, bypass_cache=bypass, store=store, user=auth.current_user())
    payload = {"predictions": result.predictions, "model": {"name": model.name, "version": model.version}}
    if result.probabilities is not None:
        payload["probabilities"] = result.probabilities
    return json_response(payload, headers=cache_headers(result))


@bp.get("/models")
@auth.login_required
def models() -> Response:
    """What is served, with its metadata and the backend in use."""
    return json_response({"models": [current_app.extensions["sibyl.model"].describe()]})


def _rows_field(body: dict) -> str:
    """Which key holds the rows; unknown keys are refused so a typo is not silently ignored."""
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        hint = "the body takes 'features' or 'instances', and 'probabilities'"
        raise invalid(f"unknown field {field_name(unknown[0])}; {hint}")
    present = [f for f in _FIELDS if f in body]
    if len(present) != 1:
        raise invalid('send the rows in exactly one of "features" or "instances", e.g. {"features": [[...]]}')
    return present[0]


def _wants_probabilities(body: dict) -> bool:
    """ "probabilities": true in the body, or ?probabilities=true."""
    flag = body.get("probabilities", False)
    if type(flag) is not bool:
        raise invalid("'probabilities' must be true or false")
    arg = request.args.get("probabilities", "").lower() if request.query_string else ""
    if arg not in _FLAGS:
        raise invalid("?probabilities= must be true or false")
    return flag or arg in _TRUE
