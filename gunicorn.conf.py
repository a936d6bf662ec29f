"""gunicorn settings for Sibyl; each value says why it is what it is."""

import gc
import glob
import os
import shutil
import ssl
import tempfile

from gunicorn import glogging, util
from gunicorn.http import wsgi

from config import LOG_LEVELS, choice, from_env, metrics_address, web_concurrency  # config imports no numpy

# One BLAS/OpenMP thread per worker: workers = cores already uses every core, and these must be set
# before numpy loads, which preload_app does in this process right after reading this file.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")


def metrics_folder() -> str:
    """A fresh private folder (0700) for the workers' metric files, made once per master: this file is read again
    on SIGHUP, and the workers forked after it must write where the running master's scrape reads."""
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    mine = f"sibyl-metrics-{os.getpid()}-"
    if os.path.basename(current).startswith(mine) and os.path.isdir(current):
        return current
    # tmpfs where there is one: every metric update is a store into an mmap of these files.
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    # A master that was killed (or `gunicorn --check-config`) never ran on_exit: its folder goes now.
    for left in glob.glob(os.path.join(parent, "sibyl-metrics-*-*")):
        pid = os.path.basename(left).split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.mkdtemp(prefix=mine, dir=parent)


def _alive(pid: int) -> bool:
    """Whether a process exists (another user's counts as alive: its folder is not ours to remove)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def listen_address(raw: str) -> str:
    """A BIND value gunicorn can listen on: host:port, [ipv6]:port, unix:/path or fd://N, parsed by gunicorn."""
    try:
        parsed = util.parse_address(raw)
    except RuntimeError:
        parsed = None
    if parsed is None or (isinstance(parsed, tuple) and not 0 <= parsed[1] <= 65535):
        raise ValueError("must be host:port, [ipv6]:port, unix:/path or fd://N")
    return raw


# Every variable below is checked by config.py's rules: a bad value stops the master with one line naming it.
# (A non-integer WEB_CONCURRENCY never gets here: gunicorn itself int()s it when it is imported.)

# Loopback by default: put a TLS-terminating proxy in front, or set BIND=0.0.0.0:8000 in a container.
bind = from_env("BIND", "127.0.0.1:8000", listen_address)
# METRICS_BIND: a second listener, for GET /metrics alone (the app tells the two apart by the connection's local
# port). The workers serve both: a scrape costs one request on whichever worker is free, and needs no thread or
# server of its own in the master.
if metrics_bind := from_env("METRICS_BIND", "", metrics_address):
    if metrics_bind.rpartition(":")[2] == bind.rpartition(":")[2]:
        raise SystemExit(f"sibyl: cannot start: METRICS_BIND={metrics_bind!r} must use another port than BIND")
    bind = [bind, metrics_bind]


def tls_file(raw: str) -> str:
    """Empty (no TLS), or a file this process can read: a PEM certificate chain or its key."""
    if raw and not (os.path.isfile(raw) and os.access(raw, os.R_OK)):
        raise ValueError("must be empty or a readable file")
    return raw


# TLS_CERT_FILE and TLS_KEY_FILE (both or neither): HTTPS on every listener, METRICS_BIND's too, for a network where
# no proxy terminates TLS. Python's defaults apply: TLS 1.2 and 1.3, forward-secret ciphers.
tls_cert = from_env("TLS_CERT_FILE", "", tls_file)
tls_key = from_env("TLS_KEY_FILE", "", tls_file)
if bool(tls_cert) != bool(tls_key):
    given, missing = ("TLS_CERT_FILE", "TLS_KEY_FILE") if tls_cert else ("TLS_KEY_FILE", "TLS_CERT_FILE")
    raise SystemExit(f"sibyl: cannot start: {missing} must be set too: {given} alone serves no TLS")
