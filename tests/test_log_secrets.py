"""No secret and no request value in any log line: a live gunicorn with a password-protected Redis takes every
endpoint, every error and every admin action, with sentinel values in every body, then its logs (request log,
audit log, gunicorn's stderr, Redis's log) are searched for each sentinel, key, password and Authorization value."""

import base64
import gzip
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, KEY, ROOT, USER, basic_auth

# Distinctive digits and words: each appears in a body (or a header) and nowhere else, so any match in a log is a leak.
NUMBERS = ["5.18273645", "3.91827364", "1.72839465", "0.28374659", "6.37481926", "2.46381957", "4.83726154"]
WORDS = {
    "field": "sentinelfieldQx81",  # an unknown top-level field (the error quotes it back to the caller, not the log)
    "column": "sentinelcolQx82",  # an unknown MLflow column and CSV header
    "cell": "sentinelcellQx83",  # a CSV cell that is not a number
    "string": "sentinelstrQx84",  # a string where a number belongs
    "truth": "sentineltruthQx85",  # a feedback label the model never answers
    "request_id": "sentinelridQx86",  # a feedback body naming a request never answered
    "v2_id": "sentinelv2idQx87",  # V2's echoed id
    "v2_name": "sentinelv2inQx88",  # a V2 input name
    "user": "sentineluserQx89",  # a user name that does not exist
    "header": "sentinelhdrQx90",  # a malformed header gunicorn refuses
}
REDIS_PASSWORD = "redis-pw-sentinelQx91-0123456789"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def create_user(users_file, name: str, role: str = "predict") -> str:
    """`python -m app.cli create-user NAME --role ROLE --file users_file` (the admin's way to add a user); the key."""
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "create-user", name, "--role", role, "--file", str(users_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.search(r"^key:\s+(\S+)$", out, re.M)[1]


def add_version(root, version: str) -> None:
    """iris/<version>: a copy of iris/1 with its metadata's version changed, as `register` would leave it."""
    folder = root / "iris" / version
    shutil.copytree(root / "iris" / "1", folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "version": version}))


