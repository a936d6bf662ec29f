"""What a timed run measures: wrk's throughput and latency, and the servers' CPU and memory from /proc."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.servers import HarnessError, die_with_parent, proc_stat, stop_all

LUA = Path(__file__).with_name("predict.lua")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far, from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # a worker may have been recycled
            fields = proc_stat(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory(pids: list[int]) -> list[dict]:
    """RSS and PSS in MiB of each process still running, from /proc/PID/smaps_rollup."""
    out = []
    for pid in pids:
        fields = {}
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker recycled (max_requests, a rollout) between the listing and the read
        for line in rollup.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                fields[key.lower() + "_mib"] = round(int(rest.split()[0]) / 1024, 1)
        out.append({"pid": pid, **fields})
    return out


def wrk(
    url: str,
    c: int,
    seconds: int,
    threads: int,
    script_args: list[str],
    auth: str | None,
    split=None,
    idle_ok=True,
    path: str = "/predict",
):
    """One bounded wrk run with predict.lua, posting to url + path (with basic auth unless auth is None): req/s,
    p50/p99/mean ms, errors and wrk's own CPU use.

    With split (a callable giving connections per worker), look shortly after the start and, unless
    idle_ok, give up (returning None) when a worker got no connection: gthread workers accept greedily
    and keep their keep-alive connections, so such a run would measure one worker while the others idle."""
    args = ["wrk", "-t", str(min(threads, c)), "-c", str(c), "-d", f"{seconds}s"]
    # A 1000-row forest batch at 32 connections queues for a while; that is latency, not a timeout.
    args += ["--timeout", "10s", "-s", str(LUA), *(["-H", f"Authorization: {auth}"] if auth else []), url + path]
    args += ["--", *script_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    try:
        conns = None
        if split:
            time.sleep(min(0.5, seconds / 4))
            conns = split()
            if min(conns, default=0) == 0 and not idle_ok:
                return None
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise HarnessError(f"wrk failed (exit {proc.returncode}): {err.strip() or out[-1500:]}")
    r = json.loads(line[6:])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    kinds = ("connect", "read", "write", "status", "timeout")
    return {
        "req_s": round(r["requests"] / (r["duration_us"] / 1e6), 1),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "mean_ms": round(r["mean_us"] / 1000, 3),
        "requests": r["requests"],
        "errors": sum(r[k] for k in kinds),
        "error_detail": {k: r[k] for k in kinds if r[k]},
        # Cores the load generator itself used: on a small box it competes with the server.
        "wrk_cores": round(cpu / (r["duration_us"] / 1e6), 2),
        "conns_per_worker": conns,
    }


def harnessed(label: str, work: Callable[[Path], dict]) -> dict | int:
    """work(a fresh temporary folder)'s results, every process it started stopped on any exit (Ctrl-C and SIGTERM
    included); after a harness error or an interrupt, said on stderr, the exit status instead (1, 130)."""
    # SIGTERM becomes SystemExit so the `finally` below runs, as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix=f"sibyl-{label}-") as tmp:
            try:
                return work(Path(tmp))
            finally:
                stop_all()
    except HarnessError as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{label}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
