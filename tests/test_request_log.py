"""One JSON line per request: who, what, how long, which model, cache outcome; never secrets."""

from conftest import IRIS_ROWS, KEY, USER, basic_auth

from tests.support.servers import json_lines, requests_in


def request_lines(out: str) -> list[dict]:
    """Request log lines from captured stdout."""
    return requests_in(json_lines(out))


def test_one_line_per_request_with_fields(client, capsys):
    """A prediction logs exactly one line with the documented fields."""
    capsys.readouterr()
    r = client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    (line,) = request_lines(capsys.readouterr().out)
    assert line["request_id"] == r.headers["X-Request-ID"]
    assert line["user"] == USER
    assert (line["method"], line["path"], line["status"]) == ("POST", "/predict", 200)
    assert (line["rows"], line["model"], line["version"], line["cache"]) == (2, "iris", "1", "OFF")
    assert line["duration_ms"] > 0
    assert {"time", "level", "remote_addr", "pid", "cache_hits"} <= set(line)


def test_request_id_is_taken_or_made(client):
    """A sane X-Request-ID is echoed; a missing or unsafe one is replaced by a generated id."""
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    for sent in ({}, {"X-Request-ID": "bad id\twith spaces"}, {"X-Request-ID": "x" * 200}):
        rid = client.get("/health", headers=sent).headers["X-Request-ID"]
        assert len(rid) == 32 and rid != sent.get("X-Request-ID")


def test_secrets_and_bodies_never_logged(client, capsys):
    """Neither the key, the Authorization header nor the body's values appear in the log."""
    capsys.readouterr()
    client.post("/predict", json={"features": [[1.2345678, 2, 3, 4]]}, headers=basic_auth())
    client.post("/predict", json={"features": [[1.2345678, 2, 3, 4]]}, headers=basic_auth(USER, "wrong-key-zz"))
    client.post("/predict", json={"features": [[1.2345678, 2, 3, 4]]}, headers={"Authorization": f"Bearer {KEY}"})
    out = capsys.readouterr().out
    for secret in (KEY, "wrong-key-zz", "1.2345678", "Basic ", "Bearer "):
        assert secret not in out


def test_failed_auth_logged_without_user(client, capsys):
    """A 401 is logged with status 401 and no user."""
    capsys.readouterr()
    client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth("mallory", "x"))
    (line,) = request_lines(capsys.readouterr().out)
    assert (line["status"], line["user"]) == (401, None)


def test_text_format_and_debug_steps(make_app, capsys):
    """LOG_FORMAT=text writes key=value lines; LOG_LEVEL=DEBUG adds per-step timings."""
    client = make_app(LOG_FORMAT="text", LOG_LEVEL="DEBUG").test_client()
    capsys.readouterr()
    client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    out = capsys.readouterr().out
    assert " status=200 " in out and "steps_ms=" in out and not out.lstrip().startswith("{")
    make_app()  # later tests expect the default JSON/INFO logging


def test_text_lines_cannot_be_forged(make_app, capsys):
    """LOG_FORMAT=text quotes a value holding a newline, quote, backslash or space: one request, one line."""
    client = make_app(LOG_FORMAT="text").test_client()
    capsys.readouterr()
    client.get("/predict%0aforged=1%0d%e2%80%a8%20status=200%22%5c")
    lines = capsys.readouterr().out.splitlines()
    make_app()  # later tests expect the default JSON/INFO logging
    assert len(lines) == 1
    assert ' path="/predict\\nforged=1\\r\\u2028 status=200\\"\\\\" status=404 ' in lines[0]


def test_json_lines_cannot_be_forged(client, capsys):
    """The JSON format escapes the same path, so it stays one line holding the decoded path."""
    capsys.readouterr()
    client.get("/predict%0aforged=1")
    out = capsys.readouterr().out
    (line,) = request_lines(out)
    assert out.count("\n") == 1 and line["path"] == "/predict\nforged=1"


def test_server_timing_is_the_logged_duration(client, capsys):
    """Every answer carries the server's own time as Server-Timing (browsers and the web page show it): the
    request line's duration_ms, so the two never disagree."""
    capsys.readouterr()
    r = client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    (line,) = request_lines(capsys.readouterr().out)
    assert r.headers["Server-Timing"] == f"app;dur={line['duration_ms']:.3f}"
    assert client.get("/no/such/path").headers["Server-Timing"].startswith("app;dur=")
