"""`make stress`: a soak. Mixed load (every protocol, hits, misses, batches, errors, feedback, admin reads) at high
concurrency against gunicorn (2 workers, recycling as shipped) and a password-protected Redis, a rollout midway;
then the verdict: no 5xx or failed request, p99 stable, worker memory bounded, no descriptor or connection leak,
no secret in any log. Prints a summary and writes it as JSON; exits 1 if a check fails."""

import argparse
import base64
import contextlib
import hashlib
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import requests

from bench.measure import cpu_seconds, memory
from models.train_demo import main as train_demo
from tests.support.servers import HarnessError, die_with_parent, proc_stat, serving, start_redis, stop_all

LUA = Path(__file__).with_name("stress.lua")
RESULTS = Path(__file__).with_name("results")
WINDOWS = 10  # the run is cut into 10 wrk runs: per-minute figures for the 10-minute soak
ROLLOUT_WINDOW = 4  # the rollout starts halfway through the 5th window

# What each path may answer under the mix in stress.lua (the request log has path and status, not the kind).
EXPECTED = {
    "/predict": {200, 400, 401},  # hits and CSV; bad rows; a wrong key
    "/models/iris/predict": {200},
    "/models/iris/versions/1/predict": {200},
    "/invocations": {200, 400},  # bad JSON
    "/v1/models/iris:predict": {200, 401},  # no credentials
    "/v2/models/iris/infer": {200, 400},  # shape and data disagree
    # 404 too: a prediction's feedback record is written through the cache's breaker, and dropped (the answer is
    # not) when Redis takes longer than CACHE_TIMEOUT_MS, as it may on 2 cores shared with a busy neighbour.
    "/feedback": {200, 404, 503},
    "/models": {200, 401},  # a wrong bearer token
    "/v2/models/iris": {200},
    "/v1/models/iris": {200},
    "/ready": {200},
    "/health": {200},
    "/v2/health/ready": {200},
    "/metrics": {200},
    "/status": {200},
    "/admin/models": {200},
    "/admin/reload": {202},
    "/models/nope/predict": {404},
    "/nope": {404},
    "/admin/users": {403},
}

# The checks' limits, justified in README's Reliability section.
# Median p99 of the last half of the windows vs the first half: this VM swings up to 2x minute to minute.
P99_RATIO = 2.0
QUIET = 0.5  # cores (of the 2) used by other processes, from which a p99 rise is not judged Sibyl's
# Windows shorter than this are not judged for p99: in make test's 60 s form (6 s windows, a worker recycled every
# few seconds, each new one importing onnxruntime before it serves) one window's p99 swings 60-450 ms at the commit
# before this check was relaxed too, so only the 10-minute soak's one-minute windows say something.
MIN_JUDGED_WINDOW = 30.0
# Windows at each end whose p99s are compared: half of them, so one window's spike does not decide. In make test's
# 60 s form a worker is recycled every few seconds, and each new one imports onnxruntime (a few hundred ms of CPU),
# which lifts a 6 s window's p99 to 300 ms now and then (3 of 10 windows in one CI run, 2 of them in the last 3).
HALF = WINDOWS // 2
RSS_GROWTH = 1.5  # largest worker RSS, last window vs first: both cache tiers are full within the first window
FD_SLACK = 2  # per process: a worker may hold one more pooled Redis connection (and its socket) at any moment


def basic(user: str, key: str) -> dict:
    """An Authorization header for basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def add_version(model_dir: Path, version: str) -> None:
    """iris/<version>: a copy of iris/1 with its metadata's version changed, as `register` would leave it."""
    source, folder = model_dir / "iris" / "1", model_dir / "iris" / version
    folder.mkdir()
    shutil.copy(source / "model.joblib", folder / "model.joblib")
    meta = json.loads((source / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "version": version}))


