"""(2) Wire formats: each protocol module turns its request into rows and a pipeline result into its reply.

Each protocol owns a blueprint and renders its errors on it with errors.register_handlers(bp, shape), so an MLflow
client gets MLflow's error shape, auth's 401 included. Everything else a protocol needs is here, once: reading the
body, and run(), which calls the one pipeline and logs and counts what it did."""

import zlib

import numpy as np
import orjson
from flask import Response, current_app, g, request
from werkzeug.datastructures import RequestCacheControl
from werkzeug.exceptions import NotFound, RequestEntityTooLarge
from werkzeug.http import parse_cache_control_header

from app import pipeline
from app.auth import auth
from app.errors import ApiError
from app.pipeline import Prediction
from app.registry import Model, Registry

# numpy scalars can reach a reply (e.g. model metadata); orjson writes them natively.
_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY
_BAD_GZIP = "The body is not valid for its Content-Encoding (gzip or deflate): it is corrupt or cut short."


def read_json(media: str = "Send the body as JSON with Content-Type: application/json.") -> dict:
    """The request body (gzip or not) as a JSON object, or 415/413/400 saying what to send instead (media: the 415's
    message)."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", media)
    return parse_json(read_body())


def utf8_only() -> None:
    """A 415 unless the body's charset (if the Content-Type names one) is UTF-8: the text bodies Sibyl reads are."""
    if request.mimetype_params.get("charset", "utf-8").lower() != "utf-8":
        raise ApiError(415, "unsupported_media_type", "Only UTF-8 is accepted; send the body as charset=utf-8.")


def parse_json(data: bytes, example: str = '{"features": [[...]]}') -> dict:
    """A body's bytes as a JSON object, or a 400 saying what is wrong with it (never quoting it); example is the
    body the messages suggest, in the caller's protocol."""
    if not data:
        raise ApiError(400, "invalid_json", f"The request body is empty; send e.g. {example}.")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        # orjson's message gives the position, never the content; NaN and Infinity are not JSON.
        raise ApiError(400, "invalid_json", f"The body is not valid JSON ({e}).") from None
    if type(body) is not dict:
        raise ApiError(400, "invalid_json", f"The body must be a JSON object, e.g. {example}.")
    return body


def read_body() -> bytes:
    """The request body's bytes, inflated when gzip, within MAX_BODY_BYTES (413 past it); b"" when none was sent."""
    return body_of(request.environ, request.content_length, current_app.config["MAX_CONTENT_LENGTH"])


def body_of(environ: dict, length: int | None, limit: int) -> bytes:
    """read_body for a WSGI environ and its Content-Length (None: none sent)."""
    # The body is read from wsgi.input directly, chunked or not. Werkzeug's limited stream would cut a chunked
    # body at the limit without a word (it would then read as broken JSON), and its wrapping costs more than
    # the read itself (about 10 us a request).
    if length is not None and length > limit:
        raise RequestEntityTooLarge()
    if length is None and not environ.get("wsgi.input_terminated"):
        data = b""  # neither a length nor a chunked body: there is nothing to read
    else:
        data = environ["wsgi.input"].read(limit + 1 if length is None else length)
        if len(data) > limit:
            raise RequestEntityTooLarge()
        if length is not None and len(data) < length:
            # The client closed its side before sending Content-Length bytes: what came is not the body it meant.
            raise ApiError(400, "bad_request", "The request body ended before its Content-Length; send all of it.")
    if "HTTP_CONTENT_ENCODING" in environ:
        data = _decode_body(data, environ["HTTP_CONTENT_ENCODING"], limit)
    return data


# zlib's wbits per Content-Encoding: gzip (x-gzip is its old name, RFC 9110 8.4.1.3), and deflate, which HTTP
# defines as the zlib format (RFC 9110 8.4.1.2), what tritonclient's request_compression_algorithm="deflate" sends.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# How much compressed input each inflate call sees (see _decode_body).
_WINDOW = 16 * 1024


