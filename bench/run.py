"""`make bench`: Sibyl (cache on, off and auto) vs a raw-WSGI ceiling, a Flask ceiling, a Flask + per-row Redis
ceiling and the naive tutorial app, all on loopback; then a keep-alive client reaching Sibyl four ways (sync or
gthread workers, with or without nginx in front)."""

import argparse
import base64
import contextlib
import hashlib
import importlib.metadata
import itertools
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter

import numpy as np
import orjson
import requests

from app.backends import choose_backend
from app.registry import load_model, save_model
from bench import models as recipe
from bench import report
from bench.measure import cpu_seconds, harnessed, memory, wrk
from config import Config
from tests.support.nginx import Nginx
from tests.support.servers import (
    ROOT,
    Gunicorn,
    HarnessError,
    serving,
    spawn,
    start_redis,
    stop,
)

FEATURES = recipe.FEATURES
RESULTS = Path(__file__).with_name("results")
# Tries per timed run before accepting a connection split that leaves a worker idle.
SPLIT_TRIES = 12
CEILINGS = (
    ("raw", "bench.ceilings:raw_app"),
    ("flask", "bench.ceilings:flask_app"),
    ("flask-redis", "bench.ceilings:flask_redis_app"),
)
# The Sibyl servers that have a cache, so run the hit shape too.
CACHED = ("sibyl", "sibyl-auto")
# A per-user limit no bench user reaches (16 million requests a second), in the shipped limit's window: the limiter
# counts every request in Redis as shipped, but never refuses one. The largest count config.rate reads (9 digits).
UNREACHED_LIMIT = "999999999/minute"


@dataclass(frozen=True)
class Shape:
    """A request shape: rows per request, and whether every request repeats one warmed row."""

    rows: int
    hit: bool = False

    @property
    def name(self) -> str:
        """E.g. "100-row miss"."""
        return f"{self.rows}-row {'hit' if self.hit else 'miss'}"


SHAPES = (Shape(1), Shape(1, hit=True), Shape(100), Shape(1000))
BATCH = Shape(1000)
# The keep-alive scenario's shapes: small requests, where a connection's cost shows most.
KEEPALIVE_SHAPES = (Shape(1), Shape(1, hit=True))


@dataclass(frozen=True)
class Route:
    """How the keep-alive client reaches a Sibyl: its gunicorn directly, or the shipped nginx.conf in front of it."""

    name: str
    server: Gunicorn
    proxy: Nginx | None = None

    @property
    def url(self) -> str:
        """Where wrk and the checks send requests."""
        return (self.proxy or self.server).url


@dataclass
class Plan:
    """How long and how hard to drive each server."""

    seconds: int  # per timed run; a scenario gives each server `rounds` of them, interleaved
    warmup: int
    rounds: int
    concurrencies: tuple[int, ...]
    debug_seconds: int
    debug_concurrency: int
    repeat: int  # in-process timings per model
    threads: int  # wrk threads: one keeps the load generator's share of a small machine's CPU down
    backend: str
    py_spy: bool
    only: str | None = None  # "keepalive": that scenario alone


