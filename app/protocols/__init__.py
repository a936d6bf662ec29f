"""(2) Wire formats: each protocol module turns its request into rows and a pipeline result into its reply.

Each protocol owns a blueprint and renders its own errors on it (bp.register_error_handler; native.py uses
errors.register_handlers for Sibyl's one shape), so a protocol with another error shape never leaks Sibyl's."""

import zlib

import orjson
from flask import Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import ApiError
from app.pipeline import Prediction

# numpy scalars can reach a reply (e.g. model metadata); orjson writes them natively.
_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY
_BAD_GZIP = "The body is not valid gzip (Content-Encoding: gzip): it is corrupt or cut short."


def read_json() -> dict:
    """The request body (gzip or not) as a JSON object, or 415/413/400 saying what to send instead."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON with Content-Type: application/json.")
    # The body is read from wsgi.input directly, chunked or not. Werkzeug's limited stream would cut a chunked
    # body at the limit without a word (it would then read as broken JSON), and its wrapping costs more than
    # the read itself (about 10 us a request).
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    environ, length = request.environ, request.content_length
    if length is not None and length > limit:
        raise RequestEntityTooLarge()
    if length is None and not environ.get("wsgi.input_terminated"):
        data = b""  # neither a length nor a chunked body: there is nothing to read
    else:
        data = environ["wsgi.input"].read(limit + 1 if length is None else length)
        if len(data) > limit:
            raise RequestEntityTooLarge()
    if "HTTP_CONTENT_ENCODING" in environ:
        data = _decode_body(data, environ["HTTP_CONTENT_ENCODING"], limit)
    if not data:
        raise ApiError(400, "invalid_json", 'The request body is empty; send e.g. {"features": [[...]]}.')
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        # orjson's message gives the position, never the content; NaN and Infinity are not JSON.
        raise ApiError(400, "invalid_json", f"The body is not valid JSON ({e}).") from None
    if type(body) is not dict:
        raise ApiError(400, "invalid_json", 'The body must be a JSON object, e.g. {"features": [[...]]}.')
    return body


def _decode_body(data: bytes, encoding: str, limit: int) -> bytes:
    """A gzip body inflated, at most limit bytes of it (a zip bomb is refused without inflating it all)."""
    if encoding.strip().lower() not in ("gzip", "x-gzip"):  # x-gzip: the old name, RFC 9110 8.4.1.3
        raise ApiError(
            415, "unsupported_media_type", "The only Content-Encoding accepted is gzip; or send the body uncompressed."
        )
    out = b""
    while data:  # a gzip file may hold several members, one after another
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise ApiError(400, "invalid_gzip", _BAD_GZIP) from None
        if len(out) > limit:
            raise ApiError(
                413, "payload_too_large", "The body inflates past MAX_BODY_BYTES; send fewer rows per request."
            )
        if not inflater.eof:
            raise ApiError(400, "invalid_gzip", _BAD_GZIP)
        data = inflater.unused_data
    return out


def json_response(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    """Serialize a reply with orjson."""
    return Response(
        orjson.dumps(payload, option=_DUMPS_OPTS), status=status, headers=headers, mimetype="application/json"
    )


def cache_headers(result: Prediction) -> dict:
    """X-Cache tells callers whether the answer came from the cache, and for how many rows."""
    return {"X-Cache": result.cache, "X-Cache-Hits": str(result.hits)}
