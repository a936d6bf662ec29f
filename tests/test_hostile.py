"""Hostile and malformed input (tests/hostile/): each case on each protocol gets that protocol's 4xx JSON, through the
app and through a live gunicorn, and the server stays up with bounded memory."""

import io
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from app import create_app
from tests.conftest import IRIS_ROWS, LiveServer, basic_auth, iris_settings
from tests.support import hostile

REQUESTS = hostile.requests_for(basic_auth()["Authorization"])
# Worker memory may grow by this much over the whole corpus: the bodies are refused at MAX_BODY_BYTES (1 MiB), so
# anything near this bound means a body was held whole, or inflated, or leaked.
RSS_GROWTH_LIMIT = 200 * 1024 * 1024


def test_corpus_has_200_bad_requests_on_every_protocol():
    """At least 200 bad requests, every protocol hit by many, each (case, protocol) once."""
    per_protocol = Counter(r.protocol for r in REQUESTS)
    assert len(REQUESTS) >= 200 and min(per_protocol.values()) >= 100, per_protocol
    assert set(per_protocol) == set(hostile.PROTOCOLS)
    assert len({r.id for r in REQUESTS}) == len(REQUESTS)
    # gunicorn answers a Transfer-Encoding it does not know with 501, as RFC 9112 (6.1) says a server should.
    assert all(400 <= r.status < 500 or r.case == "transfer-encoding-unknown" for r in REQUESTS)


@pytest.fixture(scope="module")
def client(iris_path):
    """A test client of the app serving iris."""
    return create_app(iris_settings(iris_path)).test_client()


@pytest.mark.parametrize("req", [r for r in REQUESTS if not r.live_only], ids=lambda r: r.id)
def test_case_through_the_app(client, req):
    """The app alone answers each case in its protocol's error shape (chunked bodies as a stream without a length)."""
    kw = {"data": req.body}
    if req.send == "chunked":
        kw = {"input_stream": io.BytesIO(req.body), "environ_overrides": {"wsgi.input_terminated": True}}
    r = client.open(req.path, method=req.method, headers=req.headers, **kw)
    hostile.check_answer(req, r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data())


def rss(pid: int) -> int:
    """A process's resident memory in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, iris_path):
    """One live gunicorn with two sync workers, warmed on every protocol, and its workers' memory at the start."""
    env = {**iris_settings(iris_path), "WORKER_CLASS": "sync"}
    live = LiveServer(tmp_path_factory.mktemp("hostile"), env, workers=2).start()
    deadline = time.monotonic() + 60
    while len(live.workers()) < 2 and time.monotonic() < deadline:  # the first worker up answers /health
        time.sleep(0.1)
    for _ in range(8):  # both workers answer once on each protocol before the baseline
        assert live.predict({"features": IRIS_ROWS}).status_code == 200
    live.baseline = {pid: rss(pid) for pid in live.workers()}
    yield live
    live.stop()


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.id)
def test_case_against_live_gunicorn(server, req):
    """Through gunicorn, raw on a socket: the expected 4xx in the protocol's error shape, never a dropped
    connection, never a 5xx or an HTML page."""
    status, headers, body = hostile.exchange(server.port, req)
    hostile.check_answer(req, status, headers, body)


def test_server_survives_the_corpus_with_bounded_memory(server):
    """After the whole corpus (run above): the same workers (none crashed or timed out), each still answers every
    protocol, and none grew by more than RSS_GROWTH_LIMIT."""
    assert server.proc.poll() is None
    auth = basic_auth()
    for _ in range(4):
        r = server.predict({"features": IRIS_ROWS})
        assert (r.status_code, r.json()["predictions"]) == (200, ["setosa", "virginica"])
        r = requests.post(server.url + "/v2/models/iris/infer", headers=auth, timeout=10, json={
            "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "data": IRIS_ROWS}]
        })  # fmt: skip
        assert r.status_code == 200
    assert server.workers() == sorted(server.baseline)
    growth = {pid: rss(pid) - before for pid, before in server.baseline.items()}
    assert max(growth.values()) < RSS_GROWTH_LIMIT, growth
    assert "Traceback" not in server.stderr.read_text()
