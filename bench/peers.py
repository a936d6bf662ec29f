"""`make bench-peers`: Sibyl side by side with MLflow's scoring server, MLServer and BentoML (each in its own virtualenv
under bench/.peers/) and the tutorial app, on make bench's two models: 1-row and 100-row requests of new rows at c=8."""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import requests

from bench import measure
from bench.measure import cpu_seconds
from bench.run import (
    FEATURES,
    RESULTS,
    SPLIT_TRIES,
    Bench,
    Plan,
    check_sibyl,
    machine,
    make_models,
    median_run,
    rotated,
)
from tests.support.servers import (
    ROOT,
    Gunicorn,
    HarnessError,
    descendants,
    free_port,
    serving,
    spawn,
    stop,
)

HERE = Path(__file__).parent
PEERS_HOME = HERE / ".peers"
CONCURRENCY = 8
ROWS = (1, 100)
# The peers get the project's own scikit-learn, numpy and joblib: each then unpickles the very joblib Sibyl serves
# (bench/models.py retrains the same recipe in a venv that cannot).
SHARED = ("scikit-learn", "numpy", "joblib")


@dataclass(frozen=True)
class Peer:
    """A peer inference server: what its virtualenv holds, and the body shape predict.lua sends it."""

    name: str
    label: str
    pins: tuple[str, ...]
    shape: str
    # Processes that accept connections: with more than one, a run whose keep-alive connections all landed on one
    # of them measures half the server, and is redone (as bench.run does for gthread workers).
    accepting: int


