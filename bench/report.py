"""Turn a bench run's numbers into ratios, target verdicts, table.md, chart.png and results.json."""

import json
from pathlib import Path
from typing import NamedTuple

BASES = ("raw", "flask", "flask-redis", "naive")
# Sibyl as shipped with each cache policy: on (the default), off (CACHE_ENABLED=false), auto (CACHE_POLICY=auto).
SIBYL = ("sibyl", "sibyl-nocache", "sibyl-auto")
STEPS = ("cache_get", "predict", "cache_set")
BASE_LABELS = {
    "sibyl": "Sibyl",
    "sibyl-nocache": "Sibyl, cache off",
    "sibyl-auto": "Sibyl, cache auto",
    "raw": "raw WSGI ceiling",
    "flask": "Flask ceiling",
    "flask-redis": "Flask + per-row Redis ceiling",
    "naive": "naive app",
}
VERDICT = {True: "pass", False: "**FAIL**", None: "not run"}
# bench/recording.py's figures: (key, label in the bench's output, column in table.md).
FEATURES = (
    ("auth_us", "auth", "Auth (basic, valid key)"),
    ("rate_limit_us", "rate limit", "Rate limit (counted here, sent to Redis each 100 ms)"),
    ("request_us", "metrics: request", "Metrics: request counter + latency"),
    ("prediction_us", "metrics: prediction", "Metrics: rows, cache outcome, predict time"),
    ("drift_1_row_us", "drift (1 row)", "Drift, 1 row"),
    ("log_line_us", "log line", "Request log: id, headers, JSON line"),
)
# "Within noise": how far below a server that costs the same one may measure and still pass (on a shared 2-core
# machine, a server's median of interleaved rounds moves by several percent from one bench run to the next).
NOISE = 0.07


def ratio_key(server: str) -> str:
    """The run field holding a Sibyl run's req/s over a server's: "flask-redis" -> "x_flask_redis"."""
    return "x_" + server.replace("-", "_")


def _base(runs: list[dict], server: str, run: dict) -> dict | None:
    """The comparison server's run with the same rows and concurrency (and model, for the naive app and every Sibyl;
    and shape, between the Sibyls with a cache). A cache-hit run is compared with the 1-row runs of servers that have
    no cache."""
    same = ("rows", "concurrency")
    if server == "naive" or server in SIBYL:
        same += ("model",)
    if server in SIBYL and server != "sibyl-nocache":
        same += ("shape",)
    return next((r for r in runs if r["server"] == server and all(r[k] == run[k] for k in same)), None)


def compare(runs: list[dict]) -> None:
    """Add each Sibyl run's throughput ratios to every comparison server and other Sibyl measured in the same run."""
    for run in runs:
        if run["server"] in SIBYL:
            for server in (*BASES, *SIBYL):
                if server != run["server"]:
                    base = _base(runs, server, run)
                    ok = base and base["req_s"] and run["concurrency"] > 1
                    run[ratio_key(server)] = round(run["req_s"] / base["req_s"], 2) if ok else None


def _sibyl(
    runs: list[dict], model: str | None, shape: str, concurrency: int | None = None, server: str = "sibyl"
) -> list[dict]:
    """A Sibyl server's runs for a model (None: all) and shape, at one concurrency or all but c=1."""
    return [
        r
        for r in runs
        if r["server"] == server
        and r["shape"] == shape
        and (model is None or r["model"] == model)
        and (r["concurrency"] == concurrency if concurrency else r["concurrency"] > 1)
    ]


def _ceiling_x_naive(runs: list[dict], run: dict) -> float | None:
    """The Flask + per-row Redis ceiling's req/s over the naive app's, in a Sibyl miss run's cell (None for a hit)."""
    if run["shape"].endswith("hit"):
        return None
    ceiling, naive = _base(runs, "flask-redis", run), _base(runs, "naive", run)
    return round(ceiling["req_s"] / naive["req_s"], 2) if ceiling and naive and naive["req_s"] else None


def _label(run: dict) -> str:
    """E.g. "RF 1-row miss c8"."""
    return f"{run['model']} {run['shape']} c{run['concurrency']}"


def auto_reason(cache: dict) -> str:
    """Why CACHE_POLICY=auto chose its tiers, from GET /models's figures."""
    row, trip = cache.get("row_us"), cache.get("redis_round_trip_us")
    if row is None or trip is None:
        return "Redis round trip or row cost not measured"
    return f"one row {row:g} µs, a Redis round trip {trip:g} µs"