if tls_cert:
    # gunicorn loads the pair only when a connection arrives, in a worker: a bad pair would fail every handshake
    # of a server that looked started. Loaded once here, it stops startup instead. (An encrypted key is refused:
    # gunicorn has no way to be given its passphrase.)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key, password=b"")
    except ssl.SSLError:
        raise SystemExit(
            "sibyl: cannot start: TLS_CERT_FILE and TLS_KEY_FILE must hold a PEM certificate and its unencrypted key"
        ) from None
    certfile, keyfile = tls_cert, tls_key

# Prediction is CPU-bound and holds the GIL, so one process per usable core is the throughput sweet spot.
# Usable, not present: a container limited to 2 CPUs on a 64-core host must not fork 64 workers.
workers = web_concurrency()

# sync workers: one request at a time per process, taken from the shared listen socket, so load spreads
# evenly. gthread keeps keep-alive connections on whichever worker accepted them first; under `make bench`
# half the runs put all 8 connections on one worker and left the other idle. For client keep-alive and
# slow-client buffering, put nginx (or any reverse proxy) in front, as gunicorn's docs advise for sync workers.
# (The others need packages Sibyl doesn't install, or serve ASGI apps.)
worker_class = from_env("WORKER_CLASS", "sync", choice("sync", "gthread"))

# Load the model once in the master; forked workers share its memory pages copy-on-write, and a
# broken model stops the master before any worker starts.
preload_app = True

# A request that takes 30 s is stuck (a 1000-row forest batch takes well under a second). It is also the only bound
# on a slow client sending straight to a sync worker: the worker blocks reading it and is killed at 30 s, and its
# replacement takes the next slow connection in the queue. gunicorn has no request-read timeout (none in 27 either),
# so clients you don't trust must come through a buffering proxy (deploy/nginx; tests/test_slow_clients.py).
timeout = 30
# On SIGTERM, let in-flight requests finish before workers exit (rolling deploys).
graceful_timeout = 30

# Recycle workers now and then to bound slow leaks (every few minutes at full load, not every few
# seconds: each restart re-forks and reopens the ONNX session); jitter so they don't restart together.
max_requests = 200000
max_requests_jitter = 20000

# gunicorn 27 opens a control socket in the home folder by default; we use signals instead.
control_socket_disable = True

# Worker heartbeats go to a tmpfs, not a possibly slow disk (matters in containers).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# The app logs one JSON line per request on stdout; gunicorn's own log stays on stderr.
accesslog = None
errorlog = "-"


class Logger(glogging.Logger):
    """gunicorn's logger, minus the request bytes gunicorn quotes when it refuses or fails a request: a header line
    missing its colon may be `Authorization Basic <key>`, and a request line or query string may carry a token."""

    def warning(self, msg, *args, **kwargs):
        """A refused request's line keeps the address and the error's kind, not the bytes gunicorn quotes after it."""
        if isinstance(msg, str) and msg.startswith("Invalid request from ip="):
            where, _, error = msg.partition(": ")
            msg = f"{where}: {error.partition(': ')[0]}"
        super().warning(msg, *args, **kwargs)

    def exception(self, msg, *args, **kwargs):
        """A failed request's line keeps its path, not the query string."""
        if isinstance(msg, str) and msg.startswith("Error handling request"):
            args = tuple(str(arg).partition("?")[0] for arg in args)
        super().exception(msg, *args, **kwargs)


logger_class = Logger
loglevel = from_env("GUNICORN_LOG_LEVEL", "info", choice(*(level.lower() for level in LOG_LEVELS)))

# Prometheus multiprocess mode: prometheus_client picks it when first imported, which preload_app does right after
# this file is read (before on_starting), so the folder is made here, once every variable above has been checked.
# Counters and histograms then add up across workers and outlive a recycled one; child_exit below forgets a dead
# worker's live gauges. Any inherited value is replaced: a folder left by another master would add its counts to ours.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_folder()


