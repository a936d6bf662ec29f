"""Turn a bench run's numbers into ratios, target verdicts, table.md, chart.png and results.json."""

import json
from pathlib import Path

BASES = ("raw", "flask", "naive")
STEPS = ("cache_get", "predict", "cache_set")
BASE_LABELS = {
    "sibyl": "Sibyl",
    "sibyl-nocache": "Sibyl, cache off",
    "raw": "raw WSGI ceiling",
    "flask": "Flask ceiling",
    "naive": "naive app",
}


def _base(runs: list[dict], server: str, run: dict) -> dict | None:
    """The comparison server's run with the same rows and concurrency (and model, for the naive app).
    The cache-hit shape is compared with the 1-row runs: the others have no cache."""
    same = ("rows", "concurrency", "model") if server in ("naive", "sibyl-nocache") else ("rows", "concurrency")
    return next((r for r in runs if r["server"] == server and all(r[k] == run[k] for k in same)), None)


def compare(runs: list[dict]) -> None:
    """Add Sibyl's throughput ratios (cache on and off) to each comparison server measured in the same run."""
    for run in runs:
        if run["server"] in ("sibyl", "sibyl-nocache"):
            for server in BASES:
                base = _base(runs, server, run)
                run[f"x_{server}"] = round(run["req_s"] / base["req_s"], 2) if base and base["req_s"] else None


def _sibyl(
    runs: list[dict], model: str | None, shape: str, concurrency: int | None = None, server: str = "sibyl"
) -> list[dict]:
    """Sibyl's runs (or its cache-off twin's) for a model (None: both) and shape, at one concurrency or all but c=1."""
    return [
        r
        for r in runs
        if r["server"] == server
        and r["shape"] == shape
        and (model is None or r["model"] == model)
        and (r["concurrency"] == concurrency if concurrency else r["concurrency"] > 1)
    ]


def targets(results: dict) -> list[dict]:
    """Each target of the issue with its measured values and pass/fail (None when not measured)."""
    runs = results["runs"]
    found = []

    def listed(values: list[tuple[str, float]]) -> str | None:
        return ", ".join(f"{label} {v:.2f}×" for label, v in values if v is not None) or None

    def add(name: str, goal: str, values: list[tuple[str, float]], ok, off: list | None = None) -> None:
        values = [(label, v) for label, v in values if v is not None]
        found.append(
            {
                "target": name,
                "goal": goal,
                "measured": listed(values) or "not measured",
                "pass": all(ok(v) for _, v in values) if values else None,
                # The same ratio for Sibyl with CACHE_ENABLED=false: what the Redis tier costs on misses.
                "cache_off": listed(off or []),
            }
        )

    def ratio(model: str | None, shape: str, key: str, server: str = "sibyl") -> list[tuple[str, float]]:
        return [(f"{r['model']} c{r['concurrency']}", r.get(key)) for r in _sibyl(runs, model, shape, server=server)]

    at_least = lambda x: lambda v: v >= x  # noqa: E731 - a one-line predicate factory reads best inline
    for name, goal, model, shape, key, ok in (
        ("RF 1-row miss vs Flask ceiling", "≥ 0.6×", "RF", "1-row miss", "x_flask", at_least(0.6)),
        ("RF 1-row miss vs naive app", "~10× (≥ 10×)", "RF", "1-row miss", "x_naive", at_least(10)),
        ("LR 1-row miss vs Flask ceiling", "≥ 0.65×", "LR", "1-row miss", "x_flask", at_least(0.65)),
        ("1-row hit vs Flask ceiling", "≥ 0.7×", None, "1-row hit", "x_flask", at_least(0.7)),
        ("LR 100-row miss vs naive app", "≥ 2×", "LR", "100-row miss", "x_naive", at_least(2)),
    ):
        add(name, goal, ratio(model, shape, key), ok, ratio(model, shape, key, "sibyl-nocache"))

    c32 = [r for r in runs if r["server"] == "sibyl" and r["concurrency"] == 32]
    worst = max(c32, key=lambda r: r["p99_ms"] / r["p50_ms"], default=None)
    tail = (
        [(f"worst of {len(c32)}: {worst['model']} {worst['shape']}", worst["p99_ms"] / worst["p50_ms"])]
        if worst
        else []
    )
    add("Sibyl p99 / p50 at c=32", "≤ 3×", tail, lambda v: v <= 3)

    batch = []
    for model, ref in results["in_process"].items():
        c1 = _sibyl(runs, model, "1000-row miss", concurrency=1)
        batch += [(f"{model} ({c1[0]['p50_ms']:.1f} / {ref['ms']:.1f} ms)", c1[0]["p50_ms"] / ref["ms"])] if c1 else []
    add("1000-row: server p50 at c=1 / in-process", "≤ 2×", batch, lambda v: v <= 2)
    pss = [(model, m["ratio"]) for model, m in results["memory"].items()]
    add("Workers' total PSS / one worker's RSS", "< 1.3×", pss, lambda v: v < 1.3)
    return found


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table."""
    cell = lambda v: "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def cpu(run: dict) -> str | None:
    """CPU µs per request of the server's workers, Redis (nginx, when in front) and wrk, e.g. "603 / 45 / 92"."""
    c = run.get("cpu_us")
    return " / ".join(str(c[k]) for k in ("server", "redis", "nginx", "wrk") if k in c) if c else None


