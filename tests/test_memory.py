"""Memory under 10^5 distinct rows: each worker's RSS levels off because both cache tiers are bounded (the worker's
LRU by CACHE_LOCAL_ENTRIES/CACHE_LOCAL_BYTES, Redis by its maxmemory), and no other per-row state grows: drift
windows hold DRIFT_WINDOW rows, metric series are per model version, descriptors stay put."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, basic_auth

from app.cache import LOCAL_MAX_ROWS
from tests.support.servers import free_port, record_artifact

ROWS = 100_000  # distinct rows in all, over both workers
# Rows per request: the most the worker's tier keeps answers for (a batch's rows are Redis's alone). 12,500 requests.
BATCH = LOCAL_MAX_ROWS
CHECKPOINT = 10_000  # rows between two readings of each worker's RSS
# The bounded run: a small local tier, full after a few hundred requests; with probabilities (about 120 bytes a stored
# row, plus its 60-byte key) CACHE_LOCAL_BYTES is the bound that bites, at about 1450 rows.
BOUNDED = {"CACHE_LOCAL_ENTRIES": "2000", "CACHE_LOCAL_BYTES": str(256 * 1024), "maxmemory": "8mb"}
# The control: a local tier and a Redis large enough to keep every row, as an unbounded cache would.
UNBOUNDED = {"CACHE_LOCAL_ENTRIES": "1000000", "CACHE_LOCAL_BYTES": str(2**30), "maxmemory": "1gb"}
# RSS growth allowed over the last 40% of the run (6x10^4 -> 10^5 rows, about 2x10^4 a worker). Measured: the
# bounded run grows by about 0.1 MiB there; the control, keeping every row, by 7-8 MiB a worker (~400 bytes a row).
# Not the second half: each worker's RSS steps up once by about 2.8 MiB, then levels off, at 40-48x10^3 rows in all
# (the allocator taking a larger block; it happens with bounded tiers too), too near the half-way mark.
TAIL_MIB = 3
TAIL_FROM = ROWS * 3 // 5


def rows(start: int, n: int) -> list[list[float]]:
    """n distinct iris-shaped rows numbered from start (no two numbers share a cache key)."""
    k = np.arange(start, start + n)
    return np.column_stack(
        [4.3 + (k % 1000) * 0.0035, 2.0 + (k // 1000) * 0.01, 1.0 + (k % 7) * 0.8, 0.1 + (k % 5) * 0.5]
    ).tolist()


def rss_kib(pid: int) -> int:
    """A process's resident set size (VmRSS), in KiB, from /proc."""
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def descriptors(pid: int) -> int:
    """Open file descriptors of a process, from /proc."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def series(url: str) -> int:
    """How many series GET /metrics exposes."""
    text = requests.get(url + "/metrics", headers=basic_auth(ADMIN, ADMIN_KEY), timeout=10).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def two_workers(server) -> list[int]:
    """The server's two worker pids, once both are forked (gunicorn answers /health as soon as one is)."""
    deadline = time.monotonic() + 10
    while len(workers := server.workers()) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2, f"gunicorn did not fork 2 workers within 10 s: {workers}"
    return workers


def load_run(server) -> dict:
    """Send ROWS distinct rows (with probabilities) in BATCH-row requests from two client threads, so both workers
    take a share; read each worker's RSS and descriptors and the metric series count at every CHECKPOINT."""
    workers = two_workers(server)

    def send(start: int) -> None:
        body = {"features": rows(start, BATCH), "probabilities": True}
        r = requests.post(server.url + "/predict", json=body, headers=basic_auth(), timeout=30)
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["predictions"]) == BATCH

    checkpoints = []
    with ThreadPoolExecutor(2) as pool:
        for done in range(CHECKPOINT, ROWS + 1, CHECKPOINT):
            list(pool.map(send, range(done - CHECKPOINT, done, BATCH)))
            assert server.workers() == workers  # no worker restarted: each column below is one process
            checkpoints.append(
                {
                    "rows": done,
                    "rss_kib": {str(pid): rss_kib(pid) for pid in workers},
                    "fds": {str(pid): descriptors(pid) for pid in workers},
                    "metric_series": series(server.url),
                }
            )
    by_worker: dict[str, int] = {}
    for line in server.request_lines():
        by_worker[str(line["pid"])] = by_worker.get(str(line["pid"]), 0) + line.get("rows", 0)
    return {"workers": [str(pid) for pid in workers], "rows_by_worker": by_worker, "checkpoints": checkpoints}


def growth_mib(result: dict, pid: str) -> float:
    """A worker's RSS growth over the run's last 40% (the checkpoint at TAIL_FROM rows to the last), in MiB."""
    at = {c["rows"]: c["rss_kib"][pid] for c in result["checkpoints"]}
    return (at[ROWS] - at[TAIL_FROM]) / 1024