def fds(pids: list[int]) -> dict[int, int]:
    """Open file descriptors per process, from /proc."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # a worker may be recycled while we look
            out[pid] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def box_busy() -> float:
    """CPU seconds the whole machine has been busy (neither idle nor waiting on I/O), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def sibyl_cpu(master: int, others: list[int]) -> float:
    """CPU seconds used so far by the gunicorn master, its children (workers, even those recycled since: the master
    reaped them, so their time is in its cutime and cstime) and the other processes given (live workers, Redis)."""
    fields = proc_stat(master)
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime
    return cpu_seconds([master, *others]) + reaped


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_clients(client) -> int:
    """Connections Redis holds, ours excluded."""
    return sum(1 for c in client.client_list() if int(c["id"]) != client.client_id())


def run_wrk(url: str, connections: int, seconds: float, seed: int, creds: list[str]) -> dict:
    """One wrk run of stress.lua: its latency percentiles (ms), socket errors and statuses."""
    args = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s", "--timeout", "10s", "-s", str(LUA)]
    args += [url, "--", str(seed), *creds]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=die_with_parent)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STRESS ")), None)
    if proc.returncode or line is None:
        raise HarnessError(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout[-1500:]}")
    r = json.loads(line[7:])
    return {
        "requests": r["requests"],
        "req_s": round(r["requests"] / (r["duration_us"] / 1e6), 1),
        **{f"{p}_ms": r[f"{p}_us"] / 1000 for p in ("p50", "p90", "p99", "max")},
        "socket_errors": {k: r[k] for k in ("connect", "read", "write", "timeout")},
        "statuses": dict(sorted(r["statuses"].items())),
    }


def rollout(server, model_dir: Path, admin: dict, delay: float, out: dict) -> None:
    """After `delay` s: add iris/2, POST /admin/reload, and time until GET /models says generation 2."""
    time.sleep(delay)
    add_version(model_dir, "2")
    started = time.monotonic()
    resp = requests.post(server.url + "/admin/reload", headers=admin, timeout=30)
    out.update(status=resp.status_code, answer=resp.json())
    deadline = started + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.url + "/models", headers=admin, timeout=10).json().get("generation") == 2:
                out["seconds"] = round(time.monotonic() - started, 2)
                return
        time.sleep(0.2)


def log_tally(path: Path) -> tuple[Counter, Counter, Counter, list[str]]:
    """(path, status) counts, the answering versions, the other log lines (warnings: a Redis timeout, say) by logger
    and message, and the first ERROR lines whole (their traces), read line by line from the app's stdout (a
    10-minute run writes about a million lines)."""
    statuses, versions, others, errors = Counter(), Counter(), Counter(), []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.startswith(b"{"):
                continue
            line = json.loads(raw)
            if line.get("message") != "request":
                others[f"{line.get('level')} {line.get('logger')}: {str(line.get('message'))[:80]}"] += 1
                if line.get("level") == "ERROR" and len(errors) < 5:
                    errors.append(raw.decode(errors="replace")[:3000])
                continue
            statuses[line["path"], line["status"]] += 1
            if line.get("version"):
                versions[line["version"]] += 1
    return statuses, versions, others, errors


def secrets_found(paths: list[Path], secret_values: dict[str, str]) -> dict[str, list[str]]:
    """Which of the named secrets (keys, passwords, Authorization values) appear in which of the files, read in
    chunks (a 10-minute request log is a few hundred MB), each overlapping the last by the longest secret."""
    found, overlap = {}, max(map(len, secret_values.values()))
    for path in paths:
        hits, tail = set(), b""
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                data, tail = tail + chunk, (tail + chunk)[-overlap:]
                hits |= {name for name, value in secret_values.items() if value.encode() in data}
        if hits:
            found[path.name] = sorted(hits)
    return found


def check(name: str, ok: bool, detail: str, judged: bool = True) -> dict:
    """One verdict line of the summary; a check the run could not judge passes, and says so."""
    return {"check": name, "ok": bool(ok), "judged": judged, "detail": detail}


