"""Prometheus metrics: what each request, prediction and worker did, summed across gunicorn workers at GET /metrics."""

import contextlib
import os
from pathlib import Path
from time import perf_counter

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from werkzeug.exceptions import NotFound

from app import process
from app.auth import auth
from app.pipeline import Prediction
from app.registry import Registry

bp = Blueprint("metrics", __name__)

# No *_created series: multiprocess mode never writes them, so one process and many now read alike.
disable_created_metrics()

# The classic text format: every Prometheus reads it (0.26's default names 1.0.0, which older servers may refuse),
# and for these names the body is the same.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# 0.2 ms (a local-cache hit answered in-process) to 5 s (well past any sane batch): one bucket per 2-2.5x step.
BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# Roles that may read GET /metrics on the public port (a Prometheus scrape key needs no admin powers).
ROLES = ["admin", "metrics"]
ENDPOINT = "metrics.metrics"
# Methods as label values; any other token a client sends (HTTP allows any) is "other", so a fuzzer cannot grow
# the label set without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# RSS is read from /proc at most this often per worker (the read costs a few microseconds; a scrape every 15 s
# needs nothing fresher).
_RSS_EVERY = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


if values.ValueClass is not values.MutexValue:  # multiprocess mode (PROMETHEUS_MULTIPROC_DIR was set)
    # prometheus_client asks for the process id at every metric write, to notice a fork: 11 getpid() system calls a
    # request, 0.8 us each on this VM (about 2% of a cache hit's CPU under gunicorn). The library takes the identifier
    # as a function (its documented hook): app.process's, which a fork hook keeps right in every child.
    values.ValueClass = values.MultiProcessValue(process_identifier=process.pid)