KEEPALIVE_BASE = "sync direct"


def keepalive_compare(runs: list[dict]) -> None:
    """Add each keep-alive route's req/s and total CPU per request over sync workers reached directly (same model,
    shape and concurrency)."""
    for run in runs:
        base = next(
            (
                r
                for r in runs
                if r["server"] == KEEPALIVE_BASE and all(r[k] == run[k] for k in ("model", "shape", "concurrency"))
            ),
            None,
        )
        run["cpu_us_total"] = sum(run["cpu_us"].values())
        ok = base and base["req_s"]
        run["x_sync_direct"] = round(run["req_s"] / base["req_s"], 2) if ok else None
        run["cpu_x_sync_direct"] = round(run["cpu_us_total"] / sum(base["cpu_us"].values()), 2) if ok else None


def keepalive_markdown(results: dict) -> list[str]:
    """The keep-alive client's table: four routes per model, shape and concurrency."""
    runs = results["keepalive"]
    rounds = lambda r: " / ".join(f"{x:.0f}" for x in r.get("rounds_req_s", ()))  # noqa: E731
    idle = lambda r: f"{r['rounds_idle_worker']} of {len(r['rounds_req_s'])}" if r.get("conns_per_worker") else None  # noqa: E731
    return [
        "**A keep-alive client** (wrk: HTTP/1.1, its connections kept open unless the server closes them) reaching "
        "Sibyl four ways: *sync direct*, gunicorn's sync workers, which answer `Connection: close`, so the client "
        "reconnects for every request; *nginx → sync*, the shipped deploy/nginx/nginx.conf in front of them (client "
        "connections kept, one short upstream connection per request); *gthread direct*, `WORKER_CLASS=gthread` "
        "(gunicorn.conf.py's one thread per worker), which keeps the client's connections; *nginx pool → gthread*, "
        "the shipped file plus an upstream `keepalive 32` pool (HTTP/1.1 upstream) in front of gthread workers. "
        "× = req/s over sync direct's; CPU × = all CPU per request (workers + Redis + nginx + wrk) over sync "
        "direct's; CPU µs/req = workers / Redis / nginx / wrk; client conns = client connections that carried the "
        "timed run's requests, from nginx's access log (c when keep-alive works); conns/worker = connections each "
        "gthread worker held 0.5 s in (the client's, or nginx's pooled ones): these runs are not redone when a "
        "worker got none, and *idle rounds* counts the rounds that left a worker without any:",
        "",
        *_table(
            [
                *("Model", "Scenario", "Conc.", "Route", "req/s", "Rounds req/s", "×", "p50 ms", "p99 ms"),
                *("Errors", "CPU µs/req", "CPU ×", "Client conns", "Conns/worker", "Idle rounds"),
            ],
            [
                [
                    *(r["model"], r["shape"], r["concurrency"], r["server"], r["req_s"], rounds(r)),
                    *(r["x_sync_direct"], r["p50_ms"], r["p99_ms"], r["errors"], cpu(r), r["cpu_x_sync_direct"]),
                    *(r.get("client_connections"), _split(r), idle(r)),
                ]
                for r in runs
            ],
        ),
    ]


