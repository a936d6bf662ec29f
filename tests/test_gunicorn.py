"""gunicorn as Sibyl runs it: its settings' rules, its worker default, and the answers it gives itself."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, USERS, LiveServer, basic_auth, iris_settings

from tests.support.servers import refused_start


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("WEB_CONCURRENCY", "0", "must be a whole number >= 1"),
        ("WEB_CONCURRENCY", "abc", "must be a whole number >= 1"),  # gunicorn itself int()s it, without serve.py
        ("WEB_CONCURRENCY", "-2", "must be a whole number >= 1"),
        ("WORKER_CLASS", "gevnt", "must be one of sync, gthread"),
        ("GUNICORN_LOG_LEVEL", "loud", "must be one of debug, info, warning, error, critical"),
        ("BIND", "127.0.0.1:http", "must be host:port, [ipv6]:port, unix:/path or fd://N"),
        ("BIND", "127.0.0.1:99999", "must be host:port, [ipv6]:port, unix:/path or fd://N"),
        ("BIND", "fd://three", "must be host:port, [ipv6]:port, unix:/path or fd://N"),
        ("LOG_LEVEL", "verbose", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),  # Sibyl's own, too
        ("METRICS_BIND", "localhost", "must be empty or host:port, e.g. 127.0.0.1:9100"),
        ("METRICS_BIND", "127.0.0.1:8000", "must use another port than BIND"),  # BIND's default port
    ],
)
def test_bad_gunicorn_variable_stops_with_one_line(tmp_path, name, value, why):
    """A bad server variable stops `python serve.py` (how make run and the image start gunicorn) with one line
    naming it, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), name: value}
    assert refused_start(env) == [f"sibyl: cannot start: {name}={value!r} {why}"]


def test_empty_web_concurrency_means_the_default(tmp_path, iris_path):
    """WEB_CONCURRENCY="" counts as unset, as every empty setting does (gunicorn alone would crash on it)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WEB_CONCURRENCY": "", "MODEL_PATH": str(iris_path)}
    proc = subprocess.run(
        [sys.executable, "serve.py", "--check-config"],
        cwd=ROOT, env={**env, "SIBYL_USERS": USERS}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_worker_default_follows_the_affinity_mask():
    """Without WEB_CONCURRENCY, a master pinned to one CPU runs one worker, not one per CPU in the machine."""
    one = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}
    code = "import runpy; print(runpy.run_path('gunicorn.conf.py')['workers'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "1"), proc.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory, iris_path):
    """One live gunicorn (one sync worker, text logs) for the raw-socket tests below."""
    env = {**iris_settings(iris_path), "WORKER_CLASS": "sync", "LOG_FORMAT": "text"}
    live = LiveServer(tmp_path_factory.mktemp("gunicorn"), env, workers=1).start()
    yield live
    live.stop()


def exchange(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes on a fresh connection; return the answer's status, headers and body (read to close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


POST = (
    "POST /predict HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: {basic_auth()['Authorization']}\r\n"
    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
).encode()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /" + b"MARKER" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"MARKER" * 2000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /health HTTP/1.1\r\n" + b"X-MARKER: 1\r\n" * 101 + b"\r\n", 431, "headers_too_large"),
        (b"MARKER IS NOT A REQUEST LINE\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nNoColonMARKER\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/MARKER\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"G@T /MARKER HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: MARKER\r\n\r\n", 417, "expectation_failed"),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: MARKER\r\n\r\n", 501, "not_implemented"),
    ],
    ids=["long-line", "long-header", "many-headers", "bad-line", "no-colon", "version", "bad-version", "method",
         "expect", "transfer-coding"],
)  # fmt: skip
def test_requests_gunicorn_rejects_get_the_json_error_shape(server, request_bytes, status, code):
    """What gunicorn answers itself is JSON in the app's error shape, with a fixed message that echoes nothing."""
    got, headers, body = exchange(server.port, request_bytes)
    assert (got, headers["content-type"]) == (status, "application/json")
    error = json.loads(body)["error"]
    assert (error["code"], error["request_id"]) == (code, None) and error["message"]
    assert b"<html" not in body and b"MARKER" not in body


@pytest.mark.parametrize("chunks", [b"ZZ\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"], ids=["size", "terminator"])
def test_broken_chunked_body_is_a_400_not_a_crash(server, chunks):
    """gunicorn parses a chunked body as the app reads it; bad framing is the client's 400, not a 500."""
    status, headers, body = exchange(server.port, POST + chunks)
    assert (status, headers["content-type"]) == (400, "application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["request_id"] == headers["x-request-id"]


def test_text_log_line_cannot_be_forged_under_gunicorn(server):
    """A percent-encoded newline in the path stays inside one quoted field of one text line."""
    offset = server.stdout.stat().st_size
    status, _, _ = exchange(server.port, b"GET /predict%0aforged=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    lines = server.stdout.read_bytes()[offset:].decode().splitlines()
    assert status == 404
    assert [line for line in lines if "forged" in line] == [lines[-1]]
    assert ' path="/predict\\nforged=1" status=404 ' in lines[-1]


def test_reading_the_config_file_loads_no_numpy():
    """gunicorn.conf.py sets the BLAS/OpenMP thread variables, which only count if numpy is not loaded yet."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    code = "import runpy, sys, os; runpy.run_path('gunicorn.conf.py'); "
    code += "print('numpy' in sys.modules, os.environ['OMP_NUM_THREADS'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "1"], proc.stderr


def test_workers_fork_with_the_masters_objects_out_of_the_collectors_reach():
    """gunicorn.conf.py's pre_fork freezes what the master loaded, so a worker's garbage collections skip it."""
    code = "import gc, runpy; hooks = runpy.run_path('gunicorn.conf.py'); before = gc.get_freeze_count(); "
    code += "hooks['pre_fork'](None, None); print(before, gc.get_freeze_count() > 10000)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["0", "True"], proc.stderr


# A product token with a version (gunicorn/27.0.1, Python/3.11), or a stack component's name anywhere.
STACK = re.compile(r"gunicorn|werkzeug|python|flask|[A-Za-z-]+/\d", re.IGNORECASE)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n",  # the app's 401
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",  # the app's 404
        f"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: {basic_auth()['Authorization']}\r\n\r\n".encode(),
        b"MARKER IS NOT A REQUEST LINE\r\n\r\n",  # gunicorn's own 400
        b"GET /" + b"x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # gunicorn's own 414
    ],
    ids=["health", "app-401", "app-404", "app-200", "gunicorn-400", "gunicorn-414"],
)
def test_no_header_names_the_server_stack(server, request_bytes):
    """No answer, the app's or gunicorn's own, says which server, framework or language versions answer it."""
    _, headers, _ = exchange(server.port, request_bytes)
    assert "server" not in headers
    assert not [f"{k}: {v}" for k, v in headers.items() if STACK.search(k) or STACK.search(v)]
