"""Faults under a bounded load, for real, on loopback: Redis killed and restarted, Redis frozen, workers SIGKILLed
(directly and behind the shipped nginx config), the model file removed or replaced on disk, and a log pipe that stops
reading or closes. Each test records its figures in SUMMARY, printed with -s and written to test-artifacts/faults.json
for the README's "Reliability" section."""

import fcntl
import json
import os
import shutil
import signal
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, LiveServer, basic_auth, iris_settings
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression

from app.registry import save_model
from tests.support.nginx import Nginx
from tests.support.servers import (
    ARTIFACTS,
    await_redis,
    both_workers,
    poll,
    redis_args,
    spawn,
    stop,
    tcp_sockets,
)

SUMMARY: dict[str, dict] = {}  # fault -> its figures, filled by each test
ADMIN_AUTH = basic_auth(ADMIN, ADMIN_KEY)
THREADS = 3  # client threads, each with its own session
MOST = 300  # requests per thread at most: every load run is bounded even if a phase never completes
PACE = 0.01  # seconds between a thread's requests
REPEATED = [*IRIS_ROWS, [5.9, 3.0, 4.2, 1.5], [6.3, 2.5, 5.0, 1.9], [5.0, 3.4, 1.5, 0.2], [6.9, 3.1, 5.4, 2.1]]


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: print the figures and write them to test-artifacts/faults.json."""
    yield SUMMARY
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "faults.json").write_text(json.dumps(SUMMARY, indent=2) + "\n")
    print("\nfaults (requests sent, failed, 5xx, max latency during the fault, recovery):")
    for fault, figures in SUMMARY.items():
        print(f"  {fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def row(n: int) -> list[float]:
    """Row n of the load: every other one from REPEATED (cache hits), the rest distinct (misses)."""
    if n % 2 == 0:
        return REPEATED[(n // 2) % len(REPEATED)]
    return [4.3 + (n % 997) * 0.0035, 2.0 + (n // 997) * 0.01, 1.0 + (n % 7) * 0.8, 0.1 + (n % 5) * 0.5]


class Load:
    """A bounded load run: THREADS threads POST /predict with `batch` rows each, PACE apart, until the block ends
    (MOST each at most). Each answer is (request id, sent at (monotonic), latency, status or the exception's name,
    X-Cache, predictions or the error's start)."""

    def __init__(
        self, url: str, tag: str, rows=row, threads: int = THREADS, pace: float = PACE, batch: int = 1, most: int = MOST
    ) -> None:
        self.url, self.tag, self.rows, self.pace, self.batch, self.most = url, tag, rows, pace, batch, most
        self.answers: list[tuple] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    def _run(self, thread: int) -> None:
        with requests.Session() as session:
            for i in range(self.most):
                if self.done.is_set():
                    return
                n = thread * self.most + i
                request_id = f"{self.tag}-{n}"
                headers = {**basic_auth(), "X-Request-ID": request_id}
                start = time.monotonic()
                try:
                    r = session.post(
                        self.url + "/predict",
                        json={"features": [self.rows(n * self.batch + k) for k in range(self.batch)]},
                        headers=headers,
                        timeout=10,
                    )
                    answer = (
                        r.status_code,
                        r.headers.get("X-Cache"),
                        r.json()["predictions"] if r.ok else r.text[:200],
                    )
                except requests.RequestException as e:
                    answer = (type(e).__name__, None, str(e)[:200])
                self.answers.append((request_id, start, time.monotonic() - start, *answer))
                self.done.wait(self.pace)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)

    def wait(self, count: int, timeout: float = 30) -> None:
        """Until the run has count answers."""
        deadline = time.monotonic() + timeout
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"the load run stalled at {len(self.answers)} answers"
            time.sleep(0.005)

    def failed(self) -> list[tuple]:
        """Answers that are not a 200 (exceptions included)."""
        return [x for x in self.answers if x[3] != 200]

    def figures(self, start: float, end: float) -> dict:
        """Requests sent, failed, 5xx; the slowest answer to a request sent between start and end (the fault)."""
        during = [x[2] for x in self.answers if start <= x[1] <= end]
        return {
            "requests": len(self.answers),
            "failed": len(self.failed()),
            "5xx": sum(isinstance(x[3], int) and x[3] >= 500 for x in self.answers),
            "max_latency_ms": round(max(during, default=0) * 1000, 1),
        }