def raw(port: int, data: bytes) -> bytes:
    """Send bytes as they are (requests that no HTTP library would form) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def exercise(server, carol: str, root) -> list[int]:
    """Every endpoint, error and admin action, sentinels in every body; the statuses, in order."""
    url, alice, ops = server.url, basic_auth(), basic_auth(ADMIN, ADMIN_KEY)
    carol_bearer = {"Authorization": f"Bearer {carol}"}
    a, b, c, d, e, f, g = NUMBERS
    row = [float(a), float(b), float(c), float(d)]
    csv = f"{','.join(FEATURES)}\n{a},{b},{c},{d}\n"
    v2 = {
        "id": WORDS["v2_id"],
        "inputs": [{"name": WORDS["v2_name"], "shape": [1, 4], "datatype": "FP64", "data": row}],
    }
    calls = [
        # Predictions through every protocol, with the sentinel row.
        ("POST", "/predict", alice, {"json": {"features": [row], "probabilities": True}}),
        ("POST", "/predict", carol_bearer, {"data": csv, "headers": {"Content-Type": "text/csv"}}),
        (
            "POST",
            "/models/iris/predict",
            alice,
            {
                "data": gzip.compress(f'{{"instances": [[{e}, {f}, {g}, {a}]]}}'.encode()),
                "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Request-ID": "fb-1"},
            },
        ),
        ("POST", "/models/iris/versions/1/predict", alice, {"json": {"data": [dict(zip(FEATURES, row))]}}),
        ("POST", "/invocations", alice, {"json": {"dataframe_split": {"columns": FEATURES, "data": [row]}}}),
        ("POST", "/models/iris/invocations", alice, {"json": {"dataframe_records": [dict(zip(FEATURES, row))]}}),
        ("POST", "/models/iris/versions/1/invocations", alice, {"data": csv, "headers": {"Content-Type": "text/csv"}}),
        ("POST", "/v1/models/iris:predict", alice, {"json": {"instances": [row]}}),
        ("POST", "/v2/models/iris/infer", alice, {"json": v2}),
        ("POST", "/v2/models/iris/versions/1/infer", alice, {"json": v2}),
        # Feedback: a join, a label the model never answers, an unknown id, a repeat.
        ("POST", "/feedback", alice, {"json": {"request_id": "fb-1", "truth": ["setosa"]}}),
        ("POST", "/feedback", alice, {"json": {"request_id": "fb-1", "truth": [WORDS["truth"]]}}),
        ("POST", "/feedback", alice, {"json": {"request_id": WORDS["request_id"], "truth": ["setosa"]}}),
        # Reads and probes.
        *(
            ("GET", path, alice, {})
            for path in (
                "/",
                "/models",
                "/models/iris",
                "/models/iris/versions/1",
                "/version",
                "/v1/models",
                "/v1/models/iris",
                "/v2",
                "/v2/models/iris",
                "/v2/models/iris/ready",
            )
        ),
        *(
            ("GET", path, {}, {})
            for path in ("/health", "/ready", "/ping", "/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs")
        ),
        # Admin reads, and the metrics role's.
        *(("GET", path, ops, {}) for path in ("/admin/users", "/admin/models", "/metrics", "/status")),
        # Errors: bad rows in every form, bad JSON and gzip, limits, media types, auth, roles, routes.
        ("POST", "/predict", alice, {"json": {"features": [[a, b, c]]}}),
        ("POST", "/predict", alice, {"json": {"features": [[WORDS["string"], a, b, c]]}}),
        ("POST", "/predict", alice, {"json": {"features": [row], WORDS["field"]: e}}),
        (
            "POST",
            "/predict",
            alice,
            {"data": f'{{"features": [[{a}, {b}, '.encode(), "headers": {"Content-Type": "application/json"}},
        ),
        (
            "POST",
            "/predict",
            alice,
            {"data": f"{','.join(FEATURES)}\n{WORDS['cell']},{b},{c},{d}\n", "headers": {"Content-Type": "text/csv"}},
        ),
        (
            "POST",
            "/predict",
            alice,
            {
                "data": b"\x1f\x8b" + f"{a}{b}".encode(),
                "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            },
        ),
        ("POST", "/predict", alice, {"data": f"{a} {b}", "headers": {"Content-Type": "text/plain"}}),
        ("POST", "/predict", alice, {"json": {"features": [[float(a)] * 4] * 1001}}),
        ("POST", "/predict", alice, {"data": f"[{a}]" * 200_000, "headers": {"Content-Type": "application/json"}}),
        ("POST", "/predict", alice, {"json": {"features": [[1e308, 1e308, 1e308, 1e308]]}}),
        (
            "POST",
            "/invocations",
            alice,
            {"json": {"dataframe_split": {"columns": FEATURES, "data": [row], "index": [1, 2]}}},
        ),
        (
            "POST",
            "/invocations",
            alice,
            {"json": {"dataframe_split": {"columns": [WORDS["column"], *FEATURES[1:]], "data": [row]}}},
        ),
        ("POST", "/v1/models/iris:predict", alice, {"json": {"instances": [[a, b]]}}),
        ("POST", "/v2/models/iris/infer", alice, {"json": {**v2, "inputs": [{**v2["inputs"][0], "shape": [2, 4]}]}}),
        (
            "POST",
            "/v2/models/iris/infer",
            alice,
            {"json": {**v2, "inputs": [{**v2["inputs"][0], "datatype": WORDS["string"]}]}},
        ),
        ("POST", "/predict", basic_auth(USER, WORDS["string"]), {"json": {"features": [row]}}),
        ("POST", "/predict", basic_auth(WORDS["user"], KEY), {"json": {"features": [row]}}),
        ("POST", "/predict", basic_auth(KEY, ""), {"json": {"features": [row]}}),  # a key typed as the user name
        ("POST", "/predict", basic_auth(carol, carol), {"json": {"features": [row]}}),
        ("POST", "/predict", {"Authorization": f"Bearer {carol}x"}, {"json": {"features": [row]}}),
        ("POST", "/predict", {"Authorization": f"Basic {carol}"}, {"json": {"features": [row]}}),  # not base64
        ("POST", "/predict", {"Authorization": carol}, {"json": {"features": [row]}}),  # no scheme
        ("GET", "/admin/users", alice, {}),
        ("GET", "/metrics", carol_bearer, {}),
        ("GET", "/models/nope", alice, {}),
        ("POST", "/models/iris/versions/9/predict", alice, {"json": {"features": [row]}}),
        ("GET", "/nope", alice, {}),
        ("DELETE", "/predict", alice, {}),
        ("POST", "/v2/models/nope/infer", alice, {"json": v2}),
    ]
    statuses = []
    for method, path, auth, kw in calls:
        kw = {**kw, "headers": {**auth, **kw.get("headers", {})}}
        statuses.append(requests.request(method, url + path, timeout=30, **kw).status_code)
    # What gunicorn refuses before the app: a long request line, a huge header, a header without a colon.
    statuses.append(int(raw(server.port, f"GET /{a * 600} HTTP/1.1\r\nHost: x\r\n\r\n".encode())[9:12]))
    statuses.append(int(raw(server.port, f"GET / HTTP/1.1\r\nX-Big: {b * 1200}\r\n\r\n".encode())[9:12]))
    bad = f"GET / HTTP/1.1\r\nHost: x\r\n{WORDS['header']} Basic {carol}\r\n\r\n"
    statuses.append(int(raw(server.port, bad.encode())[9:12]))
    # Admin actions: a refused rollout, one that loads, and a SIGHUP.
    (root / "iris" / "3").mkdir()
    (root / "iris" / "3" / "model.joblib").write_bytes(b"not a pickle")
    statuses.append(requests.post(url + "/admin/reload", headers=ops, timeout=30).status_code)
    (root / "iris" / "3" / "model.joblib").unlink()
    (root / "iris" / "3").rmdir()
    add_version(root, "2")
    statuses.append(requests.post(url + "/admin/reload", headers=ops, timeout=30).status_code)
    time.sleep(3)
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(3)
    statuses.append(requests.post(url + "/predict", headers=alice, json={"features": [row]}, timeout=30).status_code)
    return statuses


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logs_hold_no_secret_or_request_value(tmp_path, live_server, own_redis, make_model_dir, log_format):
    """Keys, tokens, passwords, Authorization values and body values never reach a log line, in either format."""
    root = make_model_dir({"iris": ["1"]})
    users_file = tmp_path / "users"
    carol = create_user(users_file, "carol")
    admin2 = create_user(users_file, "ops2", role="admin")
    redis = own_redis(password=REDIS_PASSWORD)
    server = live_server(
        env={
            "MODEL_PATH": "",
            "MODEL_DIR": str(root),
            "SIBYL_USERS_FILE": str(users_file),
            "REDIS_URL": redis.url,
            "FEEDBACK_TTL": "600",
            "LOG_LEVEL": "DEBUG",  # every line the app can write, steps_ms included
            "LOG_FORMAT": log_format,
            "GUNICORN_LOG_LEVEL": "debug",  # and gunicorn's too
            "AUDIT_LOGIN_FAILURES": "2",  # so the refused logins write their audit line
        }
    )
    statuses = exercise(server, carol, root)
    assert statuses.count(200) > 30, statuses
    assert {202, 400, 401, 403, 404, 405, 409, 413, 414, 415, 422, 431} <= set(statuses), statuses
    time.sleep(1)
    logs = b"".join(p.read_bytes() for p in (server.stdout, server.stderr))
    assert b'"action":"admin.rollout"' in logs or b"action=admin.rollout" in logs  # the audit log is in there
    secret = {
        "alice's key": KEY,
        "admin key": ADMIN_KEY,
        "created user's key": carol,
        "created admin's key": admin2,
        "Redis password": REDIS_PASSWORD,
        **{f"Authorization value for {who}": base64.b64encode(pair.encode()).decode() for who, pair in (
            ("alice", f"{USER}:{KEY}"), ("ops", f"{ADMIN}:{ADMIN_KEY}"), ("carol", f"carol:{carol}"))},
        **{f"feature value {n}": n.split(".")[1] for n in NUMBERS},
        **{f"body {what}": word for what, word in WORDS.items()},
    }  # fmt: skip
    leaked = {name: value for name, value in secret.items() if value.encode() in logs}
    assert not leaked, f"in the logs: {sorted(leaked)}"
