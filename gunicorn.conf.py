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

# sync workers: one request at a time per process, taken from the shared listen socket, so load spreads
# evenly. gthread keeps keep-alive connections on whichever worker accepted them first; under `make bench`
# half the runs put all 8 connections on one worker and left the other idle. For client keep-alive and
# slow-client buffering, put nginx (or any reverse proxy) in front, as gunicorn's docs advise for sync workers.
worker_class = os.environ.get("WORKER_CLASS", "sync")

# Load the model once in the master; forked workers share its memory pages copy-on-write, and a
# broken model stops the master before any worker starts.
preload_app = True

# A request that takes 30 s is stuck (a 1000-row forest batch takes well under a second).
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
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")


def post_worker_init(worker):
    """Open per-process resources (the onnxruntime session) in each worker before its first request."""
    model = getattr(worker.wsgi, "extensions", {}).get("sibyl.model")
    if model is not None:  # other WSGI apps (the benchmark's ceilings) share this file
        model.backend.warm()


def worker_exit(server, worker):
    """Send the cache stores this worker still holds (each waits briefly to share a write with the next call)."""
    cache = getattr(worker.wsgi, "extensions", {}).get("sibyl.cache")
    if cache is not None:
        cache.flush()
