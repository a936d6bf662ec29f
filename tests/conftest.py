"""Fixtures: models fitted and dumped to tmp dirs, a real redis-server, the app, and live gunicorn servers."""

import base64
import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.registry import save_model  # noqa: E402
from models.train_demo import main as train_demo  # noqa: E402
from tests.support.servers import Gunicorn, await_redis, free_port, redis_args  # noqa: E402  (shared with make bench)

USER, KEY = "alice", "alice-test-key-0123456789abcdef"  # predict only
ADMIN, ADMIN_KEY = "ops", "ops-test-key-0123456789abcdef"
USERS = (
    f"{USER}:sha256:{hashlib.sha256(KEY.encode()).hexdigest()},"
    f"{ADMIN}:sha256:{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}:admin"
)
IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
# Tests that are not about limits send many requests and many wrong keys: test_limits.py turns them on.
NO_LIMITS = {f"RATE_LIMIT_{kind}": "off" for kind in ("PREDICT", "ADMIN", "METRICS", "LOGIN_FAILURES")}


def iris_settings(iris_path: Path) -> dict:
    """The settings every test app and server starts from: the demo model, the test users, no cache."""
    return {"MODEL_PATH": str(iris_path), "SIBYL_USERS": USERS, "SIBYL_USERS_FILE": "", "REDIS_URL": ""} | NO_LIMITS


def fitted_on_names(estimator, names: list[str]):
    """Mark a fitted estimator as fitted on a DataFrame with these columns: the one attribute scikit-learn keeps
    from such a fit (pandas is not installed here)."""
    estimator.feature_names_in_ = np.asarray(names, dtype=object)
    return estimator


def basic_auth(user: str = USER, key: str = KEY) -> dict:
    """An Authorization header for basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def exported(name: str, **labels: str) -> float | None:
    """A sample's value as this process's Prometheus text exposition shows it (None when the series is absent)."""
    for family in text_string_to_metric_families(generate_latest().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


class RedisServer:
    """A real redis-server on a loopback port that tests can stop, restart and reconfigure."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc = None

    @property
    def url(self) -> str:
        """redis:// URL for db 0."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start (or restart) on the same port and wait until it answers PING."""
        password = ("--requirepass", self.password) if self.password else ()
        args = redis_args(self.workdir, "--port", str(self.port), *password)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await_redis(self.proc, self.client(), timeout=10)
        return self

    def stop(self) -> None:
        """Kill the server abruptly, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def client(self) -> redis.Redis:
        """A plain client for checking what the service stored."""
        return redis.Redis.from_url(self.url, socket_timeout=2)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; see `redis_url` for a clean database per test."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session Redis, emptied, restarted first if a test killed it."""
    if redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def iris_path(tmp_path_factory) -> Path:
    """The demo model, trained by the same script `make run` uses."""
    path = tmp_path_factory.mktemp("models") / "iris.joblib"
    train_demo(str(path))
    return path


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A MODEL_DIR laid out as `make model` leaves models/: the demo model as iris/1/, trained by the same script."""
    root = tmp_path_factory.mktemp("demo")
    train_demo(str(root / "iris" / "1" / "model.joblib"))
    return root


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """Fit a tiny estimator on seeded data and save it with metadata: make_model(estimator, n_features, ...)."""

    def make(estimator, n_features: int = 2, name: str = "tiny", version: str = "1", classify: bool = True, **kw):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(200, n_features))
        y = (X[:, 0] + X[:, -1] > 0).astype(int) if classify else X @ np.arange(1, n_features + 1) + 0.5
        estimator.fit(X, y)
        path = tmp_path_factory.mktemp("models") / f"{name}.joblib"
        save_model(estimator, path, name=name, version=version, sample_rows=X[:20], **kw)
        return path

    return make


@pytest.fixture
def make_model_dir(tmp_path_factory, iris_path, make_model):
    """Factory: make_model_dir({"iris": ["1", "2"], "tiny": ["9", "10"]}, manifests={"iris": {...}}) builds a MODEL_DIR
    of <name>/<version>/ folders holding copies of the demo model (iris) or of a 2-feature logistic regression (any
    other name), each with its metadata's name and version set to its folders'; returns the folder."""
    from sklearn.linear_model import LogisticRegression

    tiny = make_model(LogisticRegression(), name="tiny")

    def make(layout: dict[str, list[str]], manifests: dict[str, dict] | None = None) -> Path:
        root = tmp_path_factory.mktemp("registry")
        for name, versions in layout.items():
            source = iris_path if name == "iris" else tiny
            for version in versions:
                folder = root / name / version
                folder.mkdir(parents=True)
                shutil.copy(source, folder / "model.joblib")
                meta = {**json.loads(source.with_suffix(".json").read_text()), "name": name, "version": version}
                (folder / "model.json").write_text(json.dumps(meta))
        for name, manifest in (manifests or {}).items():
            (root / name / "manifest.json").write_text(json.dumps(manifest))
        return root

    return make


def served_model(app):
    """The Model POST /predict answers with: the default model's default version."""
    registry = app.extensions["sibyl.registry"]
    entry = registry.entries[registry.default_model]
    return entry.versions[entry.default]


