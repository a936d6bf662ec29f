"""gunicorn settings for Sibyl; each value says why it is what it is."""

import os

# One BLAS/OpenMP thread per worker: workers = cores already uses every core, and these must be set
# before numpy loads, which preload_app does in this process right after reading this file.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

# Loopback by default: put a TLS-terminating proxy in front, or set BIND=0.0.0.0:8000 in a container.
bind = os.environ.get("BIND", "127.0.0.1:8000")

# Prediction is CPU-bound and holds the GIL, so one process per core is the throughput sweet spot.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))

# gthread with one thread keeps HTTP keep-alive (sync workers close every connection), which saves
# backend callers a TCP handshake per request; more threads would only contend for the GIL.
worker_class = "gthread"
threads = int(os.environ.get("THREADS", "1"))
keepalive = 5

# Load the model once in the master; forked workers share its memory pages copy-on-write, and a
# broken model stops the master before any worker starts.
preload_app = True

# A request that takes 30 s is stuck (a 1000-row forest batch takes well under a second).
timeout = 30
# On SIGTERM, let in-flight requests finish before workers exit (rolling deploys).
graceful_timeout = 30

# Recycle workers now and then to bound slow leaks; jitter so they don't all restart at once.
max_requests = 20000
max_requests_jitter = 2000

# gunicorn 27 opens a control socket in the home folder by default; we use signals instead.
control_socket_disable = True

# Worker heartbeats go to a tmpfs, not a possibly slow disk (matters in containers).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# The app logs one JSON line per request on stdout; gunicorn's own log stays on stderr.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")


def post_worker_init(worker):
    """Open per-process resources (the onnxruntime session) in each worker before its first request."""
    worker.wsgi.extensions["sibyl.model"].backend.warm()