def _decode_body(data: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body inflated, at most limit bytes of it (a zip bomb is refused without inflating it all)."""
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            "The Content-Encodings accepted are gzip and deflate; or send the body uncompressed.",
        )
    rest, out = memoryview(data), bytearray()
    while rest:  # a gzip file may hold several members, one after another
        inflater = zlib.decompressobj(wbits=wbits)
        while rest and not inflater.eof:
            # Fed a window at a time: at a member's end zlib copies all the input it was given past that end into
            # unused_data, so feeding the whole rest made a 1 MB body of 40,000 tiny members cost a second of CPU.
            window = rest[:_WINDOW]
            try:
                out += inflater.decompress(window, limit + 1 - len(out))
            except zlib.error:
                raise ApiError(400, "invalid_gzip", _BAD_GZIP) from None
            if len(out) > limit:
                raise ApiError(
                    413, "payload_too_large", "The body inflates past MAX_BODY_BYTES; send fewer rows per request."
                )
            rest = rest[len(window) - len(inflater.unused_data) - len(inflater.unconsumed_tail) :]
        if not inflater.eof:
            raise ApiError(400, "invalid_gzip", _BAD_GZIP)
    return bytes(out)


def json_bytes(payload: dict) -> bytes:
    """A reply's body, serialized with orjson."""
    return orjson.dumps(payload, option=_DUMPS_OPTS)


def json_response(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    """A reply as a Flask response (json_bytes)."""
    return Response(json_bytes(payload), status=status, headers=headers, mimetype="application/json")


def cache_headers(result: Prediction) -> dict:
    """X-Cache tells callers whether the answer came from the cache, and for how many rows."""
    return {"X-Cache": result.cache, "X-Cache-Hits": str(result.hits)}


def log_model(model: Model) -> None:
    """Name the model in the request's log line (called before the body is read, so a refused body's line says
    which model it was sent to)."""
    g.log.update(model=model.name, version=model.version)


def run(model: Model, X: np.ndarray, proba: bool) -> Prediction:
    """serve() for a Flask view: the caller, request id and Cache-Control of the request in hand."""
    cache_control = request.environ.get("HTTP_CACHE_CONTROL")
    result = serve(current_app.extensions, model, X, proba, auth.current_user(), g.request_id, g.log, cache_control)
    g.timings = result.timings
    return result


def serve(
    extensions: dict,
    model: Model,
    X: np.ndarray,
    proba: bool,
    user: str | None,
    request_id: str,
    logged: dict,
    cache_control: str | None,
) -> Prediction:
    """The one pipeline for every protocol, with the app's extensions: Cache-Control honoured, keys scoped to the
    caller, the outcome added to the request's log fields (logged), drift, kept predictions and metrics recorded."""
    # Parse Cache-Control only when sent: werkzeug's parser costs more than the rest of a cache hit. Lowercased
    # first: directives are case-insensitive (RFC 9111 5.2), werkzeug matches them exactly.
    lookup, store = True, True
    if cache_control:
        cc = parse_cache_control_header(cache_control.lower(), cls=RequestCacheControl)
        lookup, store = not cc.no_cache, not cc.no_store
    cache = extensions["sibyl.cache"]
    result = pipeline.predict(model, X, proba, cache, lookup=lookup, store=store, user=user)
    logged.update(rows=len(X), cache=result.cache, cache_hits=result.hits)
    # Monitoring sees every answered row, cache hits included: they are live traffic all the same.
    extensions["sibyl.drift"].observe(result.model, X, result.predictions)
    extensions["sibyl.feedback"].remember(request_id, result.model, result.predictions, user)
    extensions["sibyl.metrics"].prediction(result, len(X))
    return result


def max_rows() -> int:
    """MAX_ROWS, the most rows one request may carry."""
    return current_app.config["MAX_ROWS"]


def refuse_encoded_slash() -> None:
    """404 for a %2F in the path, app-wide. The server decodes it before routing, so /models/a%2Fversions%2F2/predict
    would reach another route as name "a", version "2"; no model or version name holds a slash."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
    if "%2f" in raw.partition("?")[0].lower():
        raise NotFound()


def registry() -> Registry:
    """The registry create_app loaded."""
    return current_app.extensions["sibyl.registry"]


def default_model(route: str) -> Model:
    """The default model's model for a protocol's default route, or a 404 naming the per-model route to use."""
    served = registry()
    if served.default_model is None:
        raise ApiError(
            404,
            "model_not_found",
            f"Several models are served and DEFAULT_MODEL is not set: POST to {route} (GET /models lists them), or "
            "set DEFAULT_MODEL.",
        )
    return served.resolve(served.default_model)