class Bench:
    """One bench run: its plan, credentials, Redis, and every measurement so far."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        key = secrets.token_urlsafe(24)
        self.users = f"bench:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
        self.auth = "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()
        self.redis_url, self.redis = start_redis(workdir)
        self.redis_pid = self.redis.info("server")["process_id"]
        self.seeds = itertools.count(1)  # a new seed per wrk run: no run re-sends another's rows
        self.runs: list[dict] = []
        self.keepalive_runs: list[dict] = []
        self.workers = os.cpu_count() or 1  # gunicorn.conf.py's default, set explicitly for every server

    def env(self, **extra: str) -> dict:
        """Environment for any server: same worker count and settings for all; Sibyl reads the rest."""
        base = {"WEB_CONCURRENCY": str(self.workers), "SIBYL_USERS": self.users, "SIBYL_USERS_FILE": ""}
        base |= {"REDIS_URL": self.redis_url, "INFERENCE_BACKEND": self.plan.backend, "LOG_LEVEL": "INFO"}
        # As shipped (metrics, drift, the request log and the rate limiter on), except that one user at full speed
        # would pass the shipped 60000/minute within seconds and get 429s: the limit is raised out of reach instead.
        base |= {"RATE_LIMIT_PREDICT": UNREACHED_LIMIT}
        return base | extra

    def post(self, server: Gunicorn | Route, body: bytes) -> requests.Response:
        """One authenticated POST /predict."""
        headers = {"Content-Type": "application/json", "Authorization": self.auth}
        return requests.post(server.url + "/predict", data=body, headers=headers, timeout=30)

    def check(
        self, server: Gunicorn | Route, body: bytes, expected: list, cache: str | tuple[str, ...] | None = None
    ) -> str | None:
        """Fail loudly unless the server answers this request correctly (with this X-Cache, or one of these, if
        given); return its X-Cache."""
        r = self.post(server, body)
        allowed = (cache,) if isinstance(cache, str) else cache
        if r.status_code != 200:
            problem = f"status {r.status_code}: {r.text[:300]}"
        elif (got := r.json().get("predictions")) != expected:
            problem = f"predictions {str(got)[:200]} where {str(expected)[:200]} was expected"
        elif allowed and r.headers.get("X-Cache") not in allowed:
            wanted = " or ".join(allowed)
            problem = f"X-Cache {r.headers.get('X-Cache')} where {wanted} was expected (is Redis reachable?)"
        else:
            return r.headers.get("X-Cache")
        raise HarnessError(f"{server.name} at {server.url} answers wrongly, not timing it: {problem}")

    def load(
        self,
        target: Gunicorn | Route,
        model: str | None,
        shape: Shape,
        c: int,
        body: bytes | None = None,
        debug: bool = False,
    ) -> tuple[dict, list[dict]]:
        """Warm up, then one timed wrk run at c connections: its numbers and the server's request-log lines.
        Printed; a debug run is shorter. Through a Route with nginx, nginx's CPU is counted too."""
        server, proxy = (target.server, target.proxy) if isinstance(target, Route) else (target, None)
        if shape.hit:
            self.post(server, body)  # the row may have been flushed since the last hit run
        else:
            self.redis.flushall()  # keeps Redis small; fresh seeds already make every row new
        seconds, warmup = self.plan.debug_seconds if debug else self.plan.seconds, self.plan.warmup
        script = lambda: [str(shape.rows), str(FEATURES), str(next(self.seeds)), *([body.decode()] if body else [])]  # noqa: E731
        if warmup:
            wrk(target.url, c, warmup, self.plan.threads, script(), self.auth)
        restarts = server.restarts()
        # Only gthread workers hold connections (the client's, or nginx's pooled ones); sync workers take one
        # request at a time from the socket.
        gthread = server.env.get("WORKER_CLASS", "sync") == "gthread"
        split = server.connections if c >= self.workers and gthread else None
        # Redo a run whose connections missed a worker (see measure.wrk); the last try is kept as it is. Not for a
        # Route: there the split a keep-alive client happens to get is part of what is measured.
        tries = 1 if isinstance(target, Route) else SPLIT_TRIES
        workers, nginx = server.workers(), proxy.processes() if proxy else []
        for attempt in range(1, tries + 1):
            offset, logged = server.stdout.stat().st_size, _size(proxy.dir / "access.log") if proxy else 0
            cpu = cpu_seconds(workers), cpu_seconds([self.redis_pid]), cpu_seconds(nginx)
            if result := wrk(target.url, c, seconds, self.plan.threads, script(), self.auth, split, attempt == tries):
                break
        lines = server.request_lines(offset)
        run = {"server": target.name, "model": model, "shape": shape.name, "rows": shape.rows, "concurrency": c}
        run |= result | {"attempts": attempt, "worker_restarts": server.restarts() - restarts}
        # Where the machine's CPU went, per request: the server's workers, Redis, nginx if in front, and wrk itself.
        per_request = lambda seconds: round(seconds / max(result["requests"], 1) * 1e6)  # noqa: E731
        run["cpu_us"] = {
            "server": per_request(cpu_seconds(workers) - cpu[0]),
            "redis": per_request(cpu_seconds([self.redis_pid]) - cpu[1]),
            **({"nginx": per_request(cpu_seconds(nginx) - cpu[2])} if proxy else {}),
            "wrk": per_request(result["wrk_cores"] * result["requests"] / result["req_s"]),
        }
        if proxy:
            # Client connections nginx logged requests on, warm-up excluded: c when keep-alive works.
            run["client_connections"] = client_connections(proxy, logged)
        run["cache"] = dict(sorted(Counter(x.get("cache") for x in lines if x.get("cache")).items()))
        notes = f"  ERRORS {run['errors']} {run['error_detail']}" if run["errors"] else ""
        notes += f"  (try {attempt}: earlier connection splits missed a worker)" if attempt > 1 else ""
        notes += f"  ({run['worker_restarts']} worker restarts)" if run["worker_restarts"] else ""
        notes += f"  (X-Cache {report.counts(run['cache'])})" if run["cache"] else ""
        notes += f"  ({run['client_connections']} client connections)" if proxy else ""
        print(
            f"  {target.name + (' [debug]' if debug else ''):13} {model or '':3} {shape.name:13} c={c:<3} "
            f"{run['req_s']:8.1f} req/s  p50 {run['p50_ms']:7.2f} ms  p99 {run['p99_ms']:7.2f} ms  "
            f"conns/worker {run['conns_per_worker'] or '-'}  wrk {run['wrk_cores']:.2f} cores  "
            f"CPU us/req {report.cpu(run)}{notes}",
            flush=True,
        )
        # Where Redis is a tier, OFF means Redis overran CACHE_TIMEOUT_MS and the breaker opened: let it close so the
        # next run starts cached. (On local tiers OFF is by design: a batch, or a request the tier's sampling skipped.)
        cached = server.env.get("CACHE_ENABLED") != "false"
        if run["cache"].get("OFF") and cached and served_version(self, server)["cache"]["tiers"] == "redis":
            time.sleep(Config.CACHE_RETRY_SECONDS + 0.5)
        return run, lines


