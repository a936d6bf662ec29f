"""MLflow's scoring protocol: POST /invocations (and per model), GET /ping and /version, in MLflow's wire shapes.

The shapes are MLflow 2.x's scoring server (mlflow/pyfunc/scoring_server/__init__.py) and its documented examples
(https://mlflow.org/docs/latest/ml/deployment/deploy-model-locally, "Accepted Input Formats"): a JSON object with
exactly one of dataframe_split, dataframe_records, instances or inputs, and optional params; or text/csv with a
header row. Answers are {"predictions": [...]}; errors are MLflow's {"error_code", "message"}, never a stack_trace.
"""

from flask import Blueprint, Response, request

from app import errors
from app.auth import auth
from app.errors import ApiError
from app.openapi import (
    API_VERSION,
    PREDICT_STATUSES,
    column_labels,
    csv_content,
    json_answer,
    json_body,
    models_for,
    one_of_models,
    predict_answer,
    request_object,
    row_schema,
)
from app.protocols import (
    cache_headers,
    default_model,
    json_response,
    log_model,
    max_rows,
    parse_json,
    read_body,
    registry,
    run,
    utf8_only,
)
from app.registry import Model, Registry
from app.validation import column_order, field_name, from_columns, from_csv, invalid, reorder, to_matrix

bp = Blueprint("mlflow", __name__)

# MLflow's error codes (mlflow/protos/databricks.proto) by HTTP status, as MLflow's ERROR_CODE_TO_HTTP_STATUS
# (mlflow/exceptions.py) maps them back: an MLflow client's RestException turns the code into that status again.
# MLflow has no code of its own for 405, 413 or 415; BAD_REQUEST ("the request is invalid") maps back to a 4xx,
# where any other choice would read as a server fault (INTERNAL_ERROR) or a throttle worth retrying (429 codes).
_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",  # no such model or version: MLflow's model registry answers this one
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    503: "TEMPORARILY_UNAVAILABLE",
}


def error_shape(status: int, code: str, message: str, request_id: str | None) -> dict:
    """An error in MLflow's shape (MlflowException.serialize_as_json, without a stack_trace); the request id is in
    the X-Request-ID header."""
    if status == 404 and code == "not_found":
        error_code = "ENDPOINT_NOT_FOUND"  # a URL no route serves, as MLflow's HTTP_STATUS_TO_ERROR_CODE names it
    else:
        error_code = _ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
    return {"error_code": error_code, "message": message}


errors.register_handlers(bp, error_shape)

_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_SPLIT_KEYS = frozenset({"columns", "data", "index"})
_METHODS = ("predict", "predict_proba")
_EXAMPLE = '{"dataframe_split": {"columns": [...], "data": [[...]]}}'
_REQUIRED = (
    f"The body must hold exactly one of {', '.join(_FORMATS)} (and optionally params), e.g. {_EXAMPLE}. "
    "MLflow 2.0 changed the scoring protocol: a bare {columns, data} object or a list is the 1.x format."
)
_MEDIA = (
    "Send JSON (Content-Type: application/json) holding one of dataframe_split, dataframe_records, instances or "
    "inputs, or CSV with a header row (Content-Type: text/csv)."
)


@bp.post("/invocations")
@auth.login_required
def invocations() -> Response:
    """Predict with the default model, as MLflow's scoring server does."""
    return _invoke(default_model("/models/<name>/invocations"))


@bp.post("/models/<name>/invocations")
@auth.login_required
def invocations_model(name: str) -> Response:
    """Predict with a model's default version (or a version drawn by its traffic split), in MLflow's shapes."""
    return _invoke(registry().resolve(name))


@bp.post("/models/<name>/versions/<version>/invocations")
@auth.login_required
def invocations_version(name: str, version: str) -> Response:
    """Predict with one version of a model, named or by alias, in MLflow's shapes."""
    return _invoke(registry().resolve(name, version))


@bp.get("/ping")
def ping() -> Response:
    """Liveness for MLflow's clients (they read only the status): the same answer as /health."""
    # MLflow answers 200 once its model is loaded; Sibyl does not start without its models, so 200 is that fact.
    return json_response({"status": "ok"})


@bp.get("/version")
@auth.login_required
def version() -> Response:
    """The version of Sibyl's API contract, as a bare string like MLflow's /version (for callers with a key)."""
    # MLflow's /version tells anyone its library version. Sibyl's public routes reveal no versions, and Sibyl is not
    # MLflow: claiming an MLflow version would be false, and library versions help only an attacker. So this answers
    # the API version OpenAPI's info.version states, behind the same auth as predictions.
    return Response(API_VERSION, mimetype="text/plain")


