"""Sibyl's own protocol: POST /predict and /models/<name>[/versions/<v>]/predict, GET /models, in Sibyl's shapes."""

import numpy as np
from flask import Blueprint, Response, request

import config
from app import errors
from app.auth import auth
from app.openapi import (
    PREDICT_STATUSES,
    csv_content,
    instance_schema,
    json_body,
    models_for,
    one_of_models,
    predict_answer,
    request_object,
    row_schema,
)
from app.pipeline import Prediction
from app.protocols import (
    cache_headers,
    default_model,
    json_response,
    log_model,
    max_rows,
    read_body,
    read_json,
    registry,
    run,
    utf8_only,
)
from app.registry import Model, Registry
from app.validation import field_name, from_csv, invalid, to_matrix

bp = Blueprint("native", __name__)
# This protocol's errors (its own and Werkzeug's raised in its views) render in Sibyl's one JSON shape. A protocol
# with another error shape registers its own renderers on its own blueprint here; the app-wide handlers only answer
# what no blueprint owns (unknown URLs, wrong methods).
errors.register_handlers(bp)

# "data" is the key a widely copied Flask tutorial sends; it means what "features" means.
_FIELDS = ("features", "instances", "data")
_KEYS = {*_FIELDS, "probabilities"}
_MEDIA = (
    "Send the rows as JSON (Content-Type: application/json), or as CSV with a header row (Content-Type: text/csv, "
    "probabilities as ?probabilities=true)."
)


@bp.post("/predict")
@auth.login_required
def predict() -> Response:
    """Predict with the default model."""
    return _predict(default_model("/models/<name>/predict"))


@bp.post("/models/<name>/predict")
@auth.login_required
def predict_model(name: str) -> Response:
    """Predict with a model's default version (or a version drawn by its traffic split)."""
    return _predict(registry().resolve(name))


@bp.post("/models/<name>/versions/<version>/predict")
@auth.login_required
def predict_version(name: str, version: str) -> Response:
    """Predict with one version of a model, named or by alias."""
    return _predict(registry().resolve(name, version))


@bp.get("/models")
@auth.login_required
def models() -> Response:
    """Every model served: versions with their metadata and backend, aliases, traffic, and unavailable versions;
    and which load of the registry answers (generation, loaded_at)."""
    served = registry()
    return json_response({"models": served.describe(), "generation": served.generation, "loaded_at": served.loaded_at})


@bp.get("/models/<name>")
@auth.login_required
def model(name: str) -> Response:
    """One model, as GET /models lists it."""
    return json_response(registry().entry(name).describe())


@bp.get("/models/<name>/versions/<version>")
@auth.login_required
def model_version(name: str, version: str) -> Response:
    """One version of a model (named or by alias): its metadata and backend."""
    return json_response(registry().resolve(name, version).describe())


def _predict(model: Model) -> Response:
    """Predict every row of the body (JSON, or CSV with a header row) with model; add class probabilities when
    asked."""
    log_model(model)
    arg = request.args.get("probabilities", "") if request.query_string else ""
    if request.mimetype == "text/csv":
        # A file as it is: `curl --data-binary @rows.csv`, or the web page's batch tab.
        utf8_only()
        X, proba = from_csv(read_body(), model, max_rows()), _wants_probabilities({}, arg)
        _check_probabilities(model, proba)
    else:
        X, proba = rows_from(read_json(_MEDIA), model, max_rows(), arg)
    result = run(model, X, proba)
    return json_response(answer(result), headers=cache_headers(result))


def rows_from(body: dict, model: Model, max_rows: int, arg: str = "") -> tuple[np.ndarray, bool]:
    """A JSON body's rows as the model's matrix, and whether it asks for probabilities (in the body, or ?probabilities=
    as arg); a 400 saying what to fix otherwise."""
    field = _rows_field(body)
    proba = _wants_probabilities(body, arg)
    X = to_matrix(body[field], model, max_rows, field)
    _check_probabilities(model, proba)
    return X, proba


def answer(result: Prediction) -> dict:
    """The reply's body: one prediction per row, the version that answered, probabilities when asked."""
    payload = {"predictions": result.predictions, "model": {"name": result.model.name, "version": result.model.version}}
    if result.probabilities is not None:
        payload["probabilities"] = result.probabilities
    return payload


