"""A real gunicorn with 2 workers over real sockets: the README's curl, both workers, same errors as in-process."""

import re
import signal
import subprocess

import orjson
import pytest
import requests
from conftest import IRIS_ROWS, KEY, ROOT, USER, basic_auth

JSON = {"Content-Type": "application/json"}


def readme_example(heading: str) -> tuple[str, str]:
    """The first sh block under a README heading that runs curl, and the json block right after it."""
    section = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1]
    command = re.search(r"```sh\n(curl .*?)\n```", section, re.S).group(1)
    answer = re.search(r"```json\n(.*?)\n```", section[section.index(command) :], re.S).group(1)
    return command, answer


def test_readme_curl_works_as_printed(live_server):
    """The README's curl command, run as printed (with the test user's key and the server's port), answers
    exactly the body the README shows: README drift fails this test."""
    server = live_server()
    command, answer = readme_example("The two commands")
    assert '"demo:$(cat .sibyl/demo-key)"' in command and "http://127.0.0.1:8000/" in command
    command = command.replace('"demo:$(cat .sibyl/demo-key)"', f"'{USER}:{KEY}'")
    command = command.replace("http://127.0.0.1:8000/", server.url + "/")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True).stdout
    assert out == answer


def test_both_workers_answer(live_server):
    """Both workers serve (one held on a request, the other answers the next), and each gives the same answer."""
    server = live_server(workers=2)
    held = server.held_predict({"features": IRIS_ROWS}, headers={"X-Request-ID": "held"})
    free = server.predict({"features": IRIS_ROWS}, headers={"X-Request-ID": "free"})
    status, _, body = held.finish()
    assert (status, free.status_code) == (200, 200)
    assert body == free.content and b"virginica" in body
    pids = {line["request_id"]: line["pid"] for line in server.request_lines()}
    assert pids["held"] != pids["free"]


def test_errors_over_http_match_in_process(live_server, client):
    """Auth, routing, media-type, size and validation errors are the same JSON over a real socket."""
    server = live_server({"MAX_BODY_BYTES": "2000"})
    cases = [
        ("post", "/predict", {"json": {"features": IRIS_ROWS}}),
        ("post", "/predict", {"json": {"features": [[1, 2]]}, "headers": basic_auth()}),
        ("post", "/predict", {"data": "x", "headers": {**basic_auth(), "Content-Type": "text/plain"}}),
        ("get", "/nope", {}),
        ("get", "/predict", {}),
    ]
    for method, path, kw in cases:
        live = requests.request(method, server.url + path, timeout=10, **kw)
        local = client.open(path, method=method.upper(), **{k.replace("data", "data"): v for k, v in kw.items()})
        assert live.status_code == local.status_code
        assert live.json()["error"]["code"] == local.json["error"]["code"]
        assert live.json()["error"]["message"] == local.json["error"]["message"]
        assert live.headers["Content-Type"] == "application/json"
    big = orjson.dumps({"features": IRIS_ROWS * 100})
    r = requests.post(server.url + "/predict", data=big, headers={**basic_auth(), **JSON}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(("rows", "status"), [(10, 200), (100, 413)])
def test_chunked_body_over_limit_is_413(live_server, rows, status):
    """A chunked body (no Content-Length) past MAX_BODY_BYTES is a 413, not a truncated-JSON 400."""
    server = live_server({"MAX_BODY_BYTES": "2000"})
    body = orjson.dumps({"features": IRIS_ROWS * rows})
    chunks = (body[i : i + 500] for i in range(0, len(body), 500))  # a generator makes requests send chunked
    r = requests.post(server.url + "/predict", data=chunks, headers={**basic_auth(), **JSON}, timeout=10)
    assert r.status_code == status


def test_bearer_and_request_id_over_http(live_server):
    """Bearer tokens work through gunicorn, and X-Request-ID is echoed and logged."""
    server = live_server()
    r = requests.post(server.url + "/predict", json={"features": IRIS_ROWS}, timeout=10,
                      headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "trace-42"})  # fmt: skip
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-42"
    line = next(line for line in server.log_lines() if line.get("request_id") == "trace-42")
    assert (line["user"], line["status"], line["rows"]) == (USER, 200, 2)


def test_no_control_socket_and_graceful_stop(live_server, tmp_path):
    """gunicorn writes no control socket into HOME, and SIGTERM lets it exit cleanly."""
    server = live_server({"HOME": str(tmp_path)})
    assert server.predict({"features": IRIS_ROWS}).status_code == 200
    server.stop(signal.SIGTERM)
    log = server.stderr.read_text()
    assert server.proc.returncode == 0, log[-3000:]
    # Workers must exit cleanly: onnxruntime loaded before fork made them abort or hang here.
    assert "SIGABRT" not in log and "terminate called" not in log, log[-3000:]
    assert not (tmp_path / ".gunicorn").exists()