def hits_after(server: LiveServer, load: Load, since: float) -> dict[int, float]:
    """Per worker pid, when (monotonic) it first answered a Redis HIT to a request sent after since."""
    sent = {x[0]: x[1] for x in load.answers if x[1] >= since and x[4] == "HIT"}
    first: dict[int, float] = {}
    for line in server.request_lines():
        if line["request_id"] in sent and line["cache"] == "HIT":
            first[line["pid"]] = min(first.get(line["pid"], float("inf")), sent[line["request_id"]])
    return first


def held_resources(server: LiveServer, redis_port: int) -> dict[int, tuple[int, int, int]]:
    """Per worker: open file descriptors, threads, and TCP connections to Redis (from /proc)."""
    out = {}
    for pid in server.workers():
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = int(
            next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Threads:")).split()[1]
        )
        out[pid] = (fds, threads, len(tcp_sockets(pid, redis_port, remote=True)))
    return out


def test_redis_killed_and_restarted_under_load_fails_nothing_and_hits_resume(live_server, own_redis):
    """Redis SIGKILLed under load, then started again on the same port 1.5 s later: every request is answered 200
    (uncached while Redis is away), and both workers serve Redis HITs again by themselves, without a restart."""
    store = own_redis()
    env = {"REDIS_URL": store.url, "CACHE_TIMEOUT_MS": "250", "CACHE_RETRY_SECONDS": "1", "CACHE_LOCAL_ENTRIES": "0"}
    server = live_server(env=env, workers=2)
    workers = both_workers(server)
    with Load(server.url, "redis-kill", pace=0.02) as load:
        load.wait(100)
        killed = time.monotonic()
        store.stop()
        time.sleep(1.5)
        store.start()  # same port; empty, as a cache without persistence comes back
        back = time.monotonic()
        first = poll(lambda: len(h := hits_after(server, load, back)) == 2 and h, what="HITs from both workers")
        load.wait(len(load.answers) + 50)
    assert load.failed() == []
    assert "OFF" in {x[4] for x in load.answers if killed <= x[1] <= back}  # the outage was served uncached
    assert server.workers() == workers
    messages = [x["message"] for x in server.log_lines()]
    down, up = (sum(m.startswith(s) for m in messages) for s in ("cache down", "cache back up"))
    assert 1 <= down <= 4 and up == down  # one line per worker per transition, never one per request
    SUMMARY["redis_killed"] = {
        **load.figures(killed, back),
        "outage_s": round(back - killed, 2),
        "recovery_s": round(min(first.values()) - back, 2),
        "recovery_all_workers_s": round(max(first.values()) - back, 2),
        "cache_retry_seconds": 1,
    }


@pytest.fixture
def debug_redis(tmp_path):
    """A redis-server that accepts DEBUG SLEEP (which freezes it whole), on a free port; stopped after."""
    from tests.support.servers import free_port

    port = free_port()
    proc = spawn(redis_args(tmp_path, "--port", str(port), "--enable-debug-command", "yes"))
    try:
        yield port, await_redis(proc, redis.Redis(port=port, socket_timeout=30))
    finally:
        stop(proc)


