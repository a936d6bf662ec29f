"""(0) POST /predict in its common form, answered straight from WSGI: the native route's own steps (auth, limits,
body, rows, the one pipeline, the reply, metrics, the log line) called with what the environ holds, without Flask's
request dispatch (its context, routing, hooks and response objects cost 80-130 us a request, docs/benchmark.md).
Anything else (another path or method, a query string, a compressed, chunked or oversized body, another media type,
a bearer token, a browser's cross-site headers, the metrics listener, credentials that don't check out) goes to
Flask untouched, before any step has counted it, and gets the same answer there."""

from collections.abc import Callable
from time import perf_counter

from flask import Flask
from werkzeug.datastructures import Authorization
from werkzeug.http import HTTP_STATUS_CODES

from app.auth import check_key
from app.errors import ApiError, crashed, error_body
from app.metrics import arrived_on, listener_port
from app.protocols import body_of, cache_headers, json_bytes, parse_json, serve
from app.protocols.native import answer, rows_from
from app.request_log import request_id, server_timing

PATH = "/predict"
ENDPOINT, PROTOCOL = "native.predict", "native"  # the Flask route it stands for, in metrics
_JSON = "application/json"


class DirectPredict:
    """WSGI middleware over Flask's wsgi_app: the common POST /predict here, everything else to Flask."""

    def __init__(self, app: Flask, flask_wsgi: Callable) -> None:
        self.flask = flask_wsgi
        self.ext = app.extensions
        self.limit = app.config["MAX_CONTENT_LENGTH"]
        self.max_rows = app.config["MAX_ROWS"]
        # With METRICS_BIND, a request that came in on the metrics listener is Flask's (which answers it 404).
        self.metrics_port = listener_port(app.config)

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        length = self._length(environ)
        user = self.caller(environ) if length is not None else None
        if user is None:
            return self.flask(environ, start_response)
        return self._predict(environ, start_response, user, length)

    def _length(self, environ: dict) -> int | None:
        """The body's length when the request is the form answered here (see the module's docstring), else None."""
        sent = environ.get("CONTENT_LENGTH", "")
        plain = (
            environ["PATH_INFO"] == PATH
            and environ["REQUEST_METHOD"] == "POST"
            and environ.get("CONTENT_TYPE") == _JSON
            and not environ.get("QUERY_STRING")
            # Not "/predict" as sent (%2F, an absolute URI): Flask's own checks decide.
            and environ.get("RAW_URI", PATH) == PATH
            and sent.isdigit()
            and (length := int(sent)) <= self.limit  # parsed once the cheaper checks passed
            and "HTTP_CONTENT_ENCODING" not in environ
            and "HTTP_TRANSFER_ENCODING" not in environ
            and "HTTP_ORIGIN" not in environ
            and "HTTP_SEC_FETCH_SITE" not in environ
            and self.ext["sibyl.registry"].default_model is not None
            and (self.metrics_port is None or not arrived_on(environ, self.metrics_port))
        )
        return length if plain else None

    def caller(self, environ: dict) -> str | None:
        """The user whose basic-auth credentials check out (parsed by Werkzeug, as flask-httpauth's are), or None."""
        parsed = Authorization.from_header(environ.get("HTTP_AUTHORIZATION"))
        if parsed is None or parsed.type != "basic":
            return None
        return check_key(self.ext["sibyl.users"], parsed.username, parsed.password)

    def _predict(self, environ: dict, start_response: Callable, user: str, length: int) -> list[bytes]:
        """The native route's steps for an authenticated request; every failure in its JSON shape."""
        start = perf_counter()
        ext = self.ext
        rid = request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        remote = environ.get("REMOTE_ADDR")
        in_flight = ext["sibyl.metrics"].in_flight
        in_flight.inc()
        logged: dict = {"user": user}
        timings, headers = None, {}
        try:
            try:
                ext["sibyl.limits"].count(user, ext["sibyl.users"][user].roles, remote)
                registry = ext["sibyl.registry"]
                model = registry.resolve(registry.default_model)
                logged.update(model=model.name, version=model.version)
                body = parse_json(body_of(environ, length, self.limit))
                X, proba = rows_from(body, model, self.max_rows)
                cache_control = environ.get("HTTP_CACHE_CONTROL")
                result = serve(ext, model, X, proba, user, rid, logged, cache_control)
                status, data, headers, timings = (
                    200,
                    json_bytes(answer(result)),
                    cache_headers(result),
                    result.timings,
                )
            except ApiError as e:
                status, data, headers = e.status, error_body(e.code, e.message, rid), e.headers or {}
            except Exception:  # noqa: BLE001 - a bug: logged with its trace, a generic 500 for the caller
                e = crashed(rid)
                status, data = e.status, error_body(e.code, e.message, rid)
            duration = ext["sibyl.request_log"].done(
                rid, remote, "POST", PATH, ENDPOINT, PROTOCOL, status, start, logged, timings
            )
        finally:
            in_flight.dec()
        start_response(
            f"{status} {HTTP_STATUS_CODES[status].upper()}",
            [
                ("Content-Type", _JSON),
                ("Content-Length", str(len(data))),
                *headers.items(),
                ("X-Request-ID", rid),
                ("Server-Timing", server_timing(duration)),
            ],
        )
        return [data]


def wrap(app: Flask) -> None:
    """Put DirectPredict in front of the app's WSGI callable (inside any ProxyFix added after it)."""
    app.wsgi_app = DirectPredict(app, app.wsgi_app)
