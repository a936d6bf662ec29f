# syntax=docker/dockerfile:1
# Sibyl's image: `docker build -t sibyl .`. The demo model is trained and compiled to ONNX at build time, so
# models/ is read-only at run time (root owns it; the service runs as uid 10001). To serve your own models,
# build FROM this image, COPY your registry into /srv/sibyl/models as root and RUN the compile step below again.
# Users (SIBYL_USERS or SIBYL_USERS_FILE) and REDIS_URL come from the orchestrator's env files and secrets,
# never from the image.

# ---- builder: a wheel for every pinned requirement; the compiler lives here only, for any sdist ----
FROM python:3.11-slim-bookworm AS builder
# Unpinned on purpose: the compiler only builds wheels, and a pinned Debian version vanishes from the archive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements.txt .
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels -r requirements.txt

# ---- runtime: the same Python, the built wheels, no compiler ----
FROM python:3.11-slim-bookworm
# OMP_NUM_THREADS: one BLAS/OpenMP thread per gunicorn worker (workers already use every core).
# BIND: all interfaces inside the container; SIBYL_ENV=production refuses to start without real users.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    SIBYL_ENV=production \
    BIND=0.0.0.0:8000 \
    MODEL_DIR=models
WORKDIR /srv/sibyl
COPY requirements.txt .
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-index --find-links=/wheels -r requirements.txt
COPY config.py gunicorn.conf.py serve.py wsgi.py ./
COPY app/ app/
COPY models/train_demo.py models/
# Train the demo model into models/iris/1/, then start the app once (development: no users needed, no Redis):
# that loads every model in MODEL_DIR and keeps its compiled ONNX graph in models/<name>/<version>/.compiled/,
# which Sibyl cannot place elsewhere. Built now, by root, it is only read at run time: a read-only model folder
# would otherwise mean converting again at every start.
RUN python models/train_demo.py \
 && SIBYL_ENV=development python -c "from app import create_app; create_app()" \
 && test -n "$(find models -path '*/.compiled/*.onnx')"
# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it; it owns nothing in /srv/sibyl.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sibyl
USER 10001
EXPOSE 8000
# No curl in slim: Python's urllib against /health (no auth) on BIND's port, over HTTPS when gunicorn serves TLS
# (TLS_CERT_FILE; the certificate names the service, not 127.0.0.1, so it is not verified for this local check).
# A non-2xx answer or none exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; port = os.environ.get('BIND', '').rpartition(':')[2] or '8000'; tls = bool(os.environ.get('TLS_CERT_FILE')); urllib.request.urlopen(f'http{\"s\" if tls else \"\"}://127.0.0.1:{port}/health', timeout=4, context=ssl._create_unverified_context() if tls else None)"]
# serve.py checks WEB_CONCURRENCY (which gunicorn reads before its config file), then execs gunicorn with
# gunicorn.conf.py: one worker per CPU the container may use (its cgroup quota), graceful stop on SIGTERM.
CMD ["python", "serve.py"]
