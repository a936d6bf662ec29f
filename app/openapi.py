"""GET /openapi.json: the API described from the app's routes and the registry; GET /docs: Swagger UI to try it."""

import inspect
import re
import sys

from flask import Blueprint, Flask, Response, current_app, url_for

from app.auth import METRICS_ENDPOINTS
from app.protocols import json_response
from app.registry import Model, Registry

bp = Blueprint("openapi", __name__)

# Both are public. The document is the contract a Postman or Swagger user imports before they hold a key: routes,
# model names, feature names, shapes and one sample row per model (the row /ready sends; the model's owner ships it
# in the metadata as a sample). It carries nothing about where or how Sibyl runs: no `servers` host (relative "/"),
# no filesystem paths, no library or artifact versions, no digests or backends (those stay behind auth, GET /models).
# /docs is a static page; every call it makes to the API goes through the same auth as curl's. A protocol module
# lists its own public endpoints (health probes) in its PUBLIC.
PUBLIC = frozenset({"health.health", "health.ready", "openapi.spec", "openapi.docs"})
# The version of this API's contract (info.version); a protocol that reports a version reports this one.
API_VERSION = "1"
_ADMIN_PREFIX = "admin."
# Endpoints that serve files, not API operations: the static files, and the web page (for browsers, not API clients).
_NOT_OPERATIONS = frozenset({"static", "page.index"})
_METHODS = ("get", "post", "put", "patch", "delete")
# A route's <converter:argument>, or <argument>.
_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

_ERRORS = {
    400: "The request is malformed or does not fit the model (the message says how to fix it).",
    401: "No valid credentials: HTTP basic auth (user:key) or Authorization: Bearer <key>.",
    403: "The route needs the admin role (GET /metrics: the admin or metrics role).",
    404: "No such model or version (the message lists what is served).",
    409: "A conflict: the rollout was refused (this is not a gunicorn worker, or the models on disk would not load), "
    "or feedback for that request was already received.",
    410: "The request's predictions were kept for FEEDBACK_TTL seconds and have expired.",
    413: "The body is larger than MAX_BODY_BYTES, or holds more than MAX_ROWS rows.",
    415: "The body is not of a media type the route takes, or its Content-Encoding is neither gzip nor deflate.",
    422: "The rows fit the schema, but the model's answer for one is not a finite number (NaN or infinity): its "
    "values are too far outside the range it was trained on.",
    429: "Over the user's request limit, or too many refused logins from this address: retry after the Retry-After "
    "header's seconds.",
    500: "A bug; quote the request_id when reporting it.",
    503: "A model (or the named version) could not be loaded or did not answer.",
}


def operation_endpoints(app: Flask) -> list:
    """The url_map rules the document describes: every route but the static files (and /metrics when METRICS_BIND
    serves it on a private listener: the public port, where this document is, answers 404 for it)."""
    hidden = _NOT_OPERATIONS | ({"metrics.metrics"} if app.config["METRICS_BIND"] else set())
    return [rule for rule in app.url_map.iter_rules() if rule.endpoint not in hidden]


@bp.get("/openapi.json")
def spec() -> Response:
    """This API as an OpenAPI 3.1 document, built from the routes and the models served."""
    return json_response(document(current_app))


@bp.get("/docs")
def docs() -> Response:
    """Swagger UI, from files this server serves (no CDN), reading /openapi.json."""
    css = url_for("static", filename="swagger-ui/swagger-ui.css")
    js = url_for("static", filename="swagger-ui/swagger-ui-bundle.js")
    # validatorUrl null: Swagger UI would otherwise send the document to its public validator for a badge.
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Sibyl API</title><link rel="stylesheet" href="{css}"></head>
<body>
<div id="swagger-ui"></div>
<script src="{js}"></script>
<script>
window.ui = SwaggerUIBundle({{url: "{url_for("openapi.spec")}", dom_id: "#swagger-ui", validatorUrl: null,
  deepLinking: true, tryItOutEnabled: true}});