def make_models(workdir: Path) -> dict[str, dict]:
    """The issue's two models, fitted on seeded data and saved with metadata into the temp dir."""
    X, y = recipe.data()
    models = {}
    for name in ("RF", "LR"):
        estimator = recipe.train(name, X, y)
        path = workdir / f"{name.lower()}.joblib"
        # With reference statistics, as `flask register` saves them: drift is then computed on every request.
        save_model(estimator, path, name=name.lower(), version="1", sample_rows=X[:50], reference=(X, y))
        # Checks use training rows: the compiled backend is verified on them, so answers must match exactly.
        models[name] = {
            "path": path,
            "body": orjson.dumps({"features": X[:5].tolist()}),
            "expected": estimator.predict(X[:5]).tolist(),
            "hit_body": orjson.dumps({"features": X[:1].tolist()}),
        }
    return models


def random_body(rng: np.random.Generator, rows: int) -> bytes:
    """A body like predict.lua's: values in [-2, 2) with five decimals."""
    values = rng.uniform(-2, 2, size=(rows, FEATURES))
    return ('{"features":[' + ",".join("[" + ",".join(f"{v:.5f}" for v in row) + "]" for row in values) + "]}").encode()


def in_process(path: Path, plan: Plan) -> dict:
    """Median ms of orjson parse + numpy conversion + predict for one 1000-row body, with no server."""
    model = load_model(path)
    model.backend = choose_backend(model, plan.backend)
    body = random_body(np.random.default_rng(1), BATCH.rows)

    def median_ms(predict) -> float:
        times = []
        for _ in range(plan.repeat):
            t0 = perf_counter()
            predict(np.array(orjson.loads(body)["features"], dtype=np.float64))
            times.append(perf_counter() - t0)
        return round(statistics.median(times) * 1000, 3)

    return {
        "backend": model.backend.name,
        "ms": median_ms(lambda X: model.backend.predict(X, False)),
        "sklearn_ms": median_ms(model.estimator.predict),
    }


def recording(bench: Bench, name: str, path: Path) -> dict:
    """µs per request of each feature on the request path (auth, rate limit, metrics, drift, the log line), in a
    fresh interpreter with the servers' settings, metrics in multiprocess mode as the workers record them and the
    limiter counting in the bench's Redis (bench/recording.py). Printed."""
    args = [sys.executable, "-m", "bench.recording", str(path), bench.plan.backend, bench.redis_url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=os.environ | bench.env())
    if out.returncode:
        raise HarnessError(f"bench.recording failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    costs = orjson.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name}: " + ", ".join(f"{label} {costs[k]:g} µs" for k, label, _ in report.FEATURES), flush=True)
    if costs["log_lines_dropped"]:
        print(f"  {name}: {costs['log_lines_dropped']} log lines dropped (pipe full): the log line figure is low")
    return costs


