"""Upper bounds for Sibyl under the same gunicorn settings: a raw WSGI callable, a one-route Flask app, and the same
Flask app with one Redis GET and SET per request."""

import hashlib
import os

import orjson
import redis
from flask import Flask, request

# All answer with a constant, so what they measure is gunicorn + parsing the same body (+ one Redis round trip each
# way, for flask-redis), nothing else.
_BODY = orjson.dumps({"predictions": [0]})
_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))]
# Sibyl's default CACHE_TTL: the SET carries an expiry, as a cache's does.
_TTL = 3600


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


flask_redis_app = Flask(__name__)
# This worker's Redis client, by the pid that made it: gunicorn preloads this module in the master, and a connection
# made there would be shared by every forked worker.
_client: tuple[int, redis.Redis] | None = None


def _redis() -> redis.Redis:
    """This process's Redis client (REDIS_URL, which the bench passes to every server), made at its first request."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(os.environ["REDIS_URL"]))
    return _client[1]


@flask_redis_app.post("/predict")
def predict_cached() -> dict:
    """The least a cached service does on a miss: parse the body, one GET of its key, one SET of the answer."""
    request.get_json()
    key = "flask-redis:" + hashlib.blake2b(request.get_data(), digest_size=16).hexdigest()
    client = _redis()
    client.get(key)
    client.set(key, _BODY, ex=_TTL)
    return {"predictions": [0]}