@pytest.mark.parametrize("tiers", [BOUNDED, UNBOUNDED], ids=["bounded", "unbounded-control"])
def test_worker_rss_levels_off_under_100k_distinct_rows(live_server, spawn_redis, tiers):
    """10^5 distinct rows through two workers: every answer is 200. With bounded tiers, each worker's RSS grows by
    at most TAIL_MIB over the run's last 40%, and Redis evicts rather than grow past its maxmemory.
    The control keeps every row (tiers far larger than the run) and grows past that bound: the check can fail.
    Descriptors and metric series don't grow in either run."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    maxmemory = ("--maxmemory", tiers["maxmemory"], "--maxmemory-policy", "allkeys-lru")
    redis_client = spawn_redis(url, "--port", str(port), *maxmemory)
    env = {"REDIS_URL": url, **{k: v for k, v in tiers.items() if k.startswith("CACHE_")}}
    server = live_server(env, workers=2)
    result = load_run(server)
    info = redis_client.info()
    result["redis"] = {
        "maxmemory": info["maxmemory"],
        "used_memory": info["used_memory"],
        "keys": redis_client.dbsize(),
        "evicted_keys": info["evicted_keys"],
    }
    result["settings"] = {**env, "REDIS_URL": "(private)", "rows": ROWS, "batch": BATCH, "DRIFT_WINDOW": 1000}
    result["tail_growth_mib"] = {pid: round(growth_mib(result, pid), 2) for pid in result["workers"]}
    bounded = tiers is BOUNDED
    record_artifact("memory.json", "bounded" if bounded else "unbounded_control", result)
    print(json.dumps({k: result[k] for k in ("rows_by_worker", "tail_growth_mib", "redis")}))

    half, last = result["checkpoints"][len(result["checkpoints"]) // 2 - 1], result["checkpoints"][-1]
    assert half["rows"] == ROWS // 2
    for pid in result["workers"]:
        assert result["rows_by_worker"][pid] >= ROWS // 4  # both workers took a real share
        # A connection a worker is still closing (it waits for the client's FIN) counts for a moment: one more than
        # the first half's peak is noise; a descriptor leaked per request would add 50.
        peak = [max(c["fds"][pid] for c in part) for part in (result["checkpoints"][:5], result["checkpoints"][5:])]
        assert peak[1] <= peak[0] + 1
        if bounded:
            assert growth_mib(result, pid) <= TAIL_MIB, result["checkpoints"]
        else:
            assert growth_mib(result, pid) > TAIL_MIB, result["checkpoints"]
    # The first scrape adds GET /metrics's own series; from then on the count is fixed (labels are per model version,
    # endpoint and status, never per row or request).
    assert last["metric_series"] == half["metric_series"]
    if bounded:
        redis_info = result["redis"]
        assert redis_info["evicted_keys"] > 0 and redis_info["keys"] < ROWS
        assert redis_info["used_memory"] <= redis_info["maxmemory"] * 1.05  # Redis evicts once over, not before


def test_per_row_state_in_a_worker_stays_within_its_bounds(make_app, redis_url):
    """In one app (what each worker holds), 2x10^4 distinct rows leave the local tier within CACHE_LOCAL_ENTRIES and
    CACHE_LOCAL_BYTES, the drift window at DRIFT_WINDOW rows in its preallocated ring, and the metrics' label
    children at one set per (endpoint, status, model version), the same after 10^4 rows as after 2x10^4."""
    app = make_app(REDIS_URL=redis_url, CACHE_LOCAL_ENTRIES=500, CACHE_LOCAL_BYTES=64 * 1024, DRIFT_WINDOW=1500)
    client = app.test_client()
    cache, drift, metrics = (app.extensions[f"sibyl.{name}"] for name in ("cache", "drift", "metrics"))
    (window,) = drift.windows.values()
    ring = window.ring
    sizes = []
    for start in range(0, 20_000, BATCH):
        r = client.post("/predict", json={"features": rows(start, BATCH), "probabilities": True}, headers=basic_auth())
        assert r.status_code == 200
        assert len(cache._local) <= 500 and cache._local_size <= 64 * 1024
        sizes.append((len(metrics._by_request), len(metrics._by_prediction)))
    held = sum(len(key) + len(raw) for key, (_, raw) in cache._local.items())
    assert held == cache._local_size
    assert window.ring is ring and ring.shape == (1500, 5) and window.held == 1500 and window.rows == 20_000
    assert window.counts.sum() == 1500 * 5  # each column counts the window's rows, no more
    assert sizes[len(sizes) // 2 - 1] == sizes[-1] == (1, 1)