class Bound(NamedTuple):
    """A target's limit: values must be at least it (floor) or at most it; strict leaves the limit itself out."""

    limit: float
    floor: bool
    strict: bool = False

    def met(self, value: float) -> bool:
        """Whether a measured value meets the target."""
        margin = self.margin(value)
        return margin > 0 if self.strict else margin >= 0

    def margin(self, value: float) -> float:
        """How far on the right side of the limit a value is (negative: the wrong side)."""
        return value - self.limit if self.floor else self.limit - value


def at_least(x: float) -> Bound:
    """Values must be >= x."""
    return Bound(x, floor=True)


def at_most(x: float, strict: bool = False) -> Bound:
    """Values must be <= x (< x, if strict)."""
    return Bound(x, floor=False, strict=strict)


def targets(results: dict) -> list[dict]:
    """Each target of issue 15 with its measured values and pass/fail (None when not measured)."""
    runs = results["runs"]
    found = []

    def listed(values: list[tuple[str, float]], unit: str) -> str | None:
        return ", ".join(f"{label} {v:.2f}{unit}" for label, v in values) or None

    def add(
        name: str,
        goal: str,
        values: list,
        bound: Bound,
        off: list | None = None,
        unit: str = "×",
        many: bool = False,
        note: str | None = None,
    ) -> None:
        """One target's row; many: list only the values that fail, or the closest to failing when none does; note:
        said after the values."""
        values = [(label, v) for label, v in values if v is not None]
        failed = [(label, v) for label, v in values if not bound.met(v)]
        measured = listed(values, unit)
        if many and values:
            worst = failed or [min(values, key=lambda lv: bound.margin(lv[1]))]
            head = f"{len(failed)} of {len(values)} fail: " if failed else f"all {len(values)} pass; closest: "
            measured = head + listed(worst, unit)
        measured = measured or "not measured"
        found.append(
            {
                "target": name,
                "goal": goal,
                "measured": f"{measured}; {note}" if note else measured,
                "pass": not failed if values else None,
                # A figure for Sibyl with CACHE_ENABLED=false, where it shows what the cache costs or saves.
                "cache_off": listed([(label, v) for label, v in off or [] if v is not None], unit),
            }
        )

    def ratio(model: str | None, shape: str, server: str, of: str) -> list[tuple[str, float]]:
        return [(_label(r), r.get(ratio_key(of))) for r in _sibyl(runs, model, shape, server=server)]

    misses = sorted({r["shape"] for r in runs if r["shape"].endswith("miss")}, key=lambda s: int(s.split("-")[0]))
    for server in SIBYL:
        mine = [r for r in runs if r["server"] == server]
        everything = [(_label(r), r.get("x_naive")) for r in mine]
        # Where a cache-on miss falls short, its bound: the per-row Redis ceiling's own ratio in that cell (cache off
        # and local tiers ask Redis nothing, so it bounds nothing there).
        short = [r for r in mine if server == "sibyl" and r.get("x_naive") is not None and r["x_naive"] < 1]
        bounds = listed([(_label(r), x) for r in short if (x := _ceiling_x_naive(runs, r))], "×")
        note = f"the Flask + per-row Redis ceiling there: {bounds}" if bounds else None
        name = f"{BASE_LABELS[server]} vs naive app, every scenario"
        add(name, "≥ 1.0× each", everything, at_least(1), many=True, note=note)

    flask_redis = ratio(None, "1-row miss", "sibyl", "flask-redis")
    off = ratio(None, "1-row miss", "sibyl-nocache", "flask-redis")
    add("Cache on, 1-row miss vs Flask + Redis ceiling", "≥ 0.85×", flask_redis, at_least(0.85), off)

    spent = lambda r: r["cpu_us"]["server"] + r["cpu_us"]["redis"]  # noqa: E731 - the CPU a cache can add to
    for shape in misses[1:]:  # the batches
        per_row = []
        for on in _sibyl(runs, None, shape):
            nocache = _base(runs, "sibyl-nocache", on)
            if nocache:
                per_row.append((_label(on), (spent(on) - spent(nocache)) / on["rows"]))
        add(
            f"Cache CPU per row, {shape} (workers + Redis, cache on − off)",
            "≤ 5 µs",
            per_row,
            at_most(5),
            unit=" µs",
        )

    # auto stands for cache off where it keeps Redis out (local tiers), for cache on where it keeps Redis.
    auto_misses = []
    for model, cache in results.get("auto", {}).items():
        like = "sibyl-nocache" if cache["tiers"] == "local" else "sibyl"
        for shape in misses:
            auto_misses += [
                (f"{_label(r)} vs {'off' if like == 'sibyl-nocache' else 'on'}", r.get(ratio_key(like)))
                for r in _sibyl(runs, model, shape, server="sibyl-auto")
            ]
    add(
        "Cache auto, misses vs the policy it chose (off: tiers local; on: tiers redis)",
        f"≥ {1 - NOISE:.2f}× each (within {NOISE:.0%} noise)",
        auto_misses,
        at_least(1 - NOISE),
        many=True,
    )
    auto_hits = ratio(None, "1-row hit", "sibyl-auto", "sibyl")
    add(
        "Cache auto, 1-row hit vs cache on",
        f"≥ {1 - NOISE:.2f}× (within {NOISE:.0%} noise)",
        auto_hits,
        at_least(1 - NOISE),
    )

    hits = ratio(None, "1-row hit", "sibyl", "raw")
    add(
        "Cache on, 1-row hit vs raw WSGI ceiling",
        "≥ 0.6×",
        hits,
        at_least(0.6),
        ratio(None, "1-row miss", "sibyl-nocache", "raw"),
    )

    c32 = [r for r in runs if r["server"] in SIBYL and r["concurrency"] == 32]
    worst = max(c32, key=lambda r: r["p99_ms"] / r["p50_ms"], default=None)
    tail = (
        [(f"worst of {len(c32)}: {BASE_LABELS[worst['server']]} {_label(worst)}", worst["p99_ms"] / worst["p50_ms"])]
        if worst
        else []
    )
    add("p99 / p50 at c=32, every Sibyl", "≤ 3×", tail, at_most(3))

    batch = []
    for model, ref in results["in_process"].items():
        c1 = _sibyl(runs, model, "1000-row miss", concurrency=1)
        for run in c1:
            # At c=1 Redis's CPU per request runs in series with the request: part of the p50, whatever the worker does.
            redis_ms = run["cpu_us"]["redis"] / 1000
            label = f"{model} ({run['p50_ms']:.1f} / {ref['ms']:.1f} ms; Redis's CPU {redis_ms:.1f} ms)"
            batch.append((label, run["p50_ms"] / ref["ms"]))
    add("1000-row: server p50 at c=1 / in-process", "≤ 2×", batch, at_most(2))
    pss = [(model, m["ratio"]) for model, m in results["memory"].items()]
    add("Workers' total PSS / one worker's RSS", "< 1.3×", pss, at_most(1.3, strict=True))
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
        f"median run. Sibyl's backend: {backends}. Machine speed: 10^7 Python additions in "
        f"{m.get('python_loop_s', '?')} s (µs figures scale with it).",
        "",
    ]
    if "runs" in results:
        out += main_sections(results)
    if results.get("keepalive"):
        out += keepalive_markdown(results)
    return "\n".join(out).rstrip("\n") + "\n"