PEERS = (
    # 3.17.2, not 3.18.0: mlflow 3.18.0 needs mlflow-tracing==3.18.0, which the package index here does not have.
    # `mlflow models serve -w 2` runs uvicorn with two worker processes.
    Peer("mlflow", "MLflow 3.17.2", ("mlflow==3.17.2",), "inputs", 2),
    # One HTTP process; parallel_workers: 2 runs inference in a pool of two processes behind it. uvloop 0.22 makes
    # MLServer 1.7.1's inference workers die at start ("There is no current event loop", SeldonIO/MLServer#2286, fix
    # unreleased): pinned to the last release before it.
    Peer("mlserver", "MLServer 1.7.1", ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"), "v2", 1),
    # @bentoml.service(workers=2): two processes, each an HTTP server on the shared socket.
    Peer("bentoml", "BentoML 1.4.40", ("bentoml==1.4.40",), "features", 2),
)
# Sibyl as make bench ships it, with each cache policy (misses only: every request sends new rows), and the
# tutorial app as the reference.
SIBYL = {
    "sibyl-nocache": ("Sibyl, cache off", {"CACHE_ENABLED": "false"}),
    "sibyl": ("Sibyl, cache on (miss)", {}),
    "sibyl-auto": ("Sibyl, cache auto (miss)", {"CACHE_POLICY": "auto"}),
}
LABELS = {name: label for name, (label, _) in SIBYL.items()} | {"naive": "tutorial app"}
LABELS |= {peer.name: peer.label for peer in PEERS}


@dataclass
class Target:
    """One running server as wrk drives it."""

    name: str
    url: str  # the endpoint wrk posts to
    shape: str  # predict.lua's body shape
    proc: subprocess.Popen
    port: int
    auth: str | None = None
    accepting: int = 1


def requirements(peer: Peer) -> list[str]:
    """The peer's pins plus the project's own pins of SHARED (read from requirements.txt)."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.lower() in SHARED:
            pins[name.lower()] = f"{name}=={version}"
    if len(pins) != len(SHARED):
        raise HarnessError(f"requirements.txt pins {sorted(pins)}, not all of {SHARED}")
    return [*peer.pins, *(pins[name] for name in SHARED)]


def venv_bin(peer: Peer) -> Path:
    """The peer's virtualenv's bin folder."""
    return PEERS_HOME / peer.name / "venv" / "bin"


def install(peer: Peer) -> dict:
    """The peer's own virtualenv under bench/.peers/<peer>/, installed unless its stamp file already lists these exact
    pins (so a second run installs nothing); returns the pins and the seconds the install took."""
    home, wanted = PEERS_HOME / peer.name, requirements(peer)
    stamp, python = home / "installed.txt", venv_bin(peer) / "python"
    if python.exists() and stamp.exists() and stamp.read_text().split() == wanted:
        return {"pins": wanted, "install_seconds": 0}
    print(f"bench-peers: installing {' '.join(wanted)} into {python.parent.parent.relative_to(ROOT)}/ ...", flush=True)
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)  # an interrupted install must not pass for a finished one
    home.mkdir(parents=True, exist_ok=True)
    log = home / "install.log"
    # Never the project's .venv: the peers' dependencies (pandas, FastAPI, pydantic...) conflict with its pins.
    _logged(["python3", "-m", "venv", str(home / "venv")], log, 300)
    _logged([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted], log, 1800)
    stamp.write_text("".join(f"{pin}\n" for pin in wanted))
    seconds = round(time.monotonic() - t0)
    print(f"bench-peers: {peer.name} installed in {seconds} s", flush=True)
    return {"pins": wanted, "install_seconds": seconds}


def _logged(args: list[str], log: Path, timeout: int) -> None:
    """Run a command with its output appended to log; HarnessError with the log's end if it fails."""
    with open(log, "ab") as out:
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if proc.returncode:
        # pip prints a warning per package for this machine's missing local indexes; they hide the real error.
        lines = [x for x in log.read_text(errors="replace").splitlines() if "is ignored: it is neither" not in x]
        raise HarnessError(f"{' '.join(args[:4])} ... failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))


def versions(peer: Peer) -> dict[str, str]:
    """Versions of the packages that matter in the peer's venv, as installed (dependencies are resolved by pip)."""
    names = [pin.partition("==")[0].lower() for pin in requirements(peer)]
    names += ["uvicorn", "fastapi", "pandas", "pydantic"]
    code = "import importlib.metadata as m, json\n"
    code += "print(json.dumps({d.name.lower(): d.version for d in m.distributions()}))"
    out = subprocess.run([str(venv_bin(peer) / "python"), "-c", code], capture_output=True, text=True)
    found = json.loads(out.stdout) if out.returncode == 0 else {}
    return {name: found[name] for name in names if name in found}


def peer_env(peer: Peer, workdir: Path) -> dict:
    """Environment for the peer's commands: its venv first on PATH (mlflow starts `uvicorn` by name), and no usage
    reports to its vendor (MLflow 3 and BentoML send some by default): the bench's traffic stays on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"PATH": f"{venv_bin(peer)}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv_bin(peer).parent)}
    env |= {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true"}
    return env | {"BENTOML_HOME": str(workdir / "bentoml-home")}


def lay_out(peer: Peer, name: str, model: dict, workdir: Path) -> dict:
    """The model as the peer serves it, made by bench/models.py in the peer's venv: the bench's joblib (or the same
    recipe trained there); returns how, the labels the check expects, and the folder."""
    out = workdir / f"{peer.name}-{name.lower()}"
    args = [str(venv_bin(peer) / "python"), "-I", str(HERE / "models.py"), name, str(model["path"]), str(out)]
    args += ["--mlflow"] if peer.name == "mlflow" else []
    workdir.joinpath("cwd").mkdir(exist_ok=True)
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env=peer_env(peer, workdir), cwd=workdir / "cwd"
    )
    if proc.returncode:
        raise HarnessError(f"{peer.name}: laying out {name} failed:\n{proc.stderr.strip()[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["how"] == "the bench's joblib" and info["expected"] != model["expected"]:
        raise HarnessError(
            f"{peer.name}: the bench's {name} joblib predicts {info['expected']} in the peer's venv, "
            f"{model['expected']} in the project's"
        )
    return info | {"dir": out}


def start_peer(peer: Peer, name: str, layout: dict, workdir: Path, stack: contextlib.ExitStack) -> Target:
    """Start the peer on a free loopback port, two workers, no auth, in its own process group (stopped when the
    stack closes); wait until it says the model is ready."""
    port, folder, env, model = free_port(), layout["dir"], peer_env(peer, workdir), name.lower()
    if peer.name == "mlflow":
        args = ["mlflow", "models", "serve", "-m", str(folder / "mlflow-model"), "--env-manager", "local"]
        args += ["-w", "2", "-p", str(port), "-h", "127.0.0.1"]
        endpoint, ready = "/invocations", "/ping"
    elif peer.name == "mlserver":
        repository = folder / "repository"
        (repository / model).mkdir(parents=True, exist_ok=True)
        # Server-wide settings.json beside the models; only ports, host, workers and where metrics go differ from
        # the defaults (gRPC and metrics get free ports too: their defaults, 8081 and 8082, may be taken).
        settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}
        settings |= {"parallel_workers": 2, "metrics_dir": str(folder / ".metrics")}
        (repository / "settings.json").write_text(json.dumps(settings))
        model_settings = {"name": model, "implementation": "mlserver_sklearn.SKLearnModel"}
        model_settings["parameters"] = {"uri": str(folder / "model.joblib"), "version": "1"}
        (repository / model / "model-settings.json").write_text(json.dumps(model_settings))
        args = ["mlserver", "start", str(repository)]
        endpoint, ready = f"/v2/models/{model}/infer", f"/v2/models/{model}/ready"
    else:
        shutil.copy(HERE / "bentoml_service.py", folder)
        env["MODEL_PATH"] = str(folder / "model.joblib")
        args = ["bentoml", "serve", "bentoml_service:Predictor", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--working-dir", str(folder)]
        endpoint, ready = "/predict", "/readyz"
    log = workdir / f"{peer.name}-{model}-{port}.log"
    # Its own process group (stop() ends it and every process it started), also stopped by harnessed's stop_all.
    proc = spawn([str(venv_bin(peer) / args[0]), *args[1:]], stdout=log, stderr=log, env=env, cwd=folder)
    stack.callback(stop_tree, proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"{peer.name} ({name}) exited with status {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + ready, timeout=2).status_code == 200:
                return Target(peer.name, base + endpoint, peer.shape, proc, port, accepting=peer.accepting)
        time.sleep(0.2)
    raise HarnessError(f"{peer.name} ({name}) not ready on {base + ready} within 300 s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    """The end of a peer's log, for error messages."""
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop a peer by its process group, then any process it started that left the group (by pid: only ours)."""
    below = descendants(proc.pid)
    stop(proc)
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def body(shape: str, rows: list[list[float]]) -> bytes:
    """A request for these rows in a predict.lua body shape (for the correctness check)."""
    if shape == "v2":
        flat = [v for row in rows for v in row]
        tensor = {"name": "predict", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": flat}
        return orjson.dumps({"inputs": [tensor]})
    return orjson.dumps({shape: rows})


def labels(target: Target, answer) -> list:
    """The predicted labels in a server's JSON answer."""
    if target.shape == "v2":
        return answer["outputs"][0]["data"]
    return answer if isinstance(answer, list) else answer["predictions"]


def check(target: Target, model: dict, expected: list) -> None:
    """Fail the run loudly unless the server answers the check rows with 200 and the model's own labels."""
    rows = orjson.loads(model["body"])["features"]
    headers = {"Content-Type": "application/json"} | ({"Authorization": target.auth} if target.auth else {})
    r = requests.post(target.url, data=body(target.shape, rows), headers=headers, timeout=30)
    got = labels(target, r.json()) if r.status_code == 200 else None
    if got != expected:
        raise HarnessError(
            f"{target.name} at {target.url} answers wrongly, not timing it: status {r.status_code}, "
            f"labels {got} where {expected} was expected: {r.text[:300]}"
        )


def connection_split(target: Target) -> list[int]:
    """Established connections each of the server's processes holds (those holding none left out), from ss: it asks
    the kernel for just these (/proc/net/tcp, which tcp_sockets reads, lists every TIME_WAIT socket Sibyl's
    `Connection: close` runs leave behind, and reading it took longer than a 2 s run)."""
    args = ["ss", "-Htnp", "state", "established", f"( sport = :{target.port} )"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout
    held = Counter(pid for line in out.splitlines() for pid in set(re.findall(r"pid=(\d+)", line)))
    return sorted(held.values(), reverse=True)


def wrk(target: Target, seconds: int, script_args: list[str], redo_split: bool) -> dict | None:
    """One bounded wrk run at c=8 (bench.measure.wrk: predict.lua in the target's body shape). With redo_split, None
    when the keep-alive connections missed one of the server's accepting processes."""
    split = None
    if target.accepting > 1:
        # Per accepting process, the ones holding none as 0: measure.wrk's test for a worker left idle.
        split = lambda: (connection_split(target) + [0] * target.accepting)[: target.accepting]  # noqa: E731
    return measure.wrk(target.url, CONCURRENCY, seconds, 1, script_args, target.auth, split, not redo_split, path="")


@dataclass
class Settings:
    """How long and how often to drive each server."""

    seconds: int
    rounds: int
    warmup: int
    tries: int  # timed runs before accepting a connection split that leaves a peer's worker without connections
    peers: tuple[str, ...]


def drive(bench: Bench, target: Target, model: str, rows: int, settings: Settings) -> dict:
    """Warm up, then one timed run of new rows; printed. Failed when any response is not a 2xx or a socket fails."""
    bench.redis.flushall()  # keeps Redis small; fresh seeds already make every row new
    script = lambda: [str(rows), str(FEATURES), str(next(bench.seeds)), "", target.shape]  # noqa: E731
    if settings.warmup:
        wrk(target, settings.warmup, script(), redo_split=False)
    pids = [target.proc.pid, *descendants(target.proc.pid)]
    for attempt in range(1, settings.tries + 1):
        if target.accepting > 1:
            # Let the requests of the connections wrk just dropped finish: a worker still busy with them leaves the
            # idle one to accept every new connection (a forest request takes the peers 15-30 ms of CPU).
            time.sleep(0.5)
        cpu = cpu_seconds(pids), cpu_seconds([bench.redis_pid])
        if result := wrk(target, settings.seconds, script(), redo_split=attempt < settings.tries):
            break
    per_request = lambda seconds: round(seconds / max(result["requests"], 1) * 1e6)  # noqa: E731
    run = {"server": target.name, "model": model, "rows": rows, "scenario": f"{model} {rows} row{'s' * (rows > 1)}"}
    run |= result | {"attempts": attempt}
    run["cpu_us"] = {"server": per_request(cpu_seconds(pids) - cpu[0])}
    if target.name in SIBYL:  # only Sibyl talks to Redis; for the others its figure is background noise
        run["cpu_us"]["redis"] = per_request(cpu_seconds([bench.redis_pid]) - cpu[1])
    if run["errors"] or not run["requests"]:
        run["failed"] = f"{run['errors']} errors (status >= 400 or socket): {run['error_detail'] or 'no requests'}"
    notes = f"  FAILED: {run['failed']}" if "failed" in run else ""
    notes += f"  (try {attempt}: earlier connection splits missed a worker)" if attempt > 1 else ""
    print(
        f"  {target.name:14} {run['scenario']:11} c={CONCURRENCY} {run['req_s']:8.1f} req/s"
        f"  p50 {run['p50_ms']:7.2f} ms  p99 {run['p99_ms']:7.2f} ms  connections {run['conns_per_worker'] or '-'}"
        f"  CPU us/req {' / '.join(f'{k} {v}' for k, v in run['cpu_us'].items())}{notes}",
        flush=True,
    )
    return run


def _median(runs: list[dict]) -> dict:
    """The run with the median req/s (the lower middle one for an even count) and every round's req/s; failed if any
    round failed. A peer's median is taken over its rounds whose connections reached both its workers, where any
    did: a run on one worker measures half the peer, and the claim is weighed against the peer at its best."""
    run = median_run([r for r in runs if not one_worker(r)] or runs) | {"rounds_req_s": [r["req_s"] for r in runs]}
    run["rounds_one_worker"] = [one_worker(r) for r in runs]
    failures = [r["failed"] for r in runs if "failed" in r]
    return run | ({"failed": "; ".join(failures)} if failures else {})


def measure_model(bench: Bench, name: str, model: dict, layouts: dict, settings: Settings) -> list[dict]:
    """Start and check every server for one model, then the interleaved rounds; the servers are stopped after."""
    with contextlib.ExitStack() as stack:
        targets = []
        env = bench.env(MODEL_PATH=str(model["path"]))
        for server, (_, extra) in SIBYL.items():
            sibyl = stack.enter_context(serving(server, "wsgi:app", bench.workdir, env | extra))
            if server == "sibyl-nocache":
                bench.check(sibyl, model["body"], model["expected"], cache="OFF")
            else:
                check_sibyl(bench, sibyl, model)
            targets.append(_gunicorn_target(bench, sibyl))
        naive = stack.enter_context(serving("naive", "bench.naive:app", bench.workdir, env))
        bench.check(naive, model["body"], model["expected"])
        targets.append(_gunicorn_target(bench, naive))
        for peer in PEERS:
            if peer.name in settings.peers:
                layout = layouts[peer.name, name]
                target = start_peer(peer, name, layout, bench.workdir, stack)
                check(target, model, layout["expected"])
                print(f"  {peer.name} {name}: ready and answering right (model: {layout['how']})", flush=True)
                targets.append(target)
        # Every round, each scenario gives every server a turn, starting with the next server each round: a slow
        # spell on this shared machine then hits Sibyl and the peers alike.
        runs = {(rows, t.name): [] for rows in ROWS for t in targets}
        for i in range(settings.rounds):
            print(f"bench-peers: {name}, round {i + 1} of {settings.rounds}", flush=True)
            for rows in ROWS:
                for target in rotated(targets, i):
                    runs[rows, target.name].append(drive(bench, target, name, rows, settings))
        return [_median(r) for r in runs.values()]


def _gunicorn_target(bench: Bench, server: Gunicorn) -> Target:
    """A Sibyl or tutorial-app gunicorn as wrk drives it: POST /predict with the bench user's basic auth."""
    return Target(server.name, server.url + "/predict", "features", server.proc, server.port, bench.auth)


def compare(runs: list[dict]) -> list[dict]:
    """Per scenario: the best peer, and each Sibyl (and the tutorial app) over it."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        cell = {r["server"]: r for r in runs if r["scenario"] == scenario and "failed" not in r}
        peers = [cell[p.name] for p in PEERS if p.name in cell]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["req_s"])
        ratios = {s: round(cell[s]["req_s"] / best["req_s"], 2) for s in (*SIBYL, "naive") if s in cell}
        out.append({"scenario": scenario, "best_peer": best["server"], "best_peer_req_s": best["req_s"], **ratios})
    return out


def one_worker(run: dict) -> bool:
    """Whether a peer's kept run had every connection on one of its accepting processes."""
    accepting = next((p.accepting for p in PEERS if p.name == run["server"]), 1)
    return accepting > 1 and min(run.get("conns_per_worker") or [1]) == 0


def markdown(results: dict) -> str:
    """peers.md: req/s, ratios to the best peer, latencies and every round."""
    runs, ratios = results["runs"], results["ratios"]
    servers = [s for s in LABELS if any(r["server"] == s for r in runs)]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    cell = {(r["scenario"], r["server"]): r for r in runs}
    head = lambda first, columns: [  # noqa: E731
        f"| {first} | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    fmt = lambda r, f: "FAIL" if "failed" in r else f(r)  # noqa: E731
    s, command = results["settings"], f"python -m bench.peers {results['argv']}".strip()
    lines = [
        "# Sibyl and the peer inference servers",
        "",
        f"{results['timestamp']}, commit {results['machine']['commit']}, {results['machine']['cores']} cores, "
        f"`{command}`: {s['rounds']} round(s) of {s['seconds']} s per server and "
        f"scenario (median kept), c={CONCURRENCY}, new random rows every request, 2 workers each. Load average "
        f"before: {results['machine']['loadavg_before']}; 10^7 Python additions in "
        f"{results['machine'].get('python_loop_s', '?')} s (the machine's speed).",
        "",
        "## Requests per second",
        "",
        *head("req/s", [LABELS[x] for x in servers]),
    ]
    mark = lambda r: " †" if one_worker(r) else ""  # noqa: E731
    for sc in scenarios:
        values = [fmt(cell[sc, x], lambda r: f"{r['req_s']:,.0f}{mark(r)}") for x in servers]
        lines.append(f"| {sc} | " + " | ".join(values) + " |")
    lines += [
        "",
        "MLflow's and BentoML's workers share one listening socket, and the first to wake accepts every connection "
        f"wrk opens at once: a run whose {CONCURRENCY} keep-alive connections all sat on one worker is redone (up to "
        f"{s['tries']} tries), and a peer's figure is the median of its rounds whose connections reached both workers "
        "(* in every round below: those that did not). † Where no round did: about one worker's (one core's) figure.",
    ]
    lines += [
        "",
        "## Over the best peer",
        "",
        *head("scenario", ["best peer", *(LABELS[x] for x in (*SIBYL, "naive"))]),
    ]
    for r in ratios:
        values = [f"{r[x]:.2f}×" if x in r else "–" for x in (*SIBYL, "naive")]
        best = f"{LABELS[r['best_peer']]} ({r['best_peer_req_s']:,.0f}{mark(cell[r['scenario'], r['best_peer']])})"
        lines.append(f"| {r['scenario']} | {best} | " + " | ".join(values) + " |")
    lines += ["", "The claim: Sibyl 10× the best peer on 1-row forest requests, 3× on the linear model.", ""]
    for scenario, goal in (("RF 1 row", 10), ("LR 1 row", 3)):
        r = next((x for x in ratios if x["scenario"] == scenario), None)
        if r:
            measured = "; ".join(
                f"{LABELS[x]} {r[x]:.2f}× ({'met' if r[x] >= goal else '**not met**'})" for x in SIBYL if x in r
            )
            lines.append(f"- {scenario}, {goal}× claimed, over {LABELS[r['best_peer']]}: {measured}")
    lines += ["", "## Latency at c=8: p50 / p99 ms", "", *head("ms", [LABELS[x] for x in servers])]
    for sc in scenarios:
        values = [fmt(cell[sc, x], lambda r: f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}") for x in servers]
        lines.append(f"| {sc} | " + " | ".join(values) + " |")
    lines += ["", "## CPU per request: the server's processes, µs (Redis's not counted)", ""]
    lines += head("µs", [LABELS[x] for x in servers])
    for sc in scenarios:
        lines.append(f"| {sc} | " + " | ".join(str(cell[sc, x]["cpu_us"]["server"]) for x in servers) + " |")
    lines += ["", "## Every round's req/s", "", *head("req/s", [LABELS[x] for x in servers])]
    for sc in scenarios:
        r = [cell[sc, x] for x in servers]
        values = [
            ", ".join(f"{v:,.0f}{'*' * one}" for v, one in zip(x["rounds_req_s"], x["rounds_one_worker"])) for x in r
        ]
        lines.append(f"| {sc} | " + " | ".join(values) + " |")
    failed = [r for r in runs if "failed" in r]
    if failed:
        lines += ["", "## Failed scenarios", ""] + [f"- {r['server']} {r['scenario']}: {r['failed']}" for r in failed]
    lines += ["", "## The peers", ""]
    for name, peer in results["peers"].items():
        models = "; ".join(f"{m}: {how}" for m, how in peer["models"].items())
        pkgs = ", ".join(f"{k} {v}" for k, v in peer["versions"].items())
        lines.append(f"- {LABELS[name]}: own venv bench/.peers/{name}/ ({pkgs}); models: {models}")
    lines += [
        "",
        "How each is reached: Sibyl and the tutorial app, POST /predict with basic auth (Sibyl's sync gunicorn workers "
        "answer `Connection: close`, so wrk reconnects every request); MLflow, `mlflow models serve -w 2` (uvicorn), "
        'POST /invocations `{"inputs": [[...]]}` against a model saved with a signature; MLServer, `mlserver start` '
        "with `parallel_workers: 2` (one HTTP process, two inference processes), POST /v2/models/<m>/infer with one "
        'FP64 tensor; BentoML, `bentoml serve` of bench/bentoml_service.py (`workers=2`), POST /predict `{"features": '
        "[[...]]}`. The peers keep connections alive.",
        "",
    ]
    return "\n".join(lines)


def run(settings: Settings, workdir: Path, argv: str) -> dict:
    """Install the peers, make the models, then measure model by model."""
    peers = [p for p in PEERS if p.name in settings.peers]
    results = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "argv": argv, "peers": {}}
    for peer in peers:
        results["peers"][peer.name] = install(peer) | {"versions": versions(peer), "models": {}}
    # The same plan shape bench.run uses; only its seconds and rounds matter here (Bench reads neither).
    plan = Plan(
        seconds=settings.seconds,
        warmup=settings.warmup,
        rounds=settings.rounds,
        concurrencies=(CONCURRENCY,),
        debug_seconds=settings.seconds,
        debug_concurrency=CONCURRENCY,
        repeat=1,
        threads=1,
        backend="auto",  # Sibyl's INFERENCE_BACKEND as make bench runs it: compiled where it can
        py_spy=False,
    )
    bench = Bench(plan, workdir)
    results["machine"] = machine(bench)
    results["settings"] = asdict(settings)
    print("bench-peers: models, and each peer's copy of them...", flush=True)
    models = make_models(workdir)
    layouts = {}
    for peer in peers:
        for name, model in models.items():
            layouts[peer.name, name] = lay_out(peer, name, model, workdir)
            results["peers"][peer.name]["models"][name] = layouts[peer.name, name]["how"]
    results["runs"] = []
    for name, model in models.items():
        print(
            f"bench-peers: {name}: starting Sibyl, the tutorial app and {', '.join(p.name for p in peers)}", flush=True
        )
        results["runs"] += measure_model(bench, name, model, layouts, settings)
    results["runs"].sort(key=lambda r: (r["model"] != "RF", r["rows"]))
    results["ratios"] = compare(results["runs"])
    return results


def parse_args(argv: list[str] | None) -> Settings:
    """Command line -> Settings."""
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s")
    p.add_argument("--rounds", type=int, help="interleaved runs per server and scenario, median kept (default 3)")
    p.add_argument("--duration", "--seconds", type=int, help="seconds per timed run (default 4, or 2 with --quick)")
    names = [p.name for p in PEERS]
    p.add_argument("--only", help=f"comma-separated peers to run (default all: {','.join(names)})")
    a = p.parse_args(argv)
    only = tuple(x.strip() for x in a.only.split(",") if x.strip()) if a.only else tuple(names)
    if unknown := [x for x in only if x not in names]:
        p.error(f"--only: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return Settings(
        seconds=a.duration or (2 if a.quick else 4),
        rounds=a.rounds or (1 if a.quick else 3),
        warmup=1,
        tries=SPLIT_TRIES,
        peers=only,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; every process it started is stopped on any exit, Ctrl-C and SIGTERM included."""
    settings = parse_args(argv)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    results = measure.harnessed("bench-peers", lambda workdir: run(settings, workdir, args))
    if isinstance(results, int):
        return results
    table = markdown(results)
    RESULTS.mkdir(exist_ok=True)
    # Written beside and renamed over, so an interrupted run never leaves half a file (*.tmp is git-ignored).
    for name, text in (("peers.json", json.dumps(results, indent=2, default=str) + "\n"), ("peers.md", table)):
        (RESULTS / f"{name}.tmp").write_text(text)
        (RESULTS / f"{name}.tmp").replace(RESULTS / name)
    print("\n" + table)
    print(f"bench-peers: wrote peers.json and peers.md in {RESULTS.relative_to(ROOT)}/")
    failed = [r for r in results["runs"] if "failed" in r]
    for r in failed:
        print(f"bench-peers: FAILED {r['server']} {r['scenario']}: {r['failed']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