def where_time_goes(bench: Bench, server: Gunicorn, model: str, hit_body: bytes) -> dict:
    """Mean per-step ms from Sibyl's DEBUG request lines, one short run per shape."""
    plan, out = bench.plan, {}
    for shape in SHAPES:
        profiler = _py_spy(server, f"{model}-{shape.name}", plan.debug_seconds) if plan.py_spy else None
        run, lines = bench.load(
            server, model, shape, plan.debug_concurrency, hit_body if shape.hit else None, debug=True
        )
        if profiler:
            profiler.wait(plan.debug_seconds + 30)
            stop(profiler)
        reqs = [x for x in lines if x.get("status") == 200 and "steps_ms" in x]
        if not reqs:
            raise HarnessError(f"{server.name}: no DEBUG request lines with steps_ms in {server.stdout}")
        mean = lambda values: round(statistics.fmean(values), 3)  # noqa: E731
        steps = {k: mean([x["steps_ms"][k] for x in reqs]) for k in reqs[0]["steps_ms"]}
        app_ms = mean([x["duration_ms"] for x in reqs])
        out[shape.name] = {
            "requests": len(reqs),
            "cache": run["cache"],
            "duration_ms": app_ms,
            **steps,
            "rest_ms": round(app_ms - sum(steps.values()), 3),
            # Each worker is busy all the time under this load, so it spends workers / req/s per request.
            "outside_ms": round(bench.workers / run["req_s"] * 1000 - app_ms, 3),
        }
    return out


def _py_spy(server: Gunicorn, label: str, seconds: int):
    """Record one worker with py-spy into results/, if py-spy is installed (it is optional)."""
    binary = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not binary:
        print("  (--py-spy: py-spy is not installed; skipping profiles)")
        return None
    path = RESULTS / f"py-spy-{label.replace(' ', '-')}.svg"
    args = [str(binary), "record", "--pid", str(server.workers()[0]), "--duration", str(seconds), "-o", str(path)]
    return spawn([*args, "--nonblocking"], stderr=server.stderr.with_suffix(".py-spy"))


def served_version(bench: Bench, server: Gunicorn | Route) -> dict:
    """GET /models's description of the one version the server serves: backend, cache policy and tiers."""
    info = requests.get(server.url + "/models", headers={"Authorization": bench.auth}, timeout=10).json()
    return info["models"][0]["versions"][0]


def stored_answers(client) -> int:
    """Answers the cache holds in Redis: keys under CACHE_PREFIX, less the rate limiter's counters."""
    limits = f"{Config.CACHE_PREFIX}limit:".encode()
    return sum(1 for key in client.scan_iter(match=f"{Config.CACHE_PREFIX}*", count=1000) if not key.startswith(limits))


