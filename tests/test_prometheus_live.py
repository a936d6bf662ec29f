"""A real Prometheus, on the shipped config and rules, scraping a live Sibyl's GET /metrics both ways the config
offers: basic auth as a user with the admin role, and the unauthenticated METRICS_BIND listener."""

import time

import numpy as np
import pytest
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS
from sklearn.datasets import load_iris

from tests.support.servers import Prometheus, free_port, shipped_jobs, sibyl_prometheus_config

PREDICTIONS = 7  # known traffic: this many POST /predict of IRIS_ROWS (2 rows each)


@pytest.fixture
def prometheus(tmp_path):
    """Factory: prometheus(job, target, key=None) runs the shipped config with that job pointed at target."""
    started = []

    def start(job: dict, target: str, key: str | None = None) -> Prometheus:
        password_file = tmp_path / "sibyl-metrics.key"
        if key:
            password_file.write_text(key + "\n")
        config = sibyl_prometheus_config([job], [target], password_file)
        started.append(Prometheus(tmp_path, config).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


def await_value(prometheus: Prometheus, expr: str, want: float, timeout: float = 30) -> float | None:
    """The query's single value once it equals want, or its last value after timeout (scrapes come every 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = prometheus.query(expr)
        value = float(result[0]["value"][1]) if result else None
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def sent_known_traffic(server) -> None:
    """PREDICTIONS successful predictions, spread over the workers by the kernel."""
    for _ in range(PREDICTIONS):
        assert server.predict({"features": IRIS_ROWS}).status_code == 200


def assert_scraped_sibyl(prometheus: Prometheus) -> None:
    """up == 1, the known traffic counted once across workers, and every shipped rule evaluates cleanly on real data."""
    assert prometheus.await_query('up{job="sibyl"} == 1'), [
        t["lastError"] for t in prometheus.api("targets")["data"]["activeTargets"]
    ]
    native = 'sum(sibyl_requests_total{protocol="native", status="200"})'
    assert await_value(prometheus, native, PREDICTIONS) == PREDICTIONS
    assert await_value(prometheus, "sum(sibyl_rows_predicted_total)", 2 * PREDICTIONS) == 2 * PREDICTIONS
    # Every request Sibyl answered, the scrapes among them: at least the predictions.
    assert float(prometheus.query("sum(sibyl_requests_total)")[0]["value"][1]) >= PREDICTIONS
    time.sleep(2)  # two evaluation intervals, so every rule has run on the scraped series
    rules = [r for g in prometheus.api("rules", type="alert")["data"]["groups"] for r in g["rules"]]
    assert {r["name"]: r["health"] for r in rules} == {r["name"]: "ok" for r in rules}


def test_prometheus_scrapes_live_sibyl_with_admin_basic_auth(live_server, prometheus):
    """The shipped basic-auth job, as the admin user, scrapes Sibyl's own port and counts the known traffic."""
    server = live_server()
    job = shipped_jobs()[0]
    job["basic_auth"]["username"] = ADMIN
    scraper = prometheus(job, f"127.0.0.1:{server.port}", key=ADMIN_KEY)
    sent_known_traffic(server)
    assert_scraped_sibyl(scraper)


def test_prometheus_scrapes_live_sibyl_on_metrics_bind(live_server, prometheus):
    """The shipped METRICS_BIND job scrapes the separate listener without credentials and counts the known traffic."""
    bind = f"127.0.0.1:{free_port()}"
    server = live_server(env={"METRICS_BIND": bind})
    scraper = prometheus(shipped_jobs()[1], bind)
    sent_known_traffic(server)
    assert_scraped_sibyl(scraper)


def test_prometheus_sees_the_drift_score_move_after_shifted_inputs(live_server, prometheus):
    """Training-like rows keep petal_length's PSI under the alert's 0.25 in Prometheus; a window of rows with it
    shifted raises it past, read through Prometheus's query API from a live 2-worker Sibyl."""
    server = live_server(env={"DRIFT_WINDOW": "100"})
    job = shipped_jobs()[0]
    job["basic_auth"]["username"] = ADMIN
    scraper = prometheus(job, f"127.0.0.1:{server.port}", key=ADMIN_KEY)
    iris = load_iris().data
    rng = np.random.default_rng(11)
    psi = 'max(sibyl_feature_drift_psi{model="iris", feature="petal_length"})'
    for shift in (0.0, 1.5):
        rows = iris[rng.integers(0, len(iris), 200)]
        rows[:, 2] += shift
        for batch in (rows[:100], rows[100:]):  # each worker's window fills, whichever takes each batch
            assert server.predict({"features": batch.round(3).tolist()}).status_code == 200
            assert server.predict({"features": batch.round(3).tolist()}).status_code == 200
        if shift == 0.0:
            assert scraper.await_query(f"{psi} < 0.25"), scraper.query(psi)
    assert scraper.await_query(f"{psi} > 0.25"), scraper.query(psi)
