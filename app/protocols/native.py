"""Sibyl's own protocol: POST /predict and /models/<name>[/versions/<v>]/predict, GET /models, in Sibyl's shapes."""

from flask import Blueprint, Response, current_app, g, request
from werkzeug.datastructures import RequestCacheControl
from werkzeug.exceptions import NotFound
from werkzeug.http import parse_cache_control_header

from app import errors, pipeline
from app.auth import auth
from app.errors import ApiError
from app.protocols import cache_headers, json_response, read_json
from app.registry import Model, Registry
from app.validation import field_name, invalid, to_matrix

bp = Blueprint("native", __name__)
# This protocol's errors (its own and Werkzeug's raised in its views) render in Sibyl's one JSON shape. A protocol
# with another error shape registers its own renderers on its own blueprint here; the app-wide handlers only answer
# what no blueprint owns (unknown URLs, wrong methods).
errors.register_handlers(bp)

_FIELDS = ("features", "instances")
_KEYS = {*_FIELDS, "probabilities"}
_TRUE = {"1", "true", "yes"}
_FLAGS = _TRUE | {"", "0", "false", "no"}
_NO_DEFAULT = (
    "Several models are served and DEFAULT_MODEL is not set: POST to /models/<name>/predict (GET /models lists "
    "them), or set DEFAULT_MODEL."
)


@bp.before_request
def _refuse_encoded_slash() -> None:
    """404 for a %2F in the path. The server decodes it before routing, so /models/a%2Fversions%2F2/predict would
    reach another route as name "a", version "2"; no model or version name holds a slash."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
    if "%2f" in raw.partition("?")[0].lower():
        raise NotFound()


@bp.post("/predict")
@auth.login_required
def predict() -> Response:
    """Predict with the default model."""
    registry = _registry()
    if registry.default_model is None:
        raise ApiError(404, "model_not_found", _NO_DEFAULT)
    return _predict(registry.resolve(registry.default_model))


@bp.post("/models/<name>/predict")
@auth.login_required
def predict_model(name: str) -> Response:
    """Predict with a model's default version (or a version drawn by its traffic split)."""
    return _predict(_registry().resolve(name))


@bp.post("/models/<name>/versions/<version>/predict")
@auth.login_required
def predict_version(name: str, version: str) -> Response:
    """Predict with one version of a model, named or by alias."""
    return _predict(_registry().resolve(name, version))


@bp.get("/models")
@auth.login_required
def models() -> Response:
    """Every model served: versions with their metadata and backend, aliases, traffic, and unavailable versions;
    and which load of the registry answers (generation, loaded_at)."""
    registry = _registry()
    return json_response(
        {"models": registry.describe(), "generation": registry.generation, "loaded_at": registry.loaded_at}
    )


@bp.get("/models/<name>")
@auth.login_required
def model(name: str) -> Response:
    """One model, as GET /models lists it."""
    return json_response(_registry().entry(name).describe())


@bp.get("/models/<name>/versions/<version>")
@auth.login_required
def model_version(name: str, version: str) -> Response:
    """One version of a model (named or by alias): its metadata and backend."""
    return json_response(_registry().resolve(name, version).describe())


def _registry() -> Registry:
    """The registry create_app loaded."""
    return current_app.extensions["sibyl.registry"]


def _predict(model: Model) -> Response:
    """Predict every row of the body with model; add class probabilities when asked."""
    # Logged from here on, so a refused body's line still says which model it was sent to.
    g.log.update(model=model.name, version=model.version)
    body = read_json()
    field = _rows_field(body)
    proba = _wants_probabilities(body)
    if proba and not model.has_proba:
        raise invalid(f"model {model.name} is a {model.task} model and gives no probabilities; drop 'probabilities'")
    X = to_matrix(body[field], model, current_app.config["MAX_ROWS"], field)
    # Parse Cache-Control only when sent: werkzeug's parser costs more than the rest of a cache hit. Lowercased
    # first: directives are case-insensitive (RFC 9111 5.2), werkzeug matches them exactly.
    lookup, store = True, True
    if sent := request.environ.get("HTTP_CACHE_CONTROL"):
        cc = parse_cache_control_header(sent.lower(), cls=RequestCacheControl)
        lookup, store = not cc.no_cache, not cc.no_store
    cache = current_app.extensions["sibyl.cache"]
    result = pipeline.predict(model, X, proba, cache, lookup=lookup, store=store, user=auth.current_user())
    g.log.update(rows=len(X), cache=result.cache, cache_hits=result.hits)
    g.timings = result.timings
    answered = {"name": result.model.name, "version": result.model.version}
    payload = {"predictions": result.predictions, "model": answered}
    if result.probabilities is not None:
        payload["probabilities"] = result.probabilities
    return json_response(payload, headers=cache_headers(result))


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