def wait_for_answers(client, n: int) -> int:
    """stored_answers once it reaches n, or after 10 s of trying (Sibyl stores a miss before answering, so a working
    cache reaches n at once)."""
    deadline = time.monotonic() + 10
    while (found := stored_answers(client)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def check_sibyl(bench: Bench, server: Gunicorn | Route, model: dict) -> str:
    """A first answer must be a MISS, and the same rows then a HIT: the cache works. Where the version's cache tiers
    include Redis (CACHE_POLICY on, or auto where Redis pays) the MISS must be stored there; where they are each
    worker's memory alone (auto where Redis does not pay), nothing may be. The model must carry reference statistics,
    so drift is computed on every request as shipped. Returns the tiers."""
    version = served_version(bench, server)
    if not version["reference"]:
        raise HarnessError(f"{server.name} at {server.url}: the model has no reference statistics, so no drift to time")
    tiers = version["cache"]["tiers"]
    bench.redis.flushall()
    bench.check(server, model["body"], model["expected"], cache="MISS")
    rows = len(model["expected"])
    if tiers == "redis":
        if wait_for_answers(bench.redis, rows) != rows:
            raise HarnessError(f"{server.name} at {server.url} answered a MISS but stored nothing in Redis")
        bench.check(server, model["body"], model["expected"], cache="HIT")
        bench.check(server, model["hit_body"], model["expected"][:1], cache="HIT")
    elif tiers == "local":
        if stored_answers(bench.redis):
            raise HarnessError(
                f"{server.name} at {server.url} keeps this model out of Redis, yet stored its rows there"
            )
        # Each worker holds its own answers, and any worker may take a request: after one more request than there
        # are workers, some worker has answered the rows before, so at least one answer must be a HIT.
        for body, expected in ((model["body"], model["expected"]), (model["hit_body"], model["expected"][:1])):
            outcomes = {bench.check(server, body, expected, cache=("MISS", "HIT")) for _ in range(bench.workers + 1)}
            if "HIT" not in outcomes:
                raise HarnessError(f"{server.name} at {server.url}: repeated rows were never a HIT from worker memory")
    else:
        raise HarnessError(f"{server.name} at {server.url}: cache tiers {tiers!r} where a cache was expected")
    return tiers


def measure(bench: Bench, models: dict, results: dict, stack: contextlib.ExitStack) -> None:
    """Start and check every server, then run each scenario on all of them back to back."""
    lineup = []  # (server, model name or None for the ceilings)
    for name, target in CEILINGS:
        server = stack.enter_context(serving(name, target, bench.workdir, bench.env()))
        bench.check(server, random_body(np.random.default_rng(2), 2), [0])
        lineup.append((server, None))
    for name, model in models.items():
        env = bench.env(MODEL_PATH=str(model["path"]))
        naive = stack.enter_context(serving("naive", "bench.naive:app", bench.workdir, env))
        bench.check(naive, model["body"], model["expected"])
        sibyl = stack.enter_context(serving("sibyl", "wsgi:app", bench.workdir, env))
        check_sibyl(bench, sibyl, model)
        # The same service with CACHE_ENABLED=false: what the cache costs on misses, and what it saves.
        uncached = stack.enter_context(
            serving("sibyl-nocache", "wsgi:app", bench.workdir, env | {"CACHE_ENABLED": "false"})
        )
        bench.check(uncached, model["body"], model["expected"], cache="OFF")
        # CACHE_POLICY=auto: Redis only where predicting a row costs more than a miss's round trips (each worker's
        # memory otherwise), as weighed at startup; GET /models says which it chose.
        auto = stack.enter_context(serving("sibyl-auto", "wsgi:app", bench.workdir, env | {"CACHE_POLICY": "auto"}))
        tiers = check_sibyl(bench, auto, model)
        results["auto"][name] = served_version(bench, auto)["cache"]
        print(f"  sibyl-auto {name}: cache tiers {tiers} ({report.auto_reason(results['auto'][name])})", flush=True)
        lineup += [(naive, name), (sibyl, name), (uncached, name), (auto, name)]
    # Per scenario, every server runs in turn, `rounds` times over, and keeps its median run: a slow spell
    # on a shared machine (throughput here swings 2x between minutes) hits Sibyl and what it is compared
    # with alike. Only Sibyl with a cache runs the hit shape.
    for shape in SHAPES:
        for c in bench.plan.concurrencies:
            turn = [(s, name) for s, name in lineup if s.name in CACHED or not shape.hit]
            rounds = [[] for _ in turn]
            for i in range(bench.plan.rounds):
                for j in rotated(range(len(turn)), i):
                    server, name = turn[j]
                    rounds[j].append(
                        bench.load(server, name, shape, c, models[name]["hit_body"] if shape.hit else None)[0]
                    )
            bench.runs += [median_run(runs) for runs in rounds]
    for server, name in lineup:
        if server.name == "sibyl":
            # One connection, so server time shows as latency; its own rounds, since one run swings 20%.
            bench.runs.append(median_run([bench.load(server, name, BATCH, 1)[0] for _ in range(bench.plan.rounds)]))
            results["memory"][name] = worker_memory(server)
            results["backends"][name] = served_version(bench, server)["backend"]


def keepalive(bench: Bench, models: dict, results: dict) -> None:
    """A keep-alive client (wrk) reaching Sibyl four ways, per model, shape and concurrency in interleaved rounds:
    sync workers directly (each answer says `Connection: close`, so the client reconnects every request); the
    shipped nginx.conf in front of them (the client's connections stay open, one short upstream connection per
    request); gthread workers directly (keep-alive, but each connection stays on the worker that accepted it); and
    nginx with an upstream `keepalive` pool in front of gthread workers."""
    for name, model in models.items():
        with contextlib.ExitStack() as stack:
            keepalive_model(bench, name, model, results, stack)


def keepalive_model(bench: Bench, name: str, model: dict, results: dict, stack: contextlib.ExitStack) -> None:
    """The keep-alive scenario for one model; its servers and proxies are stopped by the caller's stack."""
    env = bench.env(MODEL_PATH=str(model["path"]))
    routes = []
    for worker_class, pool in (("sync", 0), ("gthread", 32)):
        server = stack.enter_context(
            serving(f"sibyl-{worker_class}", "wsgi:app", bench.workdir, env | {"WORKER_CLASS": worker_class})
        )
        # sync: the shipped file as it is; gthread: plus the upstream pool its comment says to add.
        proxy = Nginx(bench.workdir, [f"127.0.0.1:{server.port}"], upstream_keepalive=pool)
        stack.callback(proxy.stop)
        proxy.start()
        label = "nginx pool → gthread" if pool else "nginx → sync"
        routes += [Route(f"{worker_class} direct", server), Route(label, server, proxy)]
    for route in routes:
        if route.proxy:  # the rows check_sibyl just stored, through nginx
            bench.check(route, model["body"], model["expected"], cache="HIT")
        else:
            check_sibyl(bench, route, model)
    if name not in results["backends"]:
        results["backends"][name] = served_version(bench, routes[0])["backend"]
    for shape in KEEPALIVE_SHAPES:
        for c in bench.plan.concurrencies:
            rounds = [[] for _ in routes]
            for i in range(bench.plan.rounds):
                for j in rotated(range(len(routes)), i):
                    run = bench.load(routes[j], name, shape, c, model["hit_body"] if shape.hit else None)[0]
                    rounds[j].append(run)
            for runs in rounds:
                # How many rounds left a gthread worker without a connection (a Route's runs are not redone).
                idle = sum(1 for r in runs if r["conns_per_worker"] and min(r["conns_per_worker"]) == 0)
                bench.keepalive_runs.append(median_run(runs) | {"rounds_idle_worker": idle})


def _size(path: Path) -> int:
    """A file's size, 0 if it does not exist yet."""
    return path.stat().st_size if path.exists() else 0


def client_connections(proxy: Nginx, offset: int) -> int:
    """Distinct client connections in nginx's access log after byte offset (the shipped format logs each line's
    connection serial number)."""
    with open(proxy.dir / "access.log", "rb") as f:
        f.seek(offset)
        return len(set(re.findall(rb'"connection":(\d+),', f.read())))


def rotated(items: Sequence, by: int) -> list:
    """items starting at position `by`: each round starts with a different server."""
    k = by % len(items)
    return [*items[k:], *items[:k]]


def median_run(runs: list[dict]) -> dict:
    """The run with the median req/s (the lower middle one for an even count), with every round's req/s."""
    ordered = sorted(runs, key=lambda r: r["req_s"])
    return ordered[(len(ordered) - 1) // 2] | {"rounds_req_s": [r["req_s"] for r in runs]}


def worker_memory(server: Gunicorn) -> dict:
    """All workers' PSS over one worker's RSS: below 1 when workers share their pages, N when none are shared."""
    workers = memory(server.workers())
    one = max(workers, key=lambda w: w["rss_mib"])
    total = round(sum(w["pss_mib"] for w in workers), 1)
    return {
        "workers": workers,
        "total_pss_mib": total,
        "one_rss_mib": one["rss_mib"],
        "one_pss_mib": one["pss_mib"],
        "ratio": round(total / one["rss_mib"], 2),
    }


def python_loop_seconds() -> float:
    """Seconds this machine's Python takes for 10^7 additions in a loop (best of 3): how fast the machine was, so a
    run's absolute figures (µs of CPU a row) can be read against another's."""
    best = float("inf")
    for _ in range(3):
        t0, total = perf_counter(), 0
        for i in range(10**7):
            total += i
        best = min(best, perf_counter() - t0)
    return round(best, 2)


def machine(bench: Bench) -> dict:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    packages = ("flask", "gunicorn", "scikit-learn", "numpy", "onnxruntime", "orjson", "redis")
    return {
        "cpu": next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), platform.processor()),
        "cores": os.cpu_count(),
        "memory_mib": int(next(x.split()[1] for x in meminfo if x.startswith("MemTotal"))) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: importlib.metadata.version(p) for p in packages},
        "wrk": (wrk_v.stdout + wrk_v.stderr).splitlines()[0].strip(),
        "redis": bench.redis.info("server")["redis_version"],
        # Other work on the machine skews every number; a load average well above 0 before the run says so.
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "python_loop_s": python_loop_seconds(),
        "commit": git("rev-parse", "--short", "HEAD")
        + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
    }