</script>
</body>
</html>
"""
    return Response(page, mimetype="text/html")


def document(app: Flask) -> dict:
    """The OpenAPI 3.1 document for app: one operation per (rule, method), schemas from the registry."""
    registry: Registry = app.extensions["sibyl.registry"]
    protocols = {_protocol(rule.endpoint) for rule in operation_endpoints(app)} - {None}
    shapes = dict(p.ERROR_SCHEMA for p in sorted(protocols, key=lambda p: p.__name__) if hasattr(p, "ERROR_SCHEMA"))
    paths: dict[str, dict] = {}
    for rule in sorted(operation_endpoints(app), key=lambda r: r.rule):
        path = _PARAM.sub(r"{\1}", rule.rule)  # /v1/models/<model:name> -> /v1/models/{name}
        for method in sorted(m.lower() for m in rule.methods if m.lower() in _METHODS):
            paths.setdefault(path, {})[method] = _operation(app, rule, method, registry)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sibyl",
            "version": API_VERSION,
            "description": "Predictions from scikit-learn models. Every error, 4xx and 5xx, is one JSON shape "
            "(components/schemas/Error). A method a path does not list answers 405 in that shape.",
        },
        "servers": [{"url": "/"}],  # relative: the document never names the host it was fetched from
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA, "ModelRef": _MODEL_REF} | shapes,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic", "description": "user name and API key"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "the API key itself"},
            },
            "responses": {
                _error_key(shape, status): _error_response(text, shape, status)
                for shape in ["Error", *shapes]
                for status, text in _ERRORS.items()
            },
        },
    }


def _operation(app: Flask, rule, method: str, registry: Registry) -> dict:
    """One operation: summary from the view's docstring, parameters, security and errors here; the body and the
    answer from the protocol module that serves it (its openapi_operation), in that protocol's error shape."""
    endpoint = rule.endpoint
    view = inspect.unwrap(app.view_functions[endpoint])
    doc = inspect.getdoc(view) or endpoint
    summary, _, rest = doc.partition("\n")
    op: dict = {"operationId": endpoint.replace(".", "_"), "summary": summary.strip(), "tags": [endpoint.split(".")[0]]}
    if rest.strip():
        op["description"] = " ".join(doc.split())
    params = [_path_parameter(arg, registry) for arg in rule.arguments]
    path = _PARAM.sub(r"{\1}", rule.rule)
    params.sort(key=lambda p: path.index(f"{{{p['name']}}}"))
    statuses = [500]
    protocol = _protocol(endpoint)
    if endpoint not in PUBLIC and endpoint not in getattr(protocol, "PUBLIC", ()):
        op["security"] = [{"basic": []}, {"bearer": []}]
        statuses += [401, 429]
    if endpoint.startswith(_ADMIN_PREFIX) or endpoint in METRICS_ENDPOINTS:
        statuses.append(403)
    if rule.arguments:
        statuses += [404, 503] if "version" in rule.arguments else [404]
    if endpoint == "admin.rollout":
        statuses.append(409)
    if endpoint == "health.ready":
        statuses.append(503)
    ok = json_answer("OK", {"type": "object"})
    if endpoint == "openapi.docs":
        ok = {"description": "Swagger UI", "content": {"text/html": {"schema": {"type": "string"}}}}
    if endpoint == "metrics.metrics":
        ok = {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}
    parts = protocol.openapi_operation(endpoint, method, registry, app.config) if protocol else None
    if parts:
        ok = parts.get("ok", ok)
        statuses += list(parts.get("statuses", ()))
        if "requestBody" in parts:
            op["requestBody"] = parts["requestBody"]
        params += parts.get("parameters", [])
    if params:
        op["parameters"] = params
    shape = protocol.ERROR_SCHEMA[0] if protocol and hasattr(protocol, "ERROR_SCHEMA") else "Error"
    op["responses"] = {"202" if endpoint == "admin.rollout" else "200": ok}
    op["responses"].update(
        {str(s): {"$ref": f"#/components/responses/{_error_key(shape, s)}"} for s in sorted(set(statuses))}
    )
    return op


def _protocol(endpoint: str):
    """The module that describes an endpoint's operation: its protocol (app.protocols.<blueprint>), or an app module
    (app.<blueprint>, e.g. feedback) that has an openapi_operation hook."""
    blueprint = endpoint.split(".")[0]
    module = sys.modules.get(f"app.protocols.{blueprint}")
    hooked = sys.modules.get(f"app.{blueprint}")
    return module if module is not None or not hasattr(hooked, "openapi_operation") else hooked


def _error_key(shape: str, status: int) -> str:
    """The components/responses key of a status in an error shape: "400" in Sibyl's, "MlflowError400" in another."""
    return str(status) if shape == "Error" else f"{shape}{status}"


def _path_parameter(arg: str, registry: Registry) -> dict:
    """A path parameter: a model name (the served ones as examples) or a version or alias."""
    if arg == "name":
        names = sorted(registry.entries)
        return {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "A model name (GET /models lists them).",
            "schema": {"type": "string"},
            "examples": {name: {"value": name} for name in names},
        }
    versions = sorted({v for entry in registry.entries.values() for v in [*entry.versions, *entry.aliases]})
    return {
        "name": arg,
        "in": "path",
        "required": True,
        "description": "A version or an alias of the model.",
        "schema": {"type": "string"},
        "examples": {version: {"value": version} for version in versions},
    }


def models_for(route: str, registry: Registry) -> dict[str, Model]:
    """The models a predict route may answer with, keyed by the example's name: route "default" (the default model),
    "model" (every model's default version; other versions may take other features) or "version" (every loaded
    version, keyed "name version")."""
    if route == "default":
        if registry.default_model is None:
            return {}
        entry = registry.entries[registry.default_model]
        return {entry.name: entry.versions[entry.default]}
    if route == "version":
        return {f"{m.name} {m.version}": m for m in registry.loaded()}
    return {name: entry.versions[entry.default] for name, entry in sorted(registry.entries.items())}