def on_starting(server):
    """Answer the requests gunicorn rejects itself (before the app sees them) with the app's JSON error body."""
    # Imported here, not at the top: the app package loads numpy, which must see the thread variables above.
    from app.errors import code_for, error_body

    cfg = server.cfg
    # Fixed messages: gunicorn's own quote the offending request line or header back to the caller.
    messages = {
        400: "The request is not valid HTTP/1.1: check its request line, headers and chunked body.",
        403: "The request is forbidden.",
        414: f"The request line is too long (limit {cfg.limit_request_line} bytes).",
        417: "This server cannot meet the request's Expect header.",
        431: f"The request has too many or too large headers (limits: {cfg.limit_request_fields} headers, "
        f"{cfg.limit_request_field_size} bytes each).",
        500: "Internal server error.",
        501: "The request's Transfer-Encoding is not supported; send chunked or Content-Length.",
    }

    def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
        """gunicorn's util.write_error, answering JSON instead of an HTML page."""
        body = error_body(
            code_for(status_int), messages.get(status_int, reason), None
        )  # no request id: the app never saw the request
        head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)

    # Worker.handle_error sends every such answer through this one function, looked up at call time; the
    # workers forked after this hook inherit the replacement.
    util.write_error = write_error

    # gunicorn names itself in a Server header on every app answer (its errors above have none): the stack's name
    # helps an attacker pick exploits and no client needs it. Patched in the master, so every worker inherits it.
    headers = wsgi.Response.default_headers

    def default_headers(self) -> list[str]:
        """gunicorn's status line, Date and Connection, without Server."""
        return [line for line in headers(self) if not line.startswith("Server:")]

    wsgi.Response.default_headers = default_headers

    # gunicorn sends a response's headers and its body in two writes. A worker killed between them leaves a proxy
    # holding headers it has already passed on, so it can't retry the request on another replica: the client gets a
    # body cut short. Sent together when the whole body is one piece (every Flask JSON answer), the proxy sees all of
    # it or nothing, and retries when it got nothing (tests/test_faults.py). Anything else goes gunicorn's way.
    write = wsgi.Response.write

    def write_with_headers(self, data) -> None:
        """The headers and a whole one-piece body in one write; otherwise gunicorn's own write."""
        if self.headers_sent or self.chunked or self._omits_body or type(data) is not bytes or not data:
            return write(self, data)
        if self.response_length is not None and len(data) > self.response_length:
            return write(self, data)
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self.headers_sent = True
        self.sent += len(data)
        util.write(self.sock, ("".join(lines) + "\r\n").encode("latin-1") + data)

    wsgi.Response.write = write_with_headers


def pre_fork(server, worker):
    """Move what the master holds (the models, the libraries) out of the cyclic garbage collector's reach before each
    fork: a worker's collections then never walk those hundreds of thousands of objects, and never write to their
    pages (which would make them the worker's own copies). 0.95x the worker CPU of a 1000-row request under load, where
    the rows' lists set off collections (docs/benchmark.md). Unfrozen and collected first, so a registry that a
    reload replaced can still be freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def post_worker_init(worker):
    """Open per-process resources (each model's onnxruntime session) in each worker before its first request."""
    registry = getattr(worker.wsgi, "extensions", {}).get("sibyl.registry")
    if registry is not None:  # other WSGI apps (the benchmark's ceilings) share this file
        for model in registry.loaded():
            model.backend.warm()
        # POST /admin/reload signals this pid, and only from a worker of this master.
        worker.wsgi.extensions["sibyl.master_pid"] = worker.ppid
        worker.wsgi.extensions["sibyl.metrics"].sample_memory()  # this worker's RSS series, before any request


def child_exit(server, worker):
    """In the master, when a worker exits (recycled, killed, stopped): drop its live gauges, count the exit."""
    from app.metrics import worker_exited

    worker_exited(server.app.wsgi(), worker.pid)


def on_exit(server):
    """Remove the metric files' folder: its counts belong to this master alone."""
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def on_reload(server):
    """SIGHUP: load MODEL_DIR again in the master and, if it loads completely, swap it in before gunicorn forks the
    new workers (the old ones then finish their requests and exit); if not, the new workers get the old registry."""
    from app.rollout import reload_registry

    app = server.app.wsgi()  # with preload_app, the app the master already loaded
    if "sibyl.registry" in getattr(app, "extensions", {}):
        reload_registry(app)
