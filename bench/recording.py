"""make bench: what each feature on a predict request's path costs per request, in process (metrics and drift in
gunicorn's multiprocess mode; with a Redis URL, also auth, the rate limiter and the request log line)."""

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from time import perf_counter

ROUNDS, CALLS = 5, 5000
USER = "bench"
# A pipe as large as an unprivileged process may make one (/proc/sys/fs/pipe-max-size): a log line that finds the
# pipe full is dropped, and on a busy 2-core machine the reader can be off the CPU for the few ms a 64 KiB pipe lasts.
PIPE_BYTES = 1 << 20


def per_call(record: Callable, prepare: Callable | None = None) -> float:
    """Median µs of one call over ROUNDS rounds of CALLS; with prepare, each call gets a fresh prepare() made before
    its round's clock starts."""
    rounds = []
    for _ in range(ROUNDS):
        args = [prepare() for _ in range(CALLS)] if prepare else [None] * CALLS
        t0 = perf_counter()
        for arg in args:
            record(arg)
        rounds.append((perf_counter() - t0) / CALLS * 1e6)
    return round(statistics.median(rounds), 2)


def main(model_path: str, backend: str, redis_url: str = "") -> None:
    """Print, as JSON, the median µs per request of each feature's calls: metrics and drift; given the bench's Redis
    (the limiter counts there), also auth, the rate limiter and the request log line."""
    # Set before prometheus_client is imported (by the app), as gunicorn.conf.py does for the workers.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sibyl-bench-metrics-")
    import numpy as np
    from flask import g

    from app import create_app, pipeline

    key = secrets.token_urlsafe(24)
    users = f"{USER}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    # Every other setting (the bench's RATE_LIMIT_PREDICT among them) comes from the environment, as a server's does.
    settings = {"MODEL_PATH": model_path, "SIBYL_USERS": users, "SIBYL_USERS_FILE": "", "REDIS_URL": redis_url}
    app = create_app(settings | {"INFERENCE_BACKEND": backend, "LOG_LEVEL": "INFO"})
    registry, cache = app.extensions["sibyl.registry"], app.extensions["sibyl.cache"]
    metrics, drift = app.extensions["sibyl.metrics"], app.extensions["sibyl.drift"]
    model = registry.resolve(registry.default_model)
    X = np.zeros((1, model.n_features))
    result = pipeline.predict(model, X, False, cache)

    with app.test_request_context("/predict", method="POST"):
        g.log = {"model": model.name, "version": model.version}  # what request_log and log_model leave for a predict
        now = perf_counter()
        figures = {
            "request_us": per_call(
                lambda _: metrics.request_done("native.predict", "native", "POST", 200, g.log, 0.001, now, cache)
            ),
            "prediction_us": per_call(lambda _: metrics.prediction(result, 1)),
            "drift_1_row_us": per_call(lambda _: drift.observe(model, X, result.predictions)),
        }
    # The rest only with Redis, which the limiter needs: the bench passes its own; a test of the metrics calls alone
    # (tests/test_metrics.py) runs without.
    if redis_url:
        header = "Basic " + base64.b64encode(f"{USER}:{key}".encode()).decode()
        line = {"user": USER, "model": model.name, "version": model.version, "rows": 1, "cache": result.cache}
        figures |= {
            "auth_us": auth_us(app, header),
            "rate_limit_us": rate_limit_us(app, header, redis_url),
            **log_line_us(app, line | {"cache_hits": result.hits}),
        }
    print(json.dumps(figures))


def auth_us(app, header: str) -> float:
    """What POST /predict does to know its caller (app/direct.py): Werkzeug parses the basic-auth header and the key's
    digest is checked in constant time; the limiter it calls next is timed on its own."""
    from app.direct import DirectPredict

    front = app.wsgi_app
    if not isinstance(front, DirectPredict):
        raise SystemExit("bench.recording: POST /predict is not answered by app.direct here; time it another way")
    environ = {"HTTP_AUTHORIZATION": header}
    if front.caller(environ) != USER:
        raise SystemExit("bench.recording: the bench user's credentials were refused")
    return per_call(lambda _: front.caller(environ))


def rate_limit_us(app, header: str, redis_url: str) -> float:
    """Limits.count for the user, as auth calls it once the credentials check out, counting in the bench's Redis."""
    import redis

    counter = app.extensions["sibyl.limits"]
    roles = app.extensions["sibyl.users"][USER].roles
    if counter.redis is None or counter.rate_for(roles) is None:
        raise SystemExit(
            "bench.recording: the rate limiter is off or has no Redis; set RATE_LIMIT_PREDICT and pass one"
        )
    environ = {"REMOTE_ADDR": "127.0.0.1"}
    with app.test_request_context("/predict", method="POST", headers={"Authorization": header}, environ_base=environ):
        us = per_call(lambda _: counter.count(USER, roles, "127.0.0.1"))
    # Loud if it never reached Redis (its breaker open, a wrong URL): the number would be a local counter's.
    with redis.Redis.from_url(redis_url) as client:
        if not any(client.scan_iter(match=f"{app.config['CACHE_PREFIX']}limit:user:*")):
            raise SystemExit("bench.recording: the rate limiter counted nothing in Redis")
    return us


def log_line_us(app, fields: dict) -> dict:
    """The request log's part of a POST /predict (app/direct.py): its id, the Server-Timing value and one JSON line,
    with stdout a pipe another process drains, as gunicorn's is under a container runtime or systemd."""
    from app.request_log import request_id, server_timing

    lines = app.extensions["sibyl.request_log"]

    def once(_) -> None:
        rid = request_id("")
        server_timing(0.001)
        lines.write(rid, "127.0.0.1", "POST", "/predict", 200, 0.001, {**fields}, None)

    with stdout_to_pipe() as written:
        us = per_call(once)
    return {"log_line_us": us, "log_lines_dropped": ROUNDS * CALLS - written()}


@contextlib.contextmanager
def stdout_to_pipe() -> Iterator[Callable[[], int]]:
    """fd 1 a pipe drained by `wc -l` for the block; yields a function giving the lines it received, once the block
    has ended."""
    sys.stdout.flush()
    saved = os.dup(1)
    reader = subprocess.Popen(["wc", "-l"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with contextlib.suppress(OSError):  # a smaller pipe still works; lines may then be dropped, and are counted
        fcntl.fcntl(reader.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    os.dup2(reader.stdin.fileno(), 1)
    lines = []
    try:
        yield lambda: lines[0]
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        # request_log reopened the pipe without blocking and keeps that descriptor: closed here, or wc never sees
        # the end. Found by what it points to, so no private name of request_log's is needed.
        pipe = os.readlink(f"/proc/self/fd/{reader.stdin.fileno()}")
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
                if int(fd) != reader.stdin.fileno() and os.readlink(f"/proc/self/fd/{fd}") == pipe:
                    os.close(int(fd))
        out, _ = reader.communicate(timeout=60)
        lines.append(int(out.split()[0]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