def run(plan: Plan, workdir: Path) -> dict:
    """Every measurement: in-process, then all servers scenario by scenario, the keep-alive client's four routes, then
    the DEBUG step timings (with plan.only == "keepalive", that scenario alone)."""
    bench = Bench(plan, workdir)
    results = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(bench)}
    results |= {"plan": asdict(plan), "backends": {}, "memory": {}, "steps": {}, "auto": {}}
    print(f"bench: {results['machine']['cores']} cores, {plan.seconds} s per run; models and in-process timings...")
    models = make_models(workdir)
    if plan.only != "keepalive":
        # In-process first, while no server competes for the CPU.
        results["in_process"] = {name: in_process(m["path"], plan) for name, m in models.items()}
        print("bench: the cost of each feature per request, in process...")
        results["recording"] = {name: recording(bench, name, m["path"]) for name, m in models.items()}
        with contextlib.ExitStack() as stack:
            measure(bench, models, results, stack)
        results["runs"] = bench.runs
    print("bench: a keep-alive client: sync or gthread workers, directly or through nginx...")
    keepalive(bench, models, results)
    results["keepalive"] = bench.keepalive_runs
    if plan.only != "keepalive":
        print("bench: where the time goes (Sibyl with LOG_LEVEL=DEBUG)...")
        for name, model in models.items():
            env = bench.env(MODEL_PATH=str(model["path"]), LOG_LEVEL="DEBUG")
            with serving("sibyl", "wsgi:app", workdir, env) as s:
                check_sibyl(bench, s, model)
                results["steps"][name] = where_time_goes(bench, s, name, model["hit_body"])
    return results