def _split(run: dict) -> str | None:
    """Client connections per worker, e.g. "5/3"."""
    return "/".join(map(str, run["conns_per_worker"])) if run.get("conns_per_worker") else None


def markdown(results: dict) -> str:
    """The README's benchmark section: targets, Sibyl per scenario, comparison servers, memory, step timings, the
    keep-alive client (or, after `--only keepalive`, that alone)."""
    m, p = results["machine"], results["plan"]
    backends = ", ".join(f"{k} {v}" for k, v in results["backends"].items())
    out = [
        "<!-- written by `make bench` (bench/run.py); edit the generator, not this file -->",
        f"Measured {results['timestamp']} on {m['cpu']} ({m['cores']} cores), commit {m['commit']}: every server "
        f"under `gunicorn -c gunicorn.conf.py` with {m['cores']} workers, wrk ({p['threads']} thread) on the same "
        f"machine. Per scenario every server runs {p.get('rounds', 1)} times, {p['seconds']} s each after "
        f"{p['warmup']} s of warm-up, taking turns (each round starts with the next server), and keeps its "
        f"median run. Sibyl's backend: {backends}.",
        "",
    ]
    if "runs" in results:
        out += main_sections(results)
    if results.get("keepalive"):
        out += keepalive_markdown(results)
    return "\n".join(out).rstrip("\n") + "\n"


def main_sections(results: dict) -> list[str]:
    """Targets, Sibyl per scenario, comparison servers, memory, in-process and recording costs, step timings."""
    p, runs = results["plan"], results["runs"]
    verdict = {True: "pass", False: "**FAIL**", None: "not run"}
    perf = ["req/s", "Rounds req/s", "p50 ms", "p99 ms", "Errors", "Conns/worker", "CPU µs/req"]
    rounds = lambda r: " / ".join(f"{x:.0f}" for x in r.get("rounds_req_s", ()))  # noqa: E731
    row = lambda r: [r["req_s"], rounds(r), r["p50_ms"], r["p99_ms"], r["errors"], _split(r), cpu(r)]  # noqa: E731
    return [
        "**Targets** (ratios compare median req/s at the same rows per request and concurrency):",
        "",
        *_table(
            ["Target", "Goal", "Measured", "Result", "Cache off, for comparison"],
            [
                [t["target"], t["goal"], t["measured"], verdict[t["pass"]], t.get("cache_off")]
                for t in results["targets"]
            ],
        ),
        "",
        "**Sibyl** (× = Sibyl's req/s over the other server's; errors = HTTP ≥ 400 + socket errors; conns/worker = "
        "client connections each worker held 0.5 s in: gthread workers keep the connections they accept, and a run "
        "that left a worker without any is redone; CPU µs/req = CPU time per request of the server's workers / "
        "Redis / wrk, from /proc: together the machine's cost of a request; X-Cache = outcomes in the request log, "
        "OFF = Redis overran CACHE_TIMEOUT_MS and the circuit breaker served uncached):",
        "",
        *_table(
            ["Model", "Scenario", "Conc.", *perf, "X-Cache", "× raw WSGI", "× Flask", "× naive"],
            [
                [
                    r["model"],
                    r["shape"],
                    r["concurrency"],
                    *row(r),
                    counts(r["cache"]),
                    *(r.get(f"x_{b}") for b in BASES),
                ]
                for r in runs
                if r["server"] == "sibyl"
            ],
        ),
        "",
        "**Comparison servers** (same gunicorn settings, same request bodies; wrk cores = CPU the load generator "
        "used, near 1.0 means the client, not the server, was the limit):",
        "",
        *_table(
            ["Server", "Model", "Rows", "Conc.", *perf, "wrk cores"],
            [
                [BASE_LABELS[r["server"]], r["model"], r["rows"], r["concurrency"], *row(r), r["wrk_cores"]]
                for r in runs
                if r["server"] != "sibyl"
            ],
        ),
        "",
        "**Memory** after load (MiB, from /proc/PID/smaps_rollup):",
        "",
        *_table(
            ["Model", "Workers", "Total worker PSS", "One worker RSS", "One worker PSS", "PSS total / RSS"],
            [
                [k, len(v["workers"]), v["total_pss_mib"], v["one_rss_mib"], v["one_pss_mib"], v["ratio"]]
                for k, v in results["memory"].items()
            ],
        ),
        "",
        "**1000-row batch in-process** (same Python, no server: orjson parse + numpy + predict, median ms):",
        "",
        *_table(
            ["Model", "Sibyl backend", "In-process ms", "Same with scikit-learn's predict, ms"],
            [[k, v["backend"], v["ms"], v["sklearn_ms"]] for k, v in results["in_process"].items()],
        ),
        "",
        "**Recording one request's metrics** (in process, prometheus_client's multiprocess mode as under gunicorn; "
        "median µs per call; drift costs next to nothing here: these models carry no reference statistics):",
        "",
        *_table(
            ["Model", "Request counter + latency", "Rows, cache outcome, predict time", "Drift, 1 row"],
            [
                [k, v["request_us"], v["prediction_us"], v["drift_1_row_us"]]
                for k, v in results.get("recording", {}).items()
            ],
        ),
        "",
        f"**Where the time goes** (Sibyl with LOG_LEVEL=DEBUG, c={p['debug_concurrency']}, {p['debug_seconds']} s "
        "per shape; mean ms per request from the request log. *Rest of app*: auth, parsing, validation, "
        "serialization. *Outside app*: workers ÷ req/s − app time, i.e. gunicorn, WSGI, the log line, and CPU "
        "taken by wrk and Redis):",
        "",
        *_table(
            ["Model", "Scenario", "Cache outcomes", "App total", *STEPS, "Rest of app", "Outside app"],
            [
                [
                    k,
                    shape,
                    counts(s["cache"]),
                    s["duration_ms"],
                    *(s.get(x) for x in STEPS),
                    s["rest_ms"],
                    s["outside_ms"],
                ]
                for k, per in results["steps"].items()
                for shape, s in per.items()
            ],
        ),
        "",
    ]


