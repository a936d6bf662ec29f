"""KServe's V1 inference protocol: GET /v1/models, GET /v1/models/<name>, POST /v1/models/<name>:predict."""

import numpy as np
from flask import Blueprint, Response
from werkzeug.routing import BaseConverter

from app import errors
from app.auth import auth
from app.errors import ApiError
from app.health import models_answer
from app.openapi import (
    PREDICT_STATUSES,
    instance_schema,
    json_answer,
    json_body,
    models_for,
    one_of_models,
    predict_answer,
    request_object,
)
from app.protocols import (
    cache_headers,
    json_response,
    log_model,
    max_rows,
    parse_json,
    read_body,
    registry,
    run,
)
from app.registry import NAME, Entry, Model, Registry
from app.validation import field_name, from_columns, invalid, to_matrix

# The prefix also gives this protocol the routing failures under /v1 (a wrong method, an unknown path), so a KServe
# client gets KServe's error shape for those too (errors._blueprint).
bp = Blueprint("kserve", __name__, url_prefix="/v1")
# KServe's servers answer every failure as {"error": "<message>"}; the request id is in the X-Request-ID header.
errors.register_handlers(bp, lambda status, code, message, request_id: {"error": message})

# KServe reads "inputs" first, then "instances" (kserve.utils.get_predict_input); both are lists of rows. "inputs"
# may also be TensorFlow Serving's columnar form, an object of feature name -> values, which V1 inherits.
_FIELDS = ("instances", "inputs")
_EXAMPLE = '{"instances": [[...]]}'


class ModelName(BaseConverter):
    """A model name as the registry allows it (registry.NAME): no colon, so /v1/models/iris:predict is never read
    as the model "iris:predict", and a GET of it is routing's own 405 (Allow: POST)."""

    regex = NAME.pattern


# Registered before this blueprint's rules are added, which need it.
bp.record_once(lambda state: state.app.url_map.converters.setdefault("model", ModelName))


@bp.get("/models")
@auth.login_required
def models() -> Response:
    """The names of the models served, as KServe lists them: {"models": [name, ...]}."""
    return json_response({"models": sorted(registry().entries)})


@bp.get("/models/<model:name>")
@auth.login_required
def model_ready(name: str) -> Response:
    """Whether a model can answer: {"name", "ready": true}, or 503 when a version it may answer with cannot."""
    entry = registry().entry(name)
    if not _answers(entry):
        raise ApiError(503, "model_unavailable", f"Model {entry.name} is not ready; GET /models/{entry.name} says why.")
    return json_response({"name": entry.name, "ready": True})


@bp.post("/models/<model:name>:predict")
@auth.login_required
def predict(name: str) -> Response:
    """Predict with a model's default version (or one drawn by its traffic split): {"predictions": [...]}."""
    model = registry().resolve(name)
    log_model(model)
    # Any Content-Type, or none: KServe parses the body as JSON whatever its label; its Python client
    # (InferenceRESTClient) sends no Content-Type and its docs' `curl -d @file` a form type.
    body = parse_json(read_body(), _EXAMPLE)
    result = run(model, _matrix(body, model), False)
    return json_response({"predictions": result.predictions}, headers=cache_headers(result))


def _answers(entry: Entry) -> bool:
    """Whether every version the model's route may draw is loaded and answers its sample row (a fact, as /ready
    checks it, not a flag set at load time)."""
    drawn = [v for v, weight in entry.traffic.items() if weight] or [entry.default]
    return all(v in entry.versions for v in drawn) and models_answer([entry.versions[v] for v in drawn])


def _matrix(body: dict, model: Model) -> np.ndarray:
    """The rows of {"instances": rows} or {"inputs": rows or columns} as the model's matrix; unknown keys refused,
    so a typo is not silently ignored."""
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise invalid(f'unknown field {field_name(unknown[0])}; the body takes "instances" or "inputs"')
    present = [f for f in _FIELDS if f in body]
    if len(present) != 1:
        raise invalid(f'send the rows in exactly one of "instances" or "inputs", e.g. {_EXAMPLE}')
    field = present[0]
    if field == "inputs" and type(body[field]) is dict:
        return from_columns(body[field], model, max_rows(), field)
    return to_matrix(body[field], model, max_rows(), field)


ERROR_SCHEMA = (
    "KserveError",
    {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what went wrong and how to fix the request"}},
        "additionalProperties": False,
    },
)


def openapi_operation(endpoint: str, method: str, registry: Registry, config) -> dict | None:
    """This protocol's part of an operation in GET /openapi.json: bodies and answers in KServe's shapes."""
    if endpoint == "kserve.models":
        return {"ok": json_answer("The names of the models served.", _MODELS_RESPONSE)}
    if endpoint == "kserve.model_ready":
        return {"ok": json_answer("The model answers.", _READY_RESPONSE), "statuses": [503]}
    if endpoint != "kserve.predict":
        return None
    models = models_for("model", registry)
    schema = one_of_models([_request_schema(m, config["MAX_ROWS"]) for m in models.values()])
    examples = {key: {"instances": [m.sample_row]} for key, m in models.items()}
    description = "One prediction per row, from the model's default version (or its traffic split)."
    ok = predict_answer(description, _PREDICT_RESPONSE)
    return {"requestBody": json_body(schema, examples, single=False), "ok": ok, "statuses": PREDICT_STATUSES}


def _request_schema(model: Model, max_rows: int) -> dict:
    """What a model takes: rows (arrays, or objects keyed by feature name) in instances or inputs, or columns."""
    rows = {"type": "array", "items": instance_schema(model), "minItems": 1, "maxItems": max_rows}
    inputs: dict = rows | {"description": "Rows, as instances takes them."}
    if model.feature_names:
        values = {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}, "minItems": 1}]}
        columns = {
            "type": "object",
            "description": "TensorFlow Serving's columnar form: each feature name's values, one per row.",
            "properties": dict.fromkeys(model.feature_names, values),
            "required": list(model.feature_names),
            "additionalProperties": False,
        }
        inputs = {"anyOf": [rows | {"description": "Rows, as instances takes them."}, columns]}
    properties = {
        "instances": rows | {"description": "Rows as arrays, or as objects keyed by feature name."},
        "inputs": inputs,
    }
    return request_object(model, properties, _FIELDS)


_MODELS_RESPONSE = {
    "type": "object",
    "required": ["models"],
    "properties": {"models": {"type": "array", "items": {"type": "string"}}},
}
_READY_RESPONSE = {
    "type": "object",
    "required": ["name", "ready"],
    "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
}
_PREDICT_RESPONSE = {
    "type": "object",
    "required": ["predictions"],
    "properties": {"predictions": {"type": "array", "items": {"type": ["number", "string", "boolean"]}}},
}