def parse_args(argv: list[str] | None) -> Plan:
    """Command line -> Plan."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round of 2 s, concurrency 8 only (about 2 minutes)"
    )
    p.add_argument("--duration", "--seconds", type=int, help="seconds per timed run (default 4, or 2 with --quick)")
    p.add_argument(
        "--only",
        choices=("keepalive",),
        help="one scenario alone: keepalive = a keep-alive client to sync/gthread workers, directly or through nginx",
    )
    p.add_argument("--rounds", type=int, help="interleaved runs per server and scenario, median kept (default 3)")
    p.add_argument("--backend", default="auto", choices=("auto", "sklearn", "onnx"), help="Sibyl's INFERENCE_BACKEND")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: leaves the cores to servers)")
    p.add_argument("--py-spy", action="store_true", help="also record py-spy flame graphs of one worker, if installed")
    a = p.parse_args(argv)
    seconds = a.duration or (2 if a.quick else 4)
    return Plan(
        seconds=seconds,
        warmup=1,
        rounds=a.rounds or (1 if a.quick else 3),
        concurrencies=(8,) if a.quick else (8, 32),
        debug_seconds=min(seconds, 3),
        debug_concurrency=8,
        repeat=20 if a.quick else 50,
        threads=a.wrk_threads,
        backend=a.backend,
        py_spy=a.py_spy,
        only=a.only,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the bench; every process it started is stopped on any exit, Ctrl-C and SIGTERM included."""
    plan = parse_args(argv)
    results = harnessed("bench", lambda workdir: run(plan, workdir))
    if isinstance(results, int):
        return results
    table = report.write(results, RESULTS)
    print("\n" + table)
    for target in results.get("targets", ()):
        print(f"bench: {report.VERDICT[target['pass']].strip('*'):8} {target['target']}: {target['measured']}")
    wrote = "results.json and table.md" if plan.only else "results.json, table.md and chart.png"
    print(f"bench: wrote {wrote} in {RESULTS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