def test_frozen_redis_costs_one_timeout_per_breaker_period_per_worker_and_leaks_nothing(live_server, debug_redis):
    """Redis frozen 4 s (DEBUG SLEEP) under load: every request is answered 200; each worker spends one
    CACHE_TIMEOUT_MS per CACHE_RETRY_SECONDS on it, not one per request; no request waits much past the timeout;
    once Redis thaws both workers hit again, holding the descriptors, threads and Redis connections they held."""
    port, client = debug_redis
    timeout_ms, retry, freeze = 200, 1.0, 4
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "CACHE_TIMEOUT_MS": str(timeout_ms),
        "CACHE_RETRY_SECONDS": str(retry),
        "CACHE_LOCAL_ENTRIES": "0",
    }
    server = live_server(env=env, workers=2)
    both_workers(server)
    with Load(server.url, "redis-slow", pace=0.03) as load:
        load.wait(60)
        poll(lambda: len(hits_after(server, load, 0)) == 2, what="HITs from both workers")
        before = held_resources(server, port)
        clients_before = client.info("clients")["connected_clients"]
        frozen = time.monotonic()
        client.execute_command("DEBUG", "SLEEP", freeze)  # returns when Redis wakes
        thawed = time.monotonic()
        first = poll(lambda: len(h := hits_after(server, load, thawed)) == 2 and h, what="HITs after the thaw")
        load.wait(len(load.answers) + 30)
    time.sleep(0.2)  # the last timed-out connections closing
    after = held_resources(server, port)
    clients_after = client.info("clients")["connected_clients"]

    assert load.failed() == []
    figures = load.figures(frozen, thawed)
    # A request that meets the frozen Redis waits one timeout; one queued behind it on a sync worker, two.
    assert figures["max_latency_ms"] < 2 * timeout_ms + 1000
    # The workers' own time per request: slow ones at most once per breaker period each (+1 for the edges).
    slow: dict[int, int] = {}
    ids = {x[0] for x in load.answers if frozen <= x[1] <= thawed}
    for line in server.request_lines():
        if line["request_id"] in ids and line["duration_ms"] >= 0.8 * timeout_ms:
            slow[line["pid"]] = slow.get(line["pid"], 0) + 1
    assert slow and max(slow.values()) <= freeze / retry + 2, slow
    sent_during = len(ids)
    assert sum(slow.values()) < sent_during / 3  # not a pile-up: most requests skipped Redis
    assert after.keys() == before.keys()  # no worker replaced
    for pid, (fds, threads, conns) in after.items():
        assert (threads, conns) == before[pid][1:] and fds <= before[pid][0], (before, after)
    assert clients_after <= clients_before
    SUMMARY["redis_frozen"] = {
        **figures,
        "freeze_s": freeze,
        "cache_timeout_ms": timeout_ms,
        "cache_retry_seconds": retry,
        "requests_during_freeze": sent_during,
        "slow_requests_per_worker": sorted(slow.values()),
        "recovery_s": round(min(first.values()) - thawed, 2),
        "fds_threads_redis_connections_before": sorted(before.values()),
        "fds_threads_redis_connections_after": sorted(after.values()),
    }


def kill_a_busy_worker(server: LiveServer, timeout: float = 8) -> tuple[int, bool]:
    """SIGKILL a worker of server while it holds a request (caught by SIGSTOPping a worker and looking at its
    connections: SIGCONT and another try if it holds none); its pid, and whether it held one within timeout."""
    workers = server.workers()
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        pid = workers[tries % len(workers)]
        tries += 1
        os.kill(pid, signal.SIGSTOP)
        if tcp_sockets(pid, server.port):
            os.kill(pid, signal.SIGKILL)
            return pid, True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    os.kill(workers[0], signal.SIGKILL)
    return workers[0], False


def replaced(server: LiveServer, killed: int, count: int) -> float:
    """Seconds until the master has count workers again, killed not among them."""
    start = time.monotonic()
    poll(lambda: killed not in (w := server.workers()) and len(w) == count, what=f"worker {killed} replaced")
    return time.monotonic() - start