def _invoke(model: Model) -> Response:
    """Predict every row of a JSON or CSV body with model; the params choose labels or class probabilities."""
    log_model(model)
    media = _media_type()
    data = read_body()
    if media == "text/csv":
        X, proba = from_csv(data, model, max_rows()), False
    else:
        body = parse_json(data, _EXAMPLE)
        X, proba = _from_json(body, model), _wants_proba(body.get("params"), model)
    result = run(model, X, proba)
    # MLflow returns predict_proba's array as is: per row, each class's probability in the model's class order.
    predictions = [list(row.values()) for row in result.probabilities] if proba else result.predictions
    return json_response({"predictions": predictions}, headers=cache_headers(result))


def _media_type() -> str:
    """application/json or text/csv, UTF-8; anything else is a 415, as in MLflow's scoring server."""
    media = request.mimetype
    if media not in ("application/json", "text/csv"):
        raise ApiError(415, "unsupported_media_type", _MEDIA)
    utf8_only()
    if other := sorted(set(request.mimetype_params) - {"charset"}):
        # MLflow 2.0 dropped format=pandas-split and the like, and MLflow itself answers them with a 415.
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Unknown Content-Type parameter {field_name(other[0])}: MLflow 2.0 dropped format=...; send "
            f"Content-Type: application/json with the format as the body's key, e.g. {_EXAMPLE}.",
        )
    return media


def _from_json(body: dict, model: Model):
    """The rows under the body's one format key, as the model's matrix."""
    if unknown := sorted(set(body) - {*_FORMATS, "params"}):
        raise invalid(f"Unknown field {field_name(unknown[0])}. {_REQUIRED}")
    present = [f for f in _FORMATS if f in body]
    if len(present) != 1:
        raise invalid(_REQUIRED)
    field = present[0]
    value = body[field]
    if field == "dataframe_split":
        return _from_split(value, model)
    if field == "dataframe_records":
        return _from_records(value, model, field)
    # TF serving's shapes, as MLflow reads them: rows, records (a list of objects) or an object of columns.
    if type(value) is dict:
        return from_columns(value, model, max_rows(), field)
    if type(value) is list and value and type(value[0]) is dict:
        return _from_records(value, model, field)
    return to_matrix(value, model, max_rows(), field)


def _from_split(split: object, model: Model):
    """pandas' orient="split" ({"columns", "data"}, optional "index"): columns by name, rows in data's order."""
    if type(split) is not dict or not {"columns", "data"} <= set(split):
        raise invalid(f"dataframe_split must be an object with columns and data, e.g. {_EXAMPLE}")
    if unknown := sorted(set(split) - _SPLIT_KEYS):
        raise invalid(f"dataframe_split has unknown field {field_name(unknown[0])}; it takes columns, data and index")
    names = _column_names(split["columns"], "dataframe_split.columns")
    data, index = split["data"], split.get("index")
    # The index labels rows; predictions follow data's order, as MLflow returns them.
    if index is not None and type(index) is not list:
        raise invalid("dataframe_split.index must be a list with one label per row of data")
    if index is not None and type(data) is list and len(index) != len(data):
        # 422, not 400: a JSON schema can say index is a list, not that it is as long as data.
        raise ApiError(422, "invalid_input", "dataframe_split.index must hold one label per row of data")
    order = column_order(names, model, "dataframe_split.columns")
    return to_matrix(
        reorder(data, order, len(names), "dataframe_split.data"), model, max_rows(), "dataframe_split.data"
    )


def _column_names(columns: object, where: str) -> object:
    """Column labels as strings: pandas sends an unnamed DataFrame's columns as 0, 1, ... (to_dict(orient="split"))."""
    if type(columns) is list and all(type(c) is int for c in columns):
        return [str(c) for c in columns]
    return columns  # column_order says what is wrong with anything else


def _from_records(records: object, model: Model, field: str):
    """pandas' orient="records": one object per row, keyed by column name, every row naming the same columns."""
    if type(records) is not list or not records or type(records[0]) is not dict:
        raise invalid(f"{field} must be a non-empty list of objects, one per row, keyed by column name")
    names = list(records[0])
    order = column_order(names, model, f"{field}[0]")
    first = records[0].keys()
    rows = []
    for i, record in enumerate(records):
        if type(record) is not dict:
            raise invalid(f"{field}[{i}] is not an object; every row must be an object keyed by column name")
        if record.keys() != first:
            column_order(list(record), model, f"{field}[{i}]")  # names the missing and unknown columns, when named
            raise invalid(f"{field}[{i}] names other columns than {field}[0]; every row must name the same columns")
        rows.append([record[n] for n in names])
    return to_matrix(reorder(rows, order, len(names), field), model, max_rows(), field)