def run(seconds: float, connections: int = 48, out: Path | None = None, max_requests: int | None = None) -> dict:
    """The whole soak; returns the summary (see the module docstring), written to `out` as JSON."""
    window = max(5.0, seconds / WINDOWS)
    workdir = Path(tempfile.mkdtemp(prefix="sibyl-stress-"))
    try:
        return _run(workdir, window, connections, out, max_requests)
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, window: float, connections: int, out: Path | None, max_requests: int | None) -> dict:
    """run() inside its work folder."""
    model_dir = workdir / "models"
    train_demo(str(model_dir / "iris" / "1" / "model.joblib"))
    key, admin_key, redis_password = (secrets.token_hex(32) for _ in range(3))
    users = ",".join(
        f"{name}:sha256:{hashlib.sha256(k.encode()).hexdigest()}{role}"
        for name, k, role in (("stress", key, ""), ("ops", admin_key, ":admin"))
    )
    redis_url, redis_client = start_redis(workdir, password=redis_password)
    env = {
        "MODEL_DIR": str(model_dir),
        "MODEL_PATH": "",
        "SIBYL_USERS": users,
        "SIBYL_USERS_FILE": "",
        "REDIS_URL": redis_url,
        "FEEDBACK_TTL": "3600",
        "WEB_CONCURRENCY": "2",
        "WORKER_CLASS": "sync",
        "LOG_LEVEL": "INFO",
        # The limits count every request (one Redis round trip each, as shipped), set so they never refuse one: all
        # this load comes from one address and two users, which the shipped limits would rightly throttle.
        "RATE_LIMIT_PREDICT": "100000000/minute",
        "RATE_LIMIT_ADMIN": "100000000/minute",
        "RATE_LIMIT_METRICS": "100000000/minute",
        "RATE_LIMIT_LOGIN_FAILURES": "100000000/minute",
    }
    if max_requests:  # the bounded run recycles sooner, so CI crosses a recycle too
        env["GUNICORN_CMD_ARGS"] = f"--max-requests {max_requests} --max-requests-jitter {max_requests // 10}"
    creds = ["stress", key, "ops", admin_key]
    admin = basic("ops", admin_key)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    with serving("sibyl", "wsgi:app", workdir, env) as server:
        pids = lambda: [server.proc.pid, *server.workers()]  # noqa: E731
        # Warm-up: both workers answer, connect to Redis and fill their local cache tier before the baseline.
        run_wrk(server.url, connections, min(10.0, window), 1, creds)
        time.sleep(1)
        before = {"fds": fds(pids()), "redis_clients": redis_clients(redis_client)}
        redis_pid = redis_client.info("server")["process_id"]
        windows, rolled = [], {}
        for i in range(WINDOWS):
            thread = None
            if i == ROLLOUT_WINDOW:
                thread = threading.Thread(target=rollout, args=(server, model_dir, admin, window / 2, rolled))
                thread.start()
            # Where the machine's CPU went: Sibyl (master, workers, Redis), wrk, and everything else on this
            # shared box, whose bursts show up as latency that is not Sibyl's doing.
            cpu = (
                box_busy(),
                sibyl_cpu(server.proc.pid, [*server.workers(), redis_pid]),
                children_cpu(),
                time.monotonic(),
            )
            result = run_wrk(server.url, connections, window, 100 + i, creds)
            if thread:
                thread.join()
            sibyl = sibyl_cpu(server.proc.pid, [*server.workers(), redis_pid]) - cpu[1]
            box, wrk_cpu, elapsed = box_busy() - cpu[0], children_cpu() - cpu[2], time.monotonic() - cpu[3]
            result["sibyl_cpu_ms_per_request"] = round(sibyl * 1000 / result["requests"], 3)
            result["cores"] = {
                "sibyl": round(sibyl / elapsed, 2),
                "wrk": round(wrk_cpu / elapsed, 2),
                "others": round(max(0.0, box - sibyl - wrk_cpu) / elapsed, 2),
            }
            result["worker_rss_mib"] = [m["rss_mib"] for m in memory(server.workers())]
            windows.append(result)
            print(
                f"window {i + 1}/{WINDOWS}: {result['req_s']:.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
                f"RSS {result['worker_rss_mib']} MiB, cores: {result['cores']}",
                flush=True,
            )
        time.sleep(2)  # let the last requests finish and the workers go idle
        after = {"fds": fds(pids()), "redis_clients": redis_clients(redis_client)}
        restarts = server.restarts()
        stderr = server.stderr.read_text(errors="replace")
        statuses, versions, others, errors = log_tally(server.stdout)
        leaked = secrets_found(
            [server.stdout, server.stderr, workdir / "redis.log"],
            {
                "stress key": key,
                "admin key": admin_key,
                "Redis password": redis_password,
                "basic header": basic("stress", key)["Authorization"].split()[1],
                "admin header": admin["Authorization"].split()[1],
            },
        )
    return summarize(
        started_at, window, connections, windows, before, after, rolled, restarts, stderr, statuses, versions, others,
        errors, leaked, out, max_requests,
    )  # fmt: skip