def test_sigkilled_workers_are_replaced_and_nginx_retries_what_they_held(tmp_path, iris_path, live_server):
    """Workers SIGKILLed one after another under load, each while it holds a request:
    gunicorn forks a replacement each time. Directly against gunicorn, at most the request each held fails (a sync
    worker holds one). Through the shipped nginx config in front of this replica and a second one, none does: nginx
    sends a request its upstream dropped to the next replica."""
    a = live_server(workers=2)
    b = live_server(workers=2)
    both_workers(a)
    proxy = Nginx(tmp_path, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]).start()
    try:
        figures = {}
        # Through nginx, 2 kills: after a failure nginx sends a replica nothing for fail_timeout (5 s).
        for route, url, kills in (("direct", a.url, 3), ("nginx", proxy.url, 2)):
            times, busy = [], 0
            # 20-row batches: a's workers are often mid-request, so each kill soon finds one so. Up to 3,000 a thread:
            # after a kill nginx sends a nothing for fail_timeout (5 s), so the next kill may wait that long for one.
            with Load(url, f"kill-{route}", threads=4, pace=0.02, batch=20, most=3000) as load:
                load.wait(50)
                start = time.monotonic()
                for _ in range(kills):
                    killed, was_busy = kill_a_busy_worker(a)
                    busy += was_busy
                    times.append(replaced(a, killed, 2))
                    load.wait(len(load.answers) + 20)
                end = time.monotonic()
            figures[route] = {
                **load.figures(start, end),
                "kills": kills,
                "killed_while_busy": busy,
                "replaced_within_s": round(max(times), 3),
            }
            assert not [x for x in load.answers if isinstance(x[3], int) and x[3] != 200]  # failures are dropped
            assert len(load.failed()) <= kills, load.failed()  # connections, never a 5xx; at most one per kill
            if route == "nginx":
                # nginx retries whatever its upstream dropped before answering, and an answer's headers and body
                # leave a worker in one write (gunicorn.conf.py), so nginx never holds half an answer it can't retry.
                assert load.failed() == []
                proxied = proxy.logged({x[0] for x in load.answers})
                retried = [x for x in proxied if "," in x["upstream_addr"]]
                figures[route]["retried_by_nginx"] = len(retried)
                assert {x["status"] for x in proxied} == {200}
        print(f"worker SIGKILL: {figures}")
    finally:
        proxy.stop()
    SUMMARY["worker_sigkilled_direct"] = figures["direct"]
    SUMMARY["worker_sigkilled_nginx"] = figures["nginx"]


def tiny_rows(n: int) -> list[float]:
    """Row n of tiny's load: one of a few fixed rows, so each answer can be checked against the first."""
    return [[1.0, 2.0], [-1.0, -1.0], [0.3, -0.2], [-2.0, 1.5]][n % 4]


def rollout_refused(server: LiveServer, via: str, says: str) -> None:
    """Ask for a rollout (POST /admin/reload, or SIGHUP to the master) and check it is refused, saying `says`; for
    SIGHUP, wait until the master's new workers serve."""
    if via == "POST":
        r = requests.post(server.url + "/admin/reload", headers=ADMIN_AUTH, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "rollout_refused")
        assert says in r.json()["error"]["message"]
        return
    old = server.workers()
    refusals = len([x for x in server.log_lines() if x.get("action") == "admin.rollout" and x.get("step") == "load"])
    os.kill(server.proc.pid, signal.SIGHUP)

    def refused():
        """the master's refusal"""
        lines = [x for x in server.log_lines() if x.get("action") == "admin.rollout" and x.get("step") == "load"]
        return lines[refusals:]

    (line,) = poll(refused, timeout=60)
    assert line["outcome"] == "refused" and says in line["reason"], line
    poll(lambda: len(w := server.workers()) == 2 and not set(w) & set(old), what="new workers")


def test_model_file_removed_or_replaced_keeps_serving_what_was_loaded_and_refuses_its_rollout(
    live_server, make_model_dir, tmp_path
):
    """Under load, tiny/1/model.joblib is removed, then replaced by another estimator's file (its model.json, which
    pins the sha256, untouched): every answer stays what the loaded model said; POST /admin/reload answers 409 and a
    SIGHUP to the master is refused too (missing file, then sha256 mismatch), its new workers still serving the
    loaded model, at generation 1."""
    root = make_model_dir({"tiny": ["1"]})
    env = {"MODEL_PATH": "", "MODEL_DIR": str(root), "INFERENCE_BACKEND": "sklearn"}
    server = live_server(env=env, workers=2)
    both_workers(server)
    expected = {tuple(r): server.predict({"features": [r]}).json()["predictions"] for r in map(tiny_rows, range(4))}
    sha = requests.get(server.url + "/models", headers=basic_auth(), timeout=10).json()["models"][0]["versions"][0]
    artifact = root / "tiny" / "1" / "model.joblib"
    with Load(server.url, "model-file", rows=tiny_rows, threads=2, pace=0.05) as load:
        load.wait(40)
        start = time.monotonic()
        artifact.unlink()
        for via in ("POST", "SIGHUP"):
            rollout_refused(server, via, "tiny/1/model.joblib does not exist")
            load.wait(len(load.answers) + 20)
        # Another estimator's file in its place: answers ROW [1.0, 2.0] otherwise, and a different sha256.
        X = np.random.default_rng(1).normal(size=(200, 2))
        other = LogisticRegression().fit(X, (X[:, 0] + X[:, 1] <= 0).astype(int))
        save_model(other, tmp_path / "other.joblib", "tiny", "1", sample_rows=X[:20])
        shutil.copy(tmp_path / "other.joblib", artifact)
        assert other.predict(np.asarray([tiny_rows(0)])).tolist() != expected[tuple(tiny_rows(0))]
        for via in ("POST", "SIGHUP"):
            rollout_refused(server, via, "tiny/1/model.joblib has sha256")
            load.wait(len(load.answers) + 20)
        end = time.monotonic()
    assert load.failed() == []
    wrong = [x for x in load.answers if x[5] != expected[tuple(tiny_rows(int(x[0].rsplit("-", 1)[1])))]]
    assert wrong == []
    models = requests.get(server.url + "/models", headers=basic_auth(), timeout=10).json()
    assert models["generation"] == 1 and models["models"][0]["versions"][0]["sha256"] == sha["sha256"]
    SUMMARY["model_file_removed_or_replaced"] = {**load.figures(start, end), "rollouts_refused": 4, "wrong_answers": 0}


