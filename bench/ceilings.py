"""Upper bounds for Sibyl under the same gunicorn settings: a raw WSGI callable and a one-route Flask app."""

import orjson
from flask import Flask, request

# Both answer with a constant, so what they measure is gunicorn + parsing the same body, nothing else.
_BODY = orjson.dumps({"predictions": [0]})
_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))]


def raw_app(environ: dict, start_response) -> list[bytes]:
    """Read and parse the JSON body with orjson (Sibyl's parser), then return a constant JSON."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:  # GET /health during start-up has no body
        orjson.loads(environ["wsgi.input"].read(length))
    start_response("200 OK", _HEADERS)
    return [_BODY]


flask_app = Flask(__name__)


@flask_app.post("/predict")
def predict() -> dict:
    """Parse the body the way most Flask apps do (request.get_json) and return a dict."""
    request.get_json()
    return {"predictions": [0]}