def summary(runs: list[dict], concurrency: int = 8) -> list[str]:
    """Median req/s per model and rows at one concurrency, every server side by side (the issue's table)."""
    columns = [
        ("raw", "miss", "raw WSGI"),
        ("flask-redis", "miss", "Flask + Redis MGET/MSET per row"),
        ("naive", "miss", "tutorial Flask app"),
        ("sibyl", "hit", "Sibyl hit"),
        ("sibyl", "miss", "Sibyl miss"),
        ("sibyl-auto", "miss", "Sibyl auto, miss"),
        ("sibyl-nocache", "miss", "Sibyl cache off"),
    ]

    def cell(server: str, kind: str, model: str, rows: int) -> str:
        shape = f"{rows}-row {kind}"
        found = [
            r
            for r in runs
            if r["server"] == server
            and r["shape"] == shape
            and r["concurrency"] == concurrency
            and (server in ("raw", "flask-redis") or r["model"] == model)
        ]
        return f"{found[0]['req_s']:,.0f}" if found else "–"

    rows = sorted({(r["model"], r["rows"]) for r in runs if r["server"] == "sibyl" and r["concurrency"] == concurrency})
    return [
        f"**Summary** (median req/s at c={concurrency}; a hit repeats one warmed row, a miss sends new rows):",
        "",
        *_table(
            ["req/s", *(label for _, _, label in columns)],
            [
                [
                    f"{model} {n} row{'s' if n > 1 else ''}",
                    *(cell(server, kind, model, n) for server, kind, _ in columns),
                ]
                for model, n in rows
            ],
        ),
        "",
    ]