def summarize(
    started_at, window, connections, windows, before, after, rolled, restarts, stderr, statuses, versions, others,
    errors, leaked, out, max_requests,
) -> dict:  # fmt: skip
    """The figures and the checks, printed and written as JSON."""
    total = sum(w["requests"] for w in windows)
    sent = Counter()
    for w in windows:
        sent.update({int(s): n for s, n in w["statuses"].items()})
    socket_errors = Counter()
    for w in windows:
        socket_errors.update(w["socket_errors"])
    logged = sum(statuses.values())
    # The request log (warm-up and rollout included) and wrk (its own requests) see the same answers: take the larger.
    # POST /feedback needs Redis: while a worker's breaker is open (Redis slower than CACHE_TIMEOUT_MS, as on 2
    # cores shared with a busy neighbour) it answers its documented 503 feedback_unavailable and predictions are
    # served uncached. Counted apart, and allowed only when the log shows the breaker opening.
    breaker_opened = any("cache down" in line for line in others)
    feedback_unavailable = statuses.get(("/feedback", 503), 0)
    excused = feedback_unavailable if breaker_opened else 0
    server_errors = (
        max(sum(n for (_, status), n in statuses.items() if status >= 500), sum(n for s, n in sent.items() if s >= 500))
        - excused
    )
    five = {f"{p} {s}": n for (p, s), n in statuses.items() if s >= 500}
    unexpected = {f"{p} {s}": n for (p, s), n in statuses.items() if s not in EXPECTED.get(p, set())}
    p99s = [w["p99_ms"] for w in windows]
    # Medians of half the windows each, so one burst at either end moves nothing. A rise while other processes took
    # QUIET cores or more (the median over the last half) is not judged Sibyl's: the check passes, marked
    # "judged": false, and its detail says why.
    first, last = statistics.median(p99s[:HALF]), statistics.median(p99s[-HALF:])
    busy = statistics.median(w["cores"]["others"] for w in windows[-HALF:])
    stable = last <= P99_RATIO * first
    short = window < MIN_JUDGED_WINDOW
    judged = (stable or busy < QUIET) and not short
    unjudged = ""  # why the p99 check is not judged, for its detail
    if short:
        unjudged = f"; not judged: {window:.0f} s windows (< {MIN_JUDGED_WINDOW:.0f} s)"
    elif not judged:
        unjudged = f"; not judged: other processes used {busy} cores meanwhile (>= {QUIET})"
    rss_first, rss_last = max(windows[0]["worker_rss_mib"]), max(windows[-1]["worker_rss_mib"])
    fd_before, fd_after = sum(before["fds"].values()), sum(after["fds"].values())
    processes = max(len(before["fds"]), len(after["fds"]))
    tracebacks = stderr.count("Traceback") + stderr.count("WORKER TIMEOUT")
    checks = [
        check(
            "no 5xx",
            server_errors == 0,
            f"{server_errors} answers with status >= 500"
            + (f" besides {excused} /feedback 503 while the cache breaker was open" if excused else "")
            + (f" (path status: count {five}; see error_lines and other_log_lines)" if five else ""),
        ),
        check("no failed request", sum(socket_errors.values()) == 0, f"wrk socket errors: {dict(socket_errors)}"),
        check("every status expected", not unexpected, f"unexpected (path status: count): {unexpected or 'none'}"),
        check(
            "every request logged",
            logged >= total,
            f"{logged} request lines for {total} requests answered to wrk (+ the warm-up and the rollout's)",
        ),
        check(
            "rollout",
            rolled.get("status") == 202 and "seconds" in rolled and versions.get("2", 0) > 0,
            f"POST /admin/reload {rolled.get('status')}, generation 2 after {rolled.get('seconds')} s, "
            f"{versions.get('2', 0)} answers from version 2",
        ),
        check(
            "p99 stable",
            stable or not judged,
            f"median p99 of the last {HALF} windows {last:.1f} ms, of the first {HALF} {first:.1f} ms "
            f"(limit {P99_RATIO}x); p99 per window: {p99s}" + unjudged,
            judged,
        ),
        check(
            "worker RSS bounded",
            rss_last <= RSS_GROWTH * rss_first,
            f"largest worker RSS {rss_first} MiB in the first window, {rss_last} MiB in the last "
            f"(<= {RSS_GROWTH}x); {restarts} workers recycled by max_requests",
        ),
        check(
            "no descriptor leak",
            fd_after <= fd_before + FD_SLACK * processes,
            f"master + workers held {fd_before} descriptors after the warm-up, {fd_after} at the end",
        ),
        check(
            "no Redis connection leak",
            after["redis_clients"] <= before["redis_clients"] + FD_SLACK,
            f"Redis clients {before['redis_clients']} after the warm-up, {after['redis_clients']} at the end",
        ),
        check("no worker crash", tracebacks == 0, f"{tracebacks} tracebacks or worker timeouts in gunicorn's log"),
        check("no secret in logs", not leaked, f"found: {leaked or 'none'}"),
    ]
    summary = {
        "started": started_at,
        "seconds": round(window * WINDOWS),
        "window_seconds": window,
        "connections": connections,
        "workers": 2,
        "max_requests": max_requests or "as shipped (gunicorn.conf.py)",
        "requests": total,
        "req_s": round(total / (window * WINDOWS), 1),
        "statuses": {str(s): n for s, n in sorted(sent.items())},
        "socket_errors": dict(socket_errors),
        "windows": windows,
        "p99_ms": {"first_half_median": first, "last_half_median": last, "judged": judged, "per_window": p99s},
        "worker_restarts": restarts,
        "rollout": rolled,
        "fds": {"after_warmup": before["fds"], "end": after["fds"]},
        "redis_clients": {"after_warmup": before["redis_clients"], "end": after["redis_clients"]},
        "logged_requests": logged,
        "other_log_lines": dict(others.most_common(20)),
        "error_lines": errors,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }
    print(
        f"\n{total} requests in {summary['seconds']} s ({summary['req_s']} req/s) at {connections} connections; "
        f"statuses {summary['statuses']}"
    )
    for c in checks:
        print(f"{('PASS' if c['judged'] else 'SKIP') if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"written to {out}")
    return summary


def main() -> None:
    """Command line: python -m bench.stress --seconds 600."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="length of the load (10 windows), default 600")
    parser.add_argument("--connections", type=int, default=48, help="wrk connections, default 48")
    parser.add_argument("--max-requests", type=int, help="gunicorn max_requests (default: as gunicorn.conf.py ships)")
    parser.add_argument("--out", type=Path, help="JSON summary (default: bench/results/stress.json)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not on PATH: `make stress` installs it (scripts/apt-need.sh wrk)")
    out = args.out or RESULTS / "stress.json"
    summary = run(args.seconds, args.connections, out, args.max_requests)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
