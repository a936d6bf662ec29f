"""One JSON error shape per protocol: Sibyl's own is {"error": {"code", "message", "request_id"}}."""

import logging
from collections.abc import Callable

import orjson
from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import HTTPException, MethodNotAllowed

log = logging.getLogger(__name__)

# Machine-readable codes for the HTTP errors Flask/Werkzeug raise themselves.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}


def code_for(status: int) -> str:
    """The machine-readable code for an HTTP status: the app's errors and the ones gunicorn answers itself."""
    return _CODES.get(status, "http_error")


# Werkzeug's default descriptions are written for HTML pages; these tell an API caller what to do.
_MESSAGES = {
    404: "No such endpoint. See the README for the endpoints Sibyl serves.",
    405: "This endpoint does not accept that method.",
    413: "The request body is larger than this server accepts (MAX_BODY_BYTES); send fewer rows per request.",
}


class StartupError(RuntimeError):
    """Configuration or model problem that must stop startup with one clear line."""


class ApiError(Exception):
    """A client-facing failure with its status, code and a message that says how to fix the request."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str, request_id: str | None) -> bytes:
    """The one JSON error body, also sent for the requests gunicorn rejects before the app sees them."""
    return orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})


# A protocol's error body from (status, code, message, request_id), by the name of the blueprint that serves it.
Shape = Callable[[int, str, str, str | None], dict]
_SHAPES: dict[str, Shape] = {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    """Build the response every non-2xx answer from the app uses, in the shape of the protocol that was called
    (so auth's 401 and Werkzeug's 413 reach an MLflow client in MLflow's shape)."""
    shape = _SHAPES.get(_blueprint()) if has_request_context() else None
    if shape is None:
        body = error_body(code, message, g.get("request_id"))
    else:
        body = orjson.dumps(shape(status, code, message, g.get("request_id")))
    return Response(body, status=status, headers=headers, mimetype="application/json")


def _blueprint() -> str | None:
    """The blueprint whose error shape a request gets: the one that routed it. When routing failed, Flask names
    none: for a wrong method, the blueprint that serves the path with a method it allows (GET /invocations is a
    405 in MLflow's shape); else the one whose url_prefix the path is under (an unknown /v1/... path in KServe's)."""
    if request.blueprint:
        return request.blueprint
    e = request.routing_exception
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        try:
            endpoint, _ = current_app.url_map.bind_to_environ(request.environ).match(method=e.valid_methods[0])
            return endpoint.rpartition(".")[0] or None
        except HTTPException:
            pass
    path = request.path
    for bp in current_app.blueprints.values():
        prefix = (bp.url_prefix or "").rstrip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return bp.name
    return None


def render_api_error(e: ApiError) -> Response:
    """An ApiError in the one shape."""
    return error_response(e.status, e.code, e.message, e.headers)


def render_http_error(e: HTTPException) -> Response:
    """A Werkzeug HTTP error (404, 405, 413, ...) in the one shape, with a message written for API callers."""
    status = e.code or 500
    message = _MESSAGES.get(status) or e.description or "Request failed."
    headers = {"Allow": ", ".join(e.valid_methods)} if getattr(e, "valid_methods", None) else None
    return error_response(status, code_for(status), message, headers)


def render_unreadable_body(e: ParseException | NoMoreData) -> Response:
    """A chunked body gunicorn could not parse, or that ended early: the client's fault (400), not a crash to log with
    a trace."""
    # gunicorn parses a chunked body only as the app reads it, so its framing errors surface in the view; a client
    # that closes before the last chunk (or after a chunk size it never sends) raises NoMoreData there.
    message = "The request body could not be read: its chunked framing is invalid or it ended early."
    return error_response(400, "bad_request", message)


CRASH = ApiError(500, "internal_error", "Internal server error; quote the request_id when reporting it.")


def crashed(request_id: str | None) -> ApiError:
    """A bug, in an exception handler: its trace to the server log, tied to the request id; the caller gets a
    generic 500 (CRASH)."""
    log.exception("unhandled error (request_id=%s)", request_id)
    return CRASH


def render_crash(e: Exception) -> Response:
    """A bug: a generic 500 for the caller; the trace stays in the server log, tied to the request id."""
    return render_api_error(crashed(g.get("request_id")))


def register_handlers(target: Flask | Blueprint, shape: Shape | None = None) -> None:
    """Render every failure of an app or a blueprint: in Sibyl's shape, or in a protocol's own shape when given."""
    if shape is not None:
        _SHAPES[target.name] = shape
    target.register_error_handler(ApiError, render_api_error)
    target.register_error_handler(HTTPException, render_http_error)
    target.register_error_handler(ParseException, render_unreadable_body)
    target.register_error_handler(NoMoreData, render_unreadable_body)
    target.register_error_handler(Exception, render_crash)


def init_app(app: Flask) -> None:
    """The app-wide fallback, for what happens outside any blueprint: unknown URLs (404), wrong methods (405)."""
    register_handlers(app)
