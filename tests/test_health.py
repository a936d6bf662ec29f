"""Probes: /ready is a fact about this worker (its backend answered), and tells the unauthenticated nothing."""

import pytest
import requests
from conftest import free_port, served_model


def test_ready_means_the_backend_answered(client):
    """/ready runs a sample row through the backend and says so."""
    assert client.get("/ready").json == {"status": "ready", "model": "ok", "cache": "off"}


def test_broken_backend_is_not_ready(app, capsys):
    """A backend that raises makes /ready a 503 in the one error shape; the detail is only in the log."""

    class Broken:
        name = scope = "broken"

        def predict(self, X, proba):
            raise RuntimeError("onnxruntime session is gone")

    served_model(app).backend = Broken()
    r = app.test_client().get("/ready")
    assert r.status_code == 503
    assert r.json["error"]["code"] == "unavailable"
    assert "onnxruntime" not in r.text
    assert "onnxruntime session is gone" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["unix-socket", "refused-port"])
def test_ready_never_shows_where_redis_is(live_server, tmp_path, where):
    """Over real gunicorn, an unreachable Redis makes /ready degraded with a coarse reason: no host, port or path."""
    port = str(free_port())
    secret_place = str(tmp_path / "hidden-redis.sock") if where == "unix-socket" else port
    url = f"unix://{secret_place}?db=0" if where == "unix-socket" else f"redis://127.0.0.1:{port}/0"
    server = live_server(env={"REDIS_URL": url}, workers=1)
    server.predict({"features": [[5.1, 3.5, 1.4, 0.2]]})  # the first failure opens the breaker with its reason
    r = requests.get(server.url + "/ready", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "degraded", "model": "ok", "cache": "down", "cache_reason": "down"}
    for detail in (secret_place, "127.0.0.1", "hidden-redis", "Error"):
        assert detail not in r.text
    assert any(secret_place in x["message"] for x in server.log_lines())  # the operator still learns where