def counts(outcomes: dict) -> str:
    """{"MISS": 3} -> "MISS 3"."""
    return ", ".join(f"{k} {n}" for k, n in outcomes.items())


def chart(results: dict, path: Path) -> None:
    """Throughput and p99 per Sibyl scenario, side by side with the ceilings and the naive app (log scales)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sib = [r for r in runs if r["server"] == "sibyl" and r["concurrency"] > 1]
    labels = [f"{r['model']} {r['shape']}, c={r['concurrency']}" for r in sib]
    series = {"sibyl": sib} | {b: [_base(runs, b, r) for r in sib] for b in ("sibyl-nocache", *BASES)}
    colors = {"sibyl": "#1f77b4", "sibyl-nocache": "#aec7e8", "raw": "#7f7f7f", "flask": "#bcbd22", "naive": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(16, 2 + 0.55 * len(sib)), sharey=True)
    height = 0.8 / len(series)
    for ax, key, title in zip(
        axes, ("req_s", "p99_ms"), ("Throughput (req/s, higher is better)", "p99 latency (ms, lower is better)")
    ):
        for i, (name, rows) in enumerate(series.items()):
            ys = [j + (i - (len(series) - 1) / 2) * height for j in range(len(sib))]
            ax.barh(ys, [r[key] if r else 0 for r in rows], height, label=BASE_LABELS[name], color=colors[name])
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(sib)), labels)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle(f"Sibyl vs ceilings and the naive app ({results['machine']['cores']} cores, {results['timestamp']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the path ends in .tmp until renamed
    plt.close(fig)


def write(results: dict, folder: Path) -> str:
    """Compute ratios and targets, then write results.json, table.md and chart.png (the chart only when the main
    scenarios ran); return the table."""
    if "runs" in results:
        compare(results["runs"])
        results["targets"] = targets(results)
    keepalive_compare(results.get("keepalive", []))
    folder.mkdir(exist_ok=True)
    table = markdown(results)
    files = [
        ("results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n")),
        ("table.md", lambda p: p.write_text(table)),
    ]
    if "runs" in results:
        files.append(("chart.png", lambda p: chart(results, p)))
    # Written beside and renamed over, so an interrupted run never leaves half a file (*.tmp is git-ignored).
    for name, write_to in files:
        tmp = folder / f"{name}.tmp"
        write_to(tmp)
        tmp.replace(folder / name)
    return table