def row_schema(model: Model) -> dict:
    """One row as a list of the model's n_features numbers."""
    n = model.n_features
    return {"type": "array", "items": {"type": "number"}, "minItems": n, "maxItems": n}


def instance_schema(model: Model) -> dict:
    """One row as a list, or (when the model has feature names) as an object keyed by them."""
    if not model.feature_names:
        return row_schema(model)
    named = {
        "type": "object",
        "properties": {name: {"type": "number"} for name in model.feature_names},
        "required": list(model.feature_names),
        "additionalProperties": False,
    }
    return {"anyOf": [row_schema(model), named]}


def column_labels(model: Model) -> list:
    """The model's feature names, or the labels pandas gives an unnamed DataFrame's columns (0, 1, ...)."""
    return list(model.feature_names) if model.feature_names else list(range(model.n_features))


def csv_content(models: dict[str, Model], max_rows: int, single: bool) -> dict:
    """A predict route's text/csv request content: a pattern per model, and their examples (see json_body)."""
    schema = one_of_models([_csv_schema(m, max_rows) for m in models.values()])
    return json_body(schema, {key: _csv_example(m) for key, m in models.items()}, single, "text/csv")["content"]


def _csv_example(model: Model) -> str:
    """A sample row as pandas' to_csv(index=False) writes it."""
    header = ",".join(map(str, column_labels(model)))
    return f"{header}\n{','.join(map(repr, model.sample_row))}\n"


def _csv_schema(model: Model, max_rows: int) -> dict:
    """A CSV body as a pattern: the header in the model's column order, then rows of plain decimal numbers. The
    columns may come in any order; a pattern can only say one of them."""
    # Exponents of at most two digits keep every matching number inside float64 (a 1e400 cell is a 400).
    number = r"[+-]?(?:\d{1,17}\.?\d{0,17}|\.\d{1,17})(?:[eE][+-]?\d{1,2})?"
    row = number + f"(?:,{number}){{{model.n_features - 1}}}"
    header = ",".join(re.escape(str(label)) for label in column_labels(model))
    return {
        "type": "string",
        "description": "A header row of column names (any order), then one row of numbers per line.",
        "pattern": f"^{header}\r?\n{row}(?:\r?\n{row}){{0,{max_rows - 1}}}\r?\n?$",
    }


def one_of_models(schemas: list[dict]) -> dict:
    """One schema for a route's models: the schema itself, anyOf when they differ, any object when none."""
    unique = [s for i, s in enumerate(schemas) if s not in schemas[:i]]
    return unique[0] if len(unique) == 1 else {"anyOf": unique} if unique else {"type": "object"}


# The errors every predict route may answer, whatever its protocol: the pipeline and validation are shared.
PREDICT_STATUSES = (400, 404, 413, 415, 422, 503)
# The headers every predict answer carries, as each protocol's operation documents them.
CACHE_HEADERS = {
    "X-Cache": {
        "description": "HIT, MISS, PARTIAL, BYPASS or OFF: what the cache answered",
        "schema": {"type": "string"},
    },
    "X-Cache-Hits": {"description": "how many rows the cache answered", "schema": {"type": "string"}},
}


def request_object(model: Model, properties: dict, fields: tuple) -> dict:
    """A predict body's schema for a model: these properties and no others, the rows in exactly one of fields."""
    return {
        "title": f"{model.name} {model.version}",
        "type": "object",
        "properties": properties,
        "oneOf": [{"required": [field]} for field in fields],
        "additionalProperties": False,
    }


def json_answer(description: str, schema: dict, headers: dict | None = None) -> dict:
    """A JSON answer in the document: its description, schema and (when given) headers."""
    answer: dict = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def predict_answer(description: str, schema: dict) -> dict:
    """A predict route's 200 answer: JSON, with the cache headers every protocol's predictions carry."""
    return json_answer(description, schema, CACHE_HEADERS)


def json_body(schema: dict, examples: dict[str, dict], single: bool, media: str = "application/json") -> dict:
    """A required request body: its schema, and one example per model (a single "example" when single)."""
    content: dict = {"schema": schema}
    if single and examples:
        content["example"] = next(iter(examples.values()))
    elif examples:
        content["examples"] = {key: {"summary": key, "value": value} for key, value in examples.items()}
    return {"required": True, "content": {media: content}}


def _error_response(description: str, shape: str, status: int) -> dict:
    """A documented error status in one protocol's error shape (a 429 with its Retry-After)."""
    response = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}},
    }
    if status == 429:
        seconds = {"type": "integer", "minimum": 1}
        response["headers"] = {
            "Retry-After": {"description": "Seconds until the limit's window ends.", "schema": seconds}
        }
    return response


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "machine-readable, e.g. invalid_input"},
                "message": {"type": "string", "description": "what went wrong and how to fix the request"},
                "request_id": {"type": ["string", "null"], "description": "quote it when reporting a problem"},
            },
        }
    },
}
_MODEL_REF = {
    "type": "object",
    "required": ["name", "version"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
}
