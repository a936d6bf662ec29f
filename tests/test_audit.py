"""Audit: one line per admin action or refused-login burst, on the request log's stdout; never secrets."""

import hashlib

import requests
from conftest import ADMIN, ADMIN_KEY, KEY, USER, basic_auth

from app import audit as audit_module
from app.audit import LoginFailures
from tests.support.servers import json_lines

BAD = basic_auth(USER, "wrong-key-zz")


def audit_lines(out: str) -> list[dict]:
    """The audit lines in captured stdout."""
    return [x for x in json_lines(out) if x.get("event") == "audit"]


def test_admin_call_writes_one_audit_line_with_exact_fields(client, capsys):
    """An admin route call writes one audit line: who, what, from where, outcome, request id; no secrets."""
    capsys.readouterr()
    r = client.get("/admin/users", headers=basic_auth(ADMIN, ADMIN_KEY))
    out = capsys.readouterr().out
    (line,) = audit_lines(out)
    assert set(line) == {"time", "level", "logger", "message", "event", "request_id", "pid", "remote_addr", "user",
                         "action", "outcome", "reason", "users"}  # fmt: skip
    assert (line["message"], line["level"], line["logger"]) == ("audit", "INFO", "app.audit")
    assert (line["user"], line["action"], line["outcome"], line["reason"]) == (ADMIN, "admin.users", "ok", None)
    assert (line["request_id"], line["remote_addr"], line["users"]) == (r.headers["X-Request-ID"], "127.0.0.1", 2)
    assert out.count("\n") == 2  # the audit line and the request line, nothing else
    for secret in (ADMIN_KEY, hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), hashlib.sha256(KEY.encode()).hexdigest()):
        assert secret not in out


def test_refused_admin_call_is_audited(client, capsys):
    """A predict-only user's try at an admin route is an audit line too, outcome refused, with the reason."""
    capsys.readouterr()
    client.get("/admin/users", headers={"Authorization": f"Bearer {KEY}"})
    out = capsys.readouterr().out
    (line,) = audit_lines(out)
    assert (line["user"], line["action"], line["outcome"]) == (USER, "admin.users", "refused")
    assert line["level"] == "WARNING" and "admin role" in line["reason"]
    assert KEY not in out


def test_predictions_write_no_audit_line(client, capsys):
    """Predict routes are in the request log only: the audit log is for admin actions."""
    capsys.readouterr()
    client.get("/models", headers=basic_auth(ADMIN, ADMIN_KEY))
    assert audit_lines(capsys.readouterr().out) == []


def test_refused_login_burst_writes_exactly_one_line(make_app, capsys):
    """The AUDIT_LOGIN_FAILURES-th refused login in the window writes one line: count and address, no names."""
    client = make_app(AUDIT_LOGIN_FAILURES=3).test_client()
    capsys.readouterr()
    tried = [BAD, basic_auth("mallory", KEY), {"Authorization": "Bearer guessed-token"}]
    for headers in tried:
        assert client.get("/models", headers=headers).status_code == 401
    (line,) = audit_lines(capsys.readouterr().out)
    assert (line["action"], line["outcome"], line["user"], line["remote_addr"]) == (
        "login",
        "refused",
        None,
        "127.0.0.1",
    )
    assert (line["count"], line["window_seconds"], line["level"]) == (3, 60.0, "WARNING")
    for name in ("mallory", USER, "guessed-token", "wrong-key-zz"):
        assert name not in str(line)
    for _ in range(10):  # the rest of the burst, within the window: quiet
        client.get("/models", headers=BAD)
    assert audit_lines(capsys.readouterr().out) == []


def test_requests_without_credentials_are_not_refused_logins(make_app, capsys):
    """A 401 for a request that sent no credentials (a browser before its prompt) is not counted."""
    client = make_app(AUDIT_LOGIN_FAILURES=2).test_client()
    capsys.readouterr()
    for _ in range(5):
        assert client.get("/models").status_code == 401
    client.get("/models", headers=BAD)
    assert audit_lines(capsys.readouterr().out) == []
    client.get("/models", headers=BAD)
    assert len(audit_lines(capsys.readouterr().out)) == 1


def refused_at(make_app, times: list[float], capsys) -> int:
    """Audit lines written for refused logins at these clock readings (a 2-refusal, 5 s window)."""
    app = make_app(AUDIT_LOGIN_FAILURES=2, AUDIT_WINDOW_SECONDS=5)
    now = [times[0]]
    app.extensions["sibyl.login_failures"].clock = lambda: now[0]
    client = app.test_client()
    capsys.readouterr()
    for at in times:
        now[0] = at
        client.get("/models", headers=BAD)
    return len(audit_lines(capsys.readouterr().out))


