"""Replicas for real, on loopback: two Sibyl replicas (two gunicorn masters) sharing one Redis behind nginx running the
shipped deploy/nginx/nginx.conf. A row one replica computed is a hit on the other; stopping a replica (SIGTERM, or
SIGKILL for the whole replica) during a load run through nginx loses no request; it rejoins when it is back."""

import os
import signal
import threading
import time

import pytest
import requests
from conftest import LiveServer, basic_auth, iris_settings

from tests.support.nginx import Nginx

THREADS = 4  # client threads, each with its own keep-alive session to nginx
PHASE = 100  # answers before the replica is stopped, and again once it is gone, before the load run ends
MOST = 400  # requests per thread at most: the run is bounded even if a phase never completes
PACE = 0.02  # seconds between a thread's requests: ~150 requests/s in all, so the run outlasts a's graceful stop
LABELS = {"setosa", "versicolor", "virginica"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, iris_path, redis_server):
    """Replicas a and b (2 workers each, the same REDIS_URL) and nginx in front of both; all stopped after."""
    if redis_server.proc.poll() is not None:  # another test killed the session Redis
        redis_server.start()
    redis_server.client().flushall()
    workdir = tmp_path_factory.mktemp("replicas")
    env = {**iris_settings(iris_path), "REDIS_URL": redis_server.url, "WORKER_CLASS": "sync"}
    a, b = LiveServer(workdir, env, workers=2), LiveServer(workdir, env, workers=2)
    proxy = Nginx(workdir, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    try:
        yield a.start(), b.start(), proxy.start()
    finally:
        for process in (proxy, a, b):
            process.stop()


def row(n: int) -> list[float]:
    """The n-th distinct iris-shaped row (no two n give the same cache key)."""
    return [4.3 + (n % 1000) * 0.0035, 2.0 + (n // 1000) * 0.01, 1.0 + (n % 7) * 0.8, 0.1 + (n % 5) * 0.5]


def predict(url: str, rows: list[list[float]], request_id: str, session=requests, **headers) -> requests.Response:
    """POST /predict to url with the test user's credentials and this request id."""
    sent = {**basic_auth(), "X-Request-ID": request_id, **headers}
    return session.post(url + "/predict", json={"features": rows}, headers=sent, timeout=10)


def test_a_row_computed_on_one_replica_is_a_hit_on_the_other_and_through_nginx(fleet):
    """Predicted through replica a: MISS. The same row through replica b, whose workers never saw it: HIT, from the
    shared Redis. Through nginx: HIT, with the caller's request id in nginx's log, the replica's log and the answer,
    and a browser's same-origin write (Origin = nginx's address) is not refused as cross-site."""
    a, b, proxy = fleet
    first = predict(a.url, [row(900_000)], "hit-a")
    assert (first.status_code, first.headers["X-Cache"]) == (200, "MISS")
    on_b = predict(b.url, [row(900_000)], "hit-b")
    assert (on_b.status_code, on_b.headers["X-Cache"], on_b.json()) == (200, "HIT", first.json())
    proxied = predict(proxy.url, [row(900_000)], "hit-proxy", Origin=proxy.url)
    assert (proxied.status_code, proxied.headers["X-Cache"], proxied.json()) == (200, "HIT", first.json())
    assert proxied.headers["X-Request-ID"] == "hit-proxy"
    assert proxied.headers["Server"] == "nginx"  # no version, and not gunicorn's
    served_by = [x["pid"] for s in (a, b) for x in s.request_lines() if x["request_id"] == "hit-proxy"]
    assert len(served_by) == 1
    (logged,) = proxy.logged({"hit-proxy"})
    assert (logged["status"], logged["upstream_status"]) == (200, "200")


def load(url: str, thread: int, tag: str, first: int, answers: list, done: threading.Event) -> None:
    """Requests through one keep-alive session, two distinct rows each (numbered from first), PACE apart until
    done is set (MOST at most); every answer (or exception) is appended as (request id, status, predictions)."""
    with requests.Session() as session:
        for i in range(MOST):
            if done.is_set():
                return
            n = first + thread * MOST + i
            request_id = f"{tag}-{n}"
            try:
                r = predict(url, [row(2 * n), row(2 * n + 1)], request_id, session)
                answers.append((request_id, r.status_code, r.json().get("predictions") if r.ok else r.text[:200]))
            except requests.RequestException as e:
                answers.append((request_id, type(e).__name__, str(e)[:200]))
            done.wait(PACE)


def await_answers(answers: list, count: int, timeout: float = 30) -> None:
    """Wait until the load run has count answers."""
    deadline = time.monotonic() + timeout
    while len(answers) < count:
        assert time.monotonic() < deadline, f"the load run stalled at {len(answers)} answers"
        time.sleep(0.005)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_a_replica_under_load_loses_no_request_and_it_rejoins(fleet, how):
    """4 threads send requests (two distinct rows each) through nginx; after 100 answers, replica a is stopped:
    SIGTERM (gunicorn's graceful stop) or SIGKILL to its master and workers at once (a crash); the run goes on for
    100 answers more once a is gone. Every request is answered 200 with one prediction per row, both replicas
    answered during the run, and b after a was gone. Started again on the same port, a gets requests through nginx
    again."""
    a, b, proxy = fleet
    tag = f"load-{how.lower()}"
    first = {"SIGTERM": 0, "SIGKILL": 100_000}[how]  # rows no other run sent: every one is computed somewhere
    a_before, b_before = (os.path.getsize(s.stdout) for s in (a, b))
    answers, done = [], threading.Event()
    threads = [threading.Thread(target=load, args=(proxy.url, t, tag, first, answers, done)) for t in range(THREADS)]
    for t in threads:
        t.start()
    try:
        await_answers(answers, PHASE)
        a_stopped_at = len(answers)
        if how == "SIGTERM":
            a.stop(signal.SIGTERM)  # returns once the master has exited, its workers having finished their requests
        else:
            os.killpg(a.proc.pid, signal.SIGKILL)  # master and workers at once: no one finishes anything
            a.stop()
        a_gone_at = len(answers)
        b_after = os.path.getsize(b.stdout)
        await_answers(answers, a_gone_at + PHASE)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)

    failed = [x for x in answers if x[1] != 200 or len(x[2]) != 2 or not set(x[2]) <= LABELS]
    assert failed == [] and len(answers) >= 2 * PHASE
    ids = {x[0] for x in answers}
    served_by_a = {x["request_id"] for x in a.request_lines(a_before)} & ids
    served_by_b = {x["request_id"] for x in b.request_lines(b_before)} & ids
    assert served_by_a and served_by_b  # both took part before a went
    assert {x["request_id"] for x in b.request_lines(b_after)} & ids  # the survivor kept serving
    proxied = proxy.logged(ids)
    assert sorted(x["request_id"] for x in proxied) == sorted(ids) and {x["status"] for x in proxied} == {200}
    # Client keep-alive: each thread's session carried its requests over a few connections, not one each.
    assert len({x["connection"] for x in proxied}) <= THREADS * 5
    # nginx did fail over: requests it sent to a after a went (refused, reset) were sent again to b.
    retried = [x for x in proxied if x["upstream_addr"] == f"127.0.0.1:{a.port}, 127.0.0.1:{b.port}"]
    assert retried
    print(
        f"{how}: {len(answers)} requests, 0 lost; a signalled after {a_stopped_at}, gone after {a_gone_at}; "
        f"{len(retried)} retried by nginx on b; {len({x['connection'] for x in proxied})} client connections"
    )

    # a, started again on the same port, is back in nginx's rotation within its fail_timeout (5 s).
    a_restart = os.path.getsize(a.stdout)
    a.start()
    deadline = time.monotonic() + 15
    rejoined = set()
    n = 0
    while not rejoined and time.monotonic() < deadline:
        r = predict(proxy.url, [row(2 * first + 50_000 + n)], f"{tag}-rejoin-{n}")
        assert r.status_code == 200
        n += 1
        rejoined = {x["request_id"] for x in a.request_lines(a_restart) if x["request_id"].startswith(f"{tag}-rejoin")}
        time.sleep(0.05)
    assert rejoined, f"no request reached the restarted replica a through nginx in 15 s ({n} sent)"