@pytest.fixture
def make_app(iris_path):
    """create_app with test settings: the iris model, one known user, no cache unless a Redis URL is given."""

    def make(**overrides):
        return create_app({**iris_settings(iris_path), **overrides})

    return make


@pytest.fixture
def app(make_app):
    """The app serving iris without a cache."""
    return make_app()


@pytest.fixture
def client(app):
    """Flask test client for `app`."""
    return app.test_client()


class LiveServer(Gunicorn):
    """Sibyl (wsgi:app) under gunicorn.conf.py on a free port, as the bench runs it, its stdout kept in a file."""

    def __init__(self, workdir: Path, env: dict, workers: int = 2) -> None:
        super().__init__("sibyl", "wsgi:app", workdir, {"WEB_CONCURRENCY": str(workers), **env})

    def predict(self, body: dict, headers: dict | None = None, **kw) -> requests.Response:
        """POST /predict with the test user's credentials."""
        kw.setdefault("timeout", 10)
        return requests.post(self.url + "/predict", json=body, headers={**basic_auth(), **(headers or {})}, **kw)

    def held_predict(self, body: dict, headers: dict | None = None) -> "HeldRequest":
        """POST /predict but for the body's last byte: the sync worker that took it blocks until .finish()."""
        return HeldRequest(self.port, body, headers or {})


class HeldRequest:
    """A request that pins one sync worker. The kernel hands connections out in arrival order and a blocked
    sync worker accepts nothing, so requests sent while this one is held go to the other workers: a
    deterministic way to reach a given worker (arrival alone lets one idle worker take every connection)."""

    def __init__(self, port: int, body: dict, headers: dict) -> None:
        data = json.dumps(body).encode()
        self.rest = data[-1:]
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.putrequest("POST", "/predict")
        sent = {**basic_auth(), "Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        for name, value in sent.items():
            self.conn.putheader(name, value)
        self.conn.endheaders(data[:-1])

    def finish(self) -> tuple[int, dict, bytes]:
        """Send the last byte; return the status, headers and body of the answer."""
        self.conn.send(self.rest)
        resp = self.conn.getresponse()
        out = resp.status, dict(resp.getheaders()), resp.read()
        self.conn.close()
        return out


def started(make):
    """Fixture body for factories: yield start(*args) that makes and starts a server; stop them all after."""
    servers = []

    def start(*args, **kwargs):
        server = make(*args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(tmp_path, iris_path):
    """Factory: live_server(env={...}, workers=2) starts gunicorn serving iris; all are stopped at teardown."""
    base = iris_settings(iris_path)
    base["WORKER_CLASS"] = "sync"  # the default, whatever the caller exported: held_predict relies on it
    yield from started(lambda env=None, workers=2: LiveServer(tmp_path, {**base, **(env or {})}, workers))


# --- cache fixtures ---


@pytest.fixture
def own_redis(tmp_path):
    """Factory: own_redis(password=None) starts a RedisServer for this test alone, to kill or lock; stopped after."""
    yield from started(lambda password=None: RedisServer(tmp_path, password=password))


@pytest.fixture
def spawn_redis(tmp_path):
    """Factory: spawn_redis(url, *args) runs redis-server with extra args (unix socket, TLS) until `url` answers."""
    procs = []

    def spawn(url: str, *args: str) -> redis.Redis:
        procs.append(
            subprocess.Popen(redis_args(tmp_path, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        return await_redis(procs[-1], redis.Redis.from_url(url, socket_timeout=2), timeout=10)

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def silent_redis_url():
    """A redis:// URL whose server accepts connections and never answers (a hung Redis)."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept() -> None:
        # Keep accepted sockets open and unread, so clients wait for a reply that never comes.
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()