def test_next_window_writes_the_next_line(make_app, capsys):
    """Once AUDIT_WINDOW_SECONDS have passed since the window opened, a new burst writes a new line: two refusals
    open the window and report, the third is inside it; at 1005 a new window opens and the next one reports it."""
    assert refused_at(make_app, [1000.0, 1001.0, 1004.9], capsys) == 1
    assert refused_at(make_app, [1000.0, 1001.0, 1004.9, 1005.0], capsys) == 1
    assert refused_at(make_app, [1000.0, 1001.0, 1004.9, 1005.0, 1005.1], capsys) == 2


def test_refusals_spread_wider_than_the_window_write_nothing(make_app, capsys):
    """Refused logins slower than AUDIT_LOGIN_FAILURES per window never add up to a line."""
    assert refused_at(make_app, [0.0, 5.0, 10.0, 15.0], capsys) == 0


def test_addresses_are_counted_apart_and_memory_is_bounded(monkeypatch):
    """Each address has its own count; past MAX_ADDRESSES the least recently refused one is forgotten."""
    monkeypatch.setattr(audit_module, "MAX_ADDRESSES", 3)
    logins = LoginFailures(threshold=2, window=60, clock=lambda: 0.0)
    assert [logins.refused(a) for a in ("a", "b", "a")] == [False, False, True]
    for address in ("c", "d", "e"):  # "b" was refused longest ago: it is dropped first
        logins.refused(address)
    assert len(logins._counts) == 3 and "b" not in logins._counts
    assert logins.refused("b") is False  # counted afresh


def test_audit_lines_survive_log_level_and_text_format(make_app, capsys):
    """LOG_LEVEL=ERROR drops request lines but never audit lines; LOG_FORMAT=text writes them as key=value."""
    client = make_app(LOG_LEVEL="ERROR").test_client()
    capsys.readouterr()
    client.get("/admin/users", headers=basic_auth(ADMIN, ADMIN_KEY))
    out = capsys.readouterr().out
    assert len(audit_lines(out)) == 1 and out.count("\n") == 1
    client = make_app(LOG_FORMAT="text").test_client()
    capsys.readouterr()
    client.get("/admin/users", headers=basic_auth(ADMIN, ADMIN_KEY))
    lines = capsys.readouterr().out.splitlines()
    make_app()  # later tests expect the default JSON/INFO logging
    assert len(lines) == 2 and " app.audit audit event=audit " in lines[0] and " action=admin.users " in lines[0]


def test_live_gunicorn_writes_audit_lines_to_stdout(live_server):
    """Under gunicorn, a refused-login burst and an admin call each leave one audit line in the server's stdout."""
    server = live_server(env={"AUDIT_LOGIN_FAILURES": "3"}, workers=1)  # one worker: counts are per worker
    for _ in range(5):
        assert requests.get(server.url + "/models", headers=BAD, timeout=10).status_code == 401
    r = requests.get(server.url + "/admin/users", headers=basic_auth(ADMIN, ADMIN_KEY), timeout=10)
    assert r.status_code == 200 and r.json()["users"][1] == {"name": ADMIN, "roles": ["predict", "admin"]}
    lines = audit_lines(server.stdout.read_text())
    assert [(x["action"], x["outcome"], x["user"]) for x in lines] == [("login", "refused", None),
                                                                        ("admin.users", "ok", ADMIN)]  # fmt: skip
    assert lines[1]["request_id"] == r.headers["X-Request-ID"]
    assert ADMIN_KEY not in server.stdout.read_text() and "wrong-key-zz" not in server.stdout.read_text()


def test_threshold_of_one_reports_the_first_refusal(make_app, capsys):
    """AUDIT_LOGIN_FAILURES=1 reports the first refused login of each window, and only that one."""
    client = make_app(AUDIT_LOGIN_FAILURES=1).test_client()
    capsys.readouterr()
    client.get("/models", headers=BAD)
    client.get("/models", headers=BAD)
    assert len(audit_lines(capsys.readouterr().out)) == 1


def test_registry_files_are_for_admins_only(make_app, iris_path, capsys):
    """GET /admin/models adds each version's file paths for an admin (and audits it); a predict-only user gets
    403, and the public GET /models never shows a path."""
    client = make_app().test_client()
    listed = client.get("/admin/models", headers=basic_auth(ADMIN, ADMIN_KEY))
    assert listed.status_code == 200
    (version,) = listed.json["models"][0]["versions"]
    assert version["files"] == {"artifact": str(iris_path), "metadata": str(iris_path.with_suffix(".json"))}
    assert '"action":"admin.registry_files","outcome":"ok"' in capsys.readouterr().out
    assert client.get("/admin/models", headers=basic_auth()).status_code == 403
    public = client.get("/models", headers=basic_auth())
    assert str(iris_path.parent) not in public.get_data(as_text=True)