def main_sections(results: dict) -> list[str]:
    """Summary, targets, Sibyl per scenario, comparison servers, memory, in-process and recording costs, step
    timings."""
    p, runs = results["plan"], results["runs"]
    perf = ["req/s", "Rounds req/s", "p50 ms", "p99 ms", "Errors", "Conns/worker", "CPU µs/req"]
    rounds = lambda r: " / ".join(f"{x:.0f}" for x in r.get("rounds_req_s", ()))  # noqa: E731
    row = lambda r: [r["req_s"], rounds(r), r["p50_ms"], r["p99_ms"], r["errors"], _split(r), cpu(r)]  # noqa: E731
    return [
        *summary(runs),
        "**Targets** (ratios compare median req/s at the same rows per request and concurrency):",
        "",
        *_table(
            ["Target", "Goal", "Measured", "Result", "Cache off, for comparison"],
            [
                [t["target"], t["goal"], t["measured"], VERDICT[t["pass"]], t.get("cache_off")]
                for t in results["targets"]
            ],
        ),
        "",
        *_auto_note(results),
        "**Sibyl**, as shipped (metrics, drift, the request log and the rate limiter on) with each cache policy "
        "(× = this Sibyl's req/s over the other server's; errors = HTTP ≥ 400 + socket errors; conns/worker = "
        "client connections each worker held 0.5 s in: gthread workers keep the connections they accept, and a run "
        "that left a worker without any is redone; CPU µs/req = CPU time per request of the server's workers / "
        "Redis / wrk, from /proc: together the machine's cost of a request; X-Cache = outcomes in the request log, "
        "OFF = uncached: with cache on, Redis overran CACHE_TIMEOUT_MS and the circuit breaker opened; with auto on "
        "local tiers, a batch over 8 rows, or a request the worker tier's sampling passed over while it missed):",
        "",
        *_table(
            ["Model", "Scenario", "Conc.", "Cache", *perf, "X-Cache", *(f"× {BASE_LABELS[b]}" for b in RATIOS)],
            [
                [
                    r["model"],
                    r["shape"],
                    r["concurrency"],
                    POLICIES[r["server"]],
                    *row(r),
                    counts(r["cache"]),
                    *(r.get(ratio_key(b)) for b in RATIOS),
                ]
                for r in sorted((r for r in runs if r["server"] in SIBYL), key=lambda r: _order(runs, r))
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
                if r["server"] not in SIBYL
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
        "**Cost of each feature per request (µs)**: median µs per call of the functions a 1-row predict calls, in "
        "process with the servers' settings (bench/recording.py), as POST /predict makes them (app/direct.py): auth = "
        "parsing the basic-auth header and checking the key's digest for a valid key (the limiter is the next "
        "column); rate limit = `Limits.count` for the user, counting in the bench's Redis; metrics in "
        "prometheus_client's multiprocess mode as under gunicorn; drift against the models' reference statistics; "
        "request log = the request id, the Server-Timing value and one JSON line, with stdout a pipe another process "
        "drains:",
        "",
        *_table(
            ["Model", *(column for _, _, column in FEATURES), "Total", "Log lines dropped"],
            [
                [
                    k,
                    *(v.get(key) for key, _, _ in FEATURES),
                    round(sum(v.get(key) or 0 for key, _, _ in FEATURES), 2),
                    v.get("log_lines_dropped"),
                ]
                for k, v in results.get("recording", {}).items()
            ],
        ),
        "",
        f"**Where the time goes** (Sibyl with LOG_LEVEL=DEBUG, c={p['debug_concurrency']}, {p['debug_seconds']} s "
        "per shape; mean ms per request from the request log. *Rest of app*: auth and the rate limit, parsing, "
        "validation, drift, metrics, serialization. *Outside app*: workers ÷ req/s − app time, i.e. gunicorn, WSGI, "
        "the log line, and CPU taken by wrk and Redis):",
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


# The Sibyl table's ratio columns: the comparison servers, then Sibyl with the cache off.
RATIOS = (*BASES, "sibyl-nocache")
POLICIES = {"sibyl": "on", "sibyl-nocache": "off", "sibyl-auto": "auto"}


def _order(runs: list[dict], run: dict) -> tuple:
    """Sibyl's runs in measuring order (scenario, concurrency), each scenario's policies together."""
    scenario = next(
        i for i, r in enumerate(runs) if r["shape"] == run["shape"] and r["concurrency"] == run["concurrency"]
    )
    model = next(i for i, r in enumerate(runs) if r["model"] == run["model"])
    return scenario, model, SIBYL.index(run["server"])


def _auto_note(results: dict) -> list[str]:
    """What CACHE_POLICY=auto chose per model, and why."""
    chosen = [f"{k}: tiers {v['tiers']} ({auto_reason(v)})" for k, v in results.get("auto", {}).items()]
    return [f"**Cache auto** (CACHE_POLICY=auto, GET /models): {'; '.join(chosen)}.", ""] if chosen else []


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
    series = {"sibyl": sib} | {b: [_base(runs, b, r) for r in sib] for b in (*SIBYL[1:], *BASES)}
    colors = {
        "sibyl": "#1f77b4",
        "sibyl-nocache": "#aec7e8",
        "sibyl-auto": "#17becf",
        "raw": "#7f7f7f",
        "flask": "#bcbd22",
        "flask-redis": "#ff7f0e",
        "naive": "#d62728",
    }
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