def _wants_proba(params: object, model: Model) -> bool:
    """Whether params ask for predict_proba: MLflow's convention {"predict_method": "predict" | "predict_proba"}."""
    if params is None:
        return False
    if type(params) is not dict:
        raise invalid('params must be an object, e.g. {"predict_method": "predict_proba"}')
    if unknown := sorted(set(params) - {"predict_method"}):
        raise invalid(f"Unknown param {field_name(unknown[0])}; the one param is predict_method")
    method = params.get("predict_method", "predict")
    if type(method) is not str or method not in _METHODS:
        raise invalid("params.predict_method must be 'predict' or 'predict_proba'")
    if method == "predict_proba" and not model.has_proba:
        raise invalid(f"Model {model.name} is a {model.task} model and has no predict_proba; use 'predict'")
    return method == "predict_proba"


# --- OpenAPI: this protocol's part of GET /openapi.json ---

PUBLIC = frozenset({"mlflow.ping"})
ERROR_SCHEMA = (
    "MlflowError",
    {
        "type": "object",
        "required": ["error_code", "message"],
        "properties": {
            "error_code": {
                "type": "string",
                "description": "an MLflow error code (databricks.proto), e.g. BAD_REQUEST, UNAUTHENTICATED",
            },
            "message": {"type": "string", "description": "what went wrong and how to fix the request"},
        },
    },
)
_ROUTES = {
    "mlflow.invocations": "default",
    "mlflow.invocations_model": "model",
    "mlflow.invocations_version": "version",
}


def openapi_operation(endpoint: str, method: str, registry: Registry, config) -> dict | None:
    """The invocations routes' bodies (JSON and CSV) and answers, /ping's and /version's answers."""
    if endpoint == "mlflow.ping":
        schema = {"type": "object", "properties": {"status": {"const": "ok"}}}
        return {"ok": json_answer("The server is up.", schema)}
    if endpoint == "mlflow.version":
        text = {"text/plain": {"schema": {"type": "string"}, "example": API_VERSION}}
        return {"ok": {"description": "The version of Sibyl's API contract.", "content": text}}
    if endpoint not in _ROUTES:
        return None
    models = models_for(_ROUTES[endpoint], registry)
    single = endpoint == "mlflow.invocations"
    schema = one_of_models([_request_schema(m, config["MAX_ROWS"]) for m in models.values()])
    body = json_body(schema, {key: _json_example(m) for key, m in models.items()}, single)
    body["content"] |= csv_content(models, config["MAX_ROWS"], single)
    ok = predict_answer(
        "One prediction per row (with predict_proba, each row's class probabilities in class order).", _RESPONSE
    )
    return {"requestBody": body, "ok": ok, "statuses": PREDICT_STATUSES}


def _json_example(model: Model) -> dict:
    """A sample row as MLflow's client sends a DataFrame: dataframe_split."""
    return {"dataframe_split": {"columns": column_labels(model), "data": [model.sample_row]}}


def _request_schema(model: Model, max_rows: int) -> dict:
    """What a model takes in each of MLflow's JSON formats."""
    n, names = model.n_features, model.feature_names
    number = {"type": "number"}
    rows = {"type": "array", "items": row_schema(model), "minItems": 1, "maxItems": max_rows}
    # Named features: exactly those names, in any order (uniqueItems and the count make it a permutation).
    label = {"enum": list(names)} if names else {"type": ["string", "integer"]}
    if names:
        record = {"type": "object", "properties": {k: number for k in names}, "required": list(names)}
        cells = {"anyOf": [number, {"type": "array", "items": number}]}
        columns = {"type": "object", "properties": {k: cells for k in names}, "required": list(names)}
        record["additionalProperties"] = columns["additionalProperties"] = False
    else:
        record = {"type": "object", "minProperties": n, "maxProperties": n, "additionalProperties": number}
        columns = {"type": "object", "minProperties": n, "maxProperties": n}
    records = {"type": "array", "items": record, "minItems": 1, "maxItems": max_rows}
    split = {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {"type": "array", "items": label, "minItems": n, "maxItems": n, "uniqueItems": True},
            "data": rows,
            "index": {
                "type": ["array", "null"],
                "description": "Row labels, one per row (ignored: predictions follow data's order).",
            },
        },
        "additionalProperties": False,
    }
    methods = list(_METHODS) if model.has_proba else ["predict"]
    params = {
        "type": ["object", "null"],  # null: no params, as MLflow reads it
        "properties": {"predict_method": {"enum": methods, "default": "predict"}},
        "additionalProperties": False,
    }
    tensor = {"anyOf": [rows, records, columns]}
    properties = {
        "dataframe_split": split | {"description": "pandas orient='split': column names and rows."},
        "dataframe_records": records | {"description": "pandas orient='records': one object per row."},
        "instances": tensor | {"description": "Rows, records, or an object of columns."},
        "inputs": tensor | {"description": "Rows, records, or an object of columns."},
        "params": params,
    }
    return request_object(model, properties, _FORMATS)


_RESPONSE = {
    "type": "object",
    "required": ["predictions"],
    "properties": {
        "predictions": {
            "type": "array",
            "items": {
                "anyOf": [{"type": ["number", "string", "boolean"]}, {"type": "array", "items": {"type": "number"}}]
            },
        }
    },
}
