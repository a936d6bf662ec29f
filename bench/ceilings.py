"""Upper bounds for Sibyl under the same gunicorn settings: a raw WSGI callable, a one-route Flask app, and the same
Flask app with a Redis lookup and store per row."""

import hashlib
import os

import numpy as np
import orjson
import redis
from flask import Flask, request

# All answer with a constant, so what they measure is gunicorn + parsing the same body (+ a per-row cache's Redis
# work, for flask-redis), nothing else.
_BODY = orjson.dumps({"predictions": [0]})
_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))]
# What flask-redis stores a row as: the size of Sibyl's stored label (its expiry, a space, the answer's JSON).
_STORED = b"1733090000123 0"


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
    """The least a per-row cache does on a miss: parse the body, a 128-bit BLAKE2b digest of each row's float64
    bytes, one MGET of their keys, one MSET of an answer for each (no expiry: the bench's Redis evicts by itself, and
    Sibyl sends one MSET there too). On one row, a round trip each way: the limit for a cached service's 1-row miss;
    on a batch, what per-row keys cost with redis-py's plain API and no model (a client that packs with hiredis on a
    kept connection, as Sibyl's does, spends less per key)."""
    X = np.atleast_2d(np.asarray(request.get_json()["features"], dtype=np.float64))
    keys = ["flask-redis:" + hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in X]
    client = _redis()
    client.mget(keys)
    client.mset(dict.fromkeys(keys, _STORED))
    return {"predictions": [0]}