def _check_probabilities(model: Model, proba: bool) -> None:
    """A 400 when probabilities are asked of a model that gives none."""
    if proba and not model.has_proba:
        raise invalid(f"model {model.name} is a {model.task} model and gives no probabilities; drop 'probabilities'")


def _rows_field(body: dict) -> str:
    """Which key holds the rows; unknown keys are refused so a typo is not silently ignored."""
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        hint = "the body takes 'features' (or 'instances' or 'data'), and 'probabilities'"
        raise invalid(f"unknown field {field_name(unknown[0])}; {hint}")
    present = [f for f in _FIELDS if f in body]
    if len(present) != 1:
        raise invalid('send the rows in exactly one of "features", "instances" or "data", e.g. {"features": [[...]]}')
    return present[0]


def _wants_probabilities(body: dict, arg: str) -> bool:
    """ "probabilities": true in the body, or ?probabilities=true (arg, the query's value)."""
    flag = body.get("probabilities", False)
    if type(flag) is not bool:
        raise invalid("'probabilities' must be true or false")
    try:
        if arg != arg.strip():  # the documented pattern has no spaces (and a schema's \s is not Python's)
            raise ValueError(arg)
        # The words every Sibyl setting takes (config.flag); an empty ?probabilities= reads as absent.
        return flag or (config.flag(arg) if arg else False)
    except ValueError:
        raise invalid("?probabilities= must be true or false (or 1/0, yes/no, on/off)") from None


_ROUTES = {"native.predict": "default", "native.predict_model": "model", "native.predict_version": "version"}


def openapi_operation(endpoint: str, method: str, registry: Registry, config) -> dict | None:
    """This protocol's part of an operation in GET /openapi.json: the predict routes' bodies and answers."""
    if endpoint not in _ROUTES:
        return None
    models = models_for(_ROUTES[endpoint], registry)
    schema = one_of_models([_request_schema(m, config["MAX_ROWS"]) for m in models.values()])
    examples = {key: {"features": [m.sample_row]} for key, m in models.items()}
    single = endpoint == "native.predict"
    body = json_body(schema, examples, single)
    body["content"] |= csv_content(models, config["MAX_ROWS"], single)
    ok = predict_answer("One prediction per row, and which model version answered.", _PREDICT_RESPONSE)
    return {"requestBody": body, "ok": ok, "statuses": PREDICT_STATUSES, "parameters": [_PROBABILITIES_PARAMETER]}


def _any_case(word: str) -> str:
    """A regular expression matching word in any case (JSON Schema's patterns have no case-insensitive flag)."""
    return "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in word)


# The query's switch: the one way a CSV body asks for probabilities (a JSON body may say it in the body too). Its
# words are config.flag's, in any case; an empty value reads as absent.
_PROBABILITIES_PARAMETER = {
    "name": "probabilities",
    "in": "query",
    "required": False,
    "description": "Add each row's class probabilities (true/false, 1/0, yes/no, on/off).",
    "schema": {"type": "string", "pattern": f"^(?:{'|'.join(map(_any_case, config.FLAGS))})?$"},
}


def _request_schema(model: Model, max_rows: int) -> dict:
    """What a model takes: rows of n_features numbers, or objects keyed by its feature names."""
    rows = {"type": "array", "items": row_schema(model), "minItems": 1, "maxItems": max_rows}
    instances = {"type": "array", "items": instance_schema(model), "minItems": 1, "maxItems": max_rows}
    proba = {"type": "boolean", "description": "Add each row's class probabilities."}
    if not model.has_proba:
        proba = {"type": "boolean", "enum": [False], "description": f"{model.task} model: no probabilities."}
    properties = {
        "features": rows | {"description": f"Rows of {model.n_features} numbers, in the model's feature order."},
        "instances": instances | {"description": "Rows as arrays, or as objects keyed by feature name."},
        "data": instances | {"description": "The same as instances (the key some tutorials send)."},
        "probabilities": proba,
    }
    return request_object(model, properties, _FIELDS)


_PREDICT_RESPONSE = {
    "type": "object",
    "required": ["predictions", "model"],
    "properties": {
        "predictions": {"type": "array", "items": {"type": ["number", "string", "boolean"]}},
        "model": {"$ref": "#/components/schemas/ModelRef"},
        "probabilities": {
            "type": "array",
            "description": "Per row, each class label's probability (when asked).",
            "items": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
}