def multiprocess_dir() -> str | None:
    """The folder gunicorn.conf.py made for the workers' metric files; None outside gunicorn (one process)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metric objects of one app, and the calls that record them (each a few counter/histogram updates)."""

    def __init__(self) -> None:
        # A registry of its own: each create_app (a test's) starts from zero, and in multiprocess mode the scrape
        # reads the workers' files instead (the objects only write them).
        self.registry = reg = CollectorRegistry(auto_describe=True)
        # model and version: the version that answered (or refused the body); empty when the route named none.
        self.requests = Counter(
            "sibyl_requests",
            "HTTP requests answered, by Flask endpoint, method, protocol (blueprint), status and model version.",
            ["endpoint", "method", "protocol", "status", "model", "version"],
            registry=reg,
        )
        self.duration = Histogram(
            "sibyl_request_duration_seconds",
            "Time from the first before_request hook to the response, by endpoint, protocol and model version.",
            ["endpoint", "protocol", "model", "version"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.predict = Histogram(
            "sibyl_prediction_duration_seconds",
            "The backend's predict step for the rows the cache did not answer.",
            ["model", "version", "backend"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.rows = Counter(
            "sibyl_rows_predicted", "Rows answered, from the cache or the model.", ["model", "version"], registry=reg
        )
        self.cache = Counter(
            "sibyl_cache_requests",
            "Predict requests by cache outcome: hit, miss, partial, bypass (no-cache), off, error (Redis failed).",
            ["model", "version", "outcome"],
            registry=reg,
        )
        self.breaker = Gauge(
            "sibyl_cache_breaker_open",
            "1 while a worker's Redis breaker is open (serving uncached).",
            multiprocess_mode="max",
            registry=reg,
        )
        self.in_flight = Gauge(
            "sibyl_in_flight_requests", "Requests being answered now.", multiprocess_mode="livesum", registry=reg
        )
        self.model_info = Gauge(
            "sibyl_model_info",
            "1 for each model version served (0 once a rollout retired it); sha256 is the artifact's first 12 hex.",
            ["model", "version", "sha256", "backend", "cache_policy"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.rss = Gauge(
            "sibyl_process_resident_memory_bytes",
            "Resident memory of each live process (the workers, and the master holding the preloaded models).",
            multiprocess_mode="liveall",
            registry=reg,
        )
        self.load_seconds = Gauge(
            "sibyl_model_load_seconds",
            "Time to load, verify and compile a model version at startup or rollout.",
            ["model", "version"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.worker_exits = Counter(
            "sibyl_worker_exits",
            "Workers that exited (recycled, killed or stopped), counted by the master.",
            registry=reg,
        )
        self.log_lines_dropped = Counter(
            "sibyl_log_lines_dropped",
            "Log lines stdout could not take without blocking (a log pipe no one reads, or one closed): dropped.",
            registry=reg,
        )
        self._breaker_open = 0.0
        self._rss_at = float("-inf")
        # The labelled children each request touches, by their label values: .labels() validates and locks on
        # every call (measured: most of the recording cost); a dict lookup finds the same child.
        self._by_request: dict[tuple, tuple] = {}
        self._by_prediction: dict[tuple, tuple] = {}

    def request_done(
        self,
        endpoint: str | None,
        protocol: str | None,
        method: str,
        status: int,
        answered: dict,
        duration: float,
        now: float,
        cache,
    ) -> None:
        """Count one answered request and its latency; refresh the per-worker gauges when they are due. endpoint and
        protocol are None when routing failed; answered is the request log's fields (model and version once a route
        resolved one)."""
        if method not in _METHODS:
            method = "other"
        model, version = answered.get("model", ""), answered.get("version", "")
        key = (endpoint, method, status, model, version)
        children = self._by_request.get(key)
        if children is None:
            endpoint = endpoint or "unknown"
            protocol = protocol or "none"
            children = (
                self.requests.labels(endpoint, method, protocol, str(status), model, version),
                self.duration.labels(endpoint, protocol, model, version),
            )
            self._by_request[key] = children
        children[0].inc()
        children[1].observe(duration)
        # Gauges written only when they change or are due: each write is an mmap store, cheap but not free.
        if cache.breaker_open != self._breaker_open:
            self._breaker_open = float(cache.breaker_open)
            self.breaker.set(self._breaker_open)
        if now - self._rss_at >= _RSS_EVERY:
            self.sample_memory(now)

    def prediction(self, result: Prediction, rows: int) -> None:
        """Record what the pipeline did for one predict request: rows, cache outcome, the backend's time."""
        model = result.model
        key = (model.name, model.version, model.backend.name, cache_outcome(result))
        children = self._by_prediction.get(key)
        if children is None:
            children = (
                self.rows.labels(*key[:2]),
                self.cache.labels(key[0], key[1], key[3]),
                self.predict.labels(*key[:3]),
            )
            self._by_prediction[key] = children
        children[0].inc(rows)
        children[1].inc()
        if result.hits < rows:  # the backend ran (a full hit never calls it, so its ~0 s would skew the histogram)
            children[2].observe(result.timings["predict"])

    def sample_memory(self, now: float | None = None) -> None:
        """This process's resident memory, from /proc/self/statm."""
        self._rss_at = perf_counter() if now is None else now
        self.rss.set(int(Path("/proc/self/statm").read_bytes().split()[1]) * _PAGE)

    def models_served(self, registry: Registry, retired: Registry | None = None) -> None:
        """Info and load time of each model version served; a rollout's retired versions drop to 0."""
        # Called in the preloaded master (startup, SIGHUP rollout): the workers never write these, so "max" over
        # the files is the master's word. Multiprocess mode cannot delete a series, so a retired one reads 0.
        for model in retired.loaded() if retired else ():
            self.model_info.labels(*_info_labels(model)).set(0)
        for model in registry.loaded():
            self.model_info.labels(*_info_labels(model)).set(1)
            self.load_seconds.labels(model.name, model.version).set(model.load_seconds)

    def render(self) -> Response:
        """The metrics in Prometheus text format: the workers' files summed, or this process's own values."""
        return Response(generate_latest(self._source()), content_type=CONTENT_TYPE)

    def families(self) -> list:
        """The metric families as a scrape would read them (GET /status computes its figures from these)."""
        return list(self._source().collect())

    def _source(self):
        """What a scrape reads: in gunicorn, every worker's files summed; in one process, this app's metrics and the
        sibyl_* metrics other modules declare."""
        path = multiprocess_dir()
        if path is None:
            return _Both(self.registry, _DeclaredElsewhere())
        registry = CollectorRegistry()
        _WorkerFiles(registry, path=path)
        return registry


class _WorkerFiles(MultiProcessCollector):
    """prometheus_client's collector, reading again when a file it listed is gone: worker_exited deletes a dead
    worker's files, and a scrape racing a rollout or a recycled worker would otherwise answer 500 (seen in the soak)."""

    def collect(self):
        """The merged families; listing the files again (up to 3 tries) if one vanished while being read."""
        for _ in range(2):
            with contextlib.suppress(FileNotFoundError):
                return super().collect()
        return super().collect()


class _Both:
    """Two collectors read as one."""

    def __init__(self, *collectors) -> None:
        self.collectors = collectors

    def collect(self):
        """Every family of each collector, in order."""
        return [family for collector in self.collectors for family in collector.collect()]


class _DeclaredElsewhere:
    """The sibyl_* metrics other modules (drift, feedback) declare on prometheus_client's default registry: in one
    process they live there; under gunicorn they reach the workers' files like every other metric."""

    def collect(self):
        """The default registry's sibyl_* families (not its process and GC collectors)."""
        return [family for family in REGISTRY.collect() if family.name.startswith("sibyl_")]


def _info_labels(model) -> tuple[str, ...]:
    """model_info's label values for a model version."""
    return model.name, model.version, model.sha256[:12], model.backend.name, model.cache_policy


def cache_outcome(result: Prediction) -> str:
    """The cache outcome label: the X-Cache value in lower case, except that OFF because Redis failed is error (the
    header says OFF either way: the caller got uncached answers)."""
    return "error" if result.cache == "OFF" and result.redis_failed else result.cache.lower()


def worker_exited(app: Flask | None, pid: int) -> None:
    """gunicorn's child_exit, in the master: forget a dead worker's live gauges, and count the exit."""
    path = multiprocess_dir()
    if path is None:
        return
    mark_process_dead(pid, path)  # its in-flight and RSS series go; its counters and histograms stay in the sums
    # Its "max" gauges hold only the breaker (model info and load time are written by the master alone): a worker
    # that died with its breaker open must not report it open forever.
    Path(path, f"gauge_max_{pid}.db").unlink(missing_ok=True)
    metrics = getattr(app, "extensions", {}).get("sibyl.metrics")
    if metrics is not None:  # other WSGI apps (the benchmark's ceilings) share gunicorn.conf.py
        metrics.worker_exits.inc()


@bp.get("/metrics")
@auth.login_required(role=ROLES)
def metrics() -> Response:
    """Prometheus metrics (text format), summed across workers; needs the admin or metrics role.

    With METRICS_BIND set, served only on that listener, without auth; the public port answers 404."""
    return current_app.extensions["sibyl.metrics"].render()


def listener_port(config: dict) -> str | None:
    """METRICS_BIND's port, or None when /metrics has no listener of its own."""
    bind = config["METRICS_BIND"]
    return bind.rpartition(":")[2] if bind else None


def arrived_on(environ: dict, port: str) -> bool:
    """Whether the request's connection came in on this port. From the socket itself: a Host header (or PROXY line)
    cannot pretend to be the metrics listener. Outside gunicorn there is no socket: the public side."""
    sock = environ.get("gunicorn.socket")
    return sock is not None and str(sock.getsockname()[1]) == port


def init_app(app: Flask) -> None:
    """Create the metric objects, record the models served, count in-flight requests, and serve GET /metrics."""
    metrics = app.extensions["sibyl.metrics"] = Metrics()
    metrics.models_served(app.extensions["sibyl.registry"])
    metrics.sample_memory()
    in_flight = metrics.in_flight

    @app.before_request
    def _enter() -> None:
        in_flight.inc()
        g.in_flight = True

    @app.teardown_request
    def _leave(_exc: BaseException | None) -> None:
        # teardown runs whatever happened; the flag keeps a request that never reached _enter from going negative.
        if g.pop("in_flight", False):
            in_flight.dec()

    if (port := listener_port(app.config)) is not None:

        @app.before_request
        def _listener() -> Response | None:
            on_metrics = arrived_on(request.environ, port)
            if on_metrics != (request.endpoint == ENDPOINT):
                raise NotFound()
            return metrics.render() if on_metrics else None

    app.register_blueprint(bp)