def dropped_lines(server: LiveServer) -> float:
    """sibyl_log_lines_dropped_total, summed over the workers, from GET /metrics."""
    text = requests.get(server.url + "/metrics", headers=ADMIN_AUTH, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sibyl_log_lines_dropped_total":
                return sample.value
    return 0.0


def in_pipe(fd: int) -> int:
    """Bytes written to the pipe and not read yet."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def test_a_log_pipe_that_stops_reading_or_closes_never_blocks_or_fails_a_request(tmp_path, iris_path):
    """gunicorn's stdout is a pipe the test never reads: once its 64 KiB are full (a line dropped), 150 more requests
    are answered 200 at once, their lines dropped and counted; drained, the pipe gets whole lines again; closed, every
    request is still answered 200. The same two workers answer throughout: no worker blocked, timed out or crashed."""
    read_end, write_end = os.pipe()
    server = LiveServer(tmp_path, {**iris_settings(iris_path), "WORKER_CLASS": "sync"}, workers=2)
    server.stdout = Path(f"/proc/{os.getpid()}/fd/{write_end}")  # spawn() opens the pipe's write end by this name
    try:
        server.start()
        os.close(write_end)  # the server holds the only writers now
        workers = both_workers(server)
        with Load(server.url, "log-full", threads=2, pace=0.002) as load:
            poll(lambda: dropped_lines(server) > 0, timeout=60, what="the pipe filling")  # a line found no room
            full = time.monotonic()
            load.wait(len(load.answers) + 150)
            end = time.monotonic()
        assert load.failed() == []
        filled = load.figures(full, end)
        dropped = dropped_lines(server)
        assert dropped >= 100 and in_pipe(read_end) > 56 * 1024  # (a short line may still fit the last page)

        # Drained, the pipe takes whole lines again: each request's line, as one JSON object.
        os.read(read_end, 1 << 20)
        sent = [server.predict({"features": [IRIS_ROWS[0]]}, {"X-Request-ID": f"drained-{i}"}) for i in range(5)]
        assert {r.status_code for r in sent} == {200}
        lines = os.read(read_end, 1 << 20).decode().splitlines()
        assert [json.loads(x)["request_id"] for x in lines if '"drained-' in x] == [f"drained-{i}" for i in range(5)]

        os.close(read_end)
        read_end = None
        with Load(server.url, "log-closed", threads=2, pace=0.002) as closed:
            closed.wait(150)
        assert closed.failed() == []
        assert dropped_lines(server) >= dropped + 150  # every line since, with nowhere to go
        assert server.workers() == workers
        assert server.stderr.read_text().count("Booting worker") == 2
        assert "WORKER TIMEOUT" not in server.stderr.read_text()
    finally:
        server.stop()
        if read_end is not None:
            os.close(read_end)
    SUMMARY["log_pipe_full"] = {**filled, "lines_dropped": int(dropped), "workers_replaced": 0}
    SUMMARY["log_pipe_closed"] = {**closed.figures(0, float("inf")), "workers_replaced": 0}
