"""Zero-downtime rollout: SIGHUP or POST /admin/reload loads MODEL_DIR again in the gunicorn master and replaces
the workers, whole or not at all, without failing a request or serving an answer cached for the old version."""

import json
import os
import random
import shutil
import signal
import threading
import time

import numpy as np
import orjson
import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, basic_auth
from sklearn.linear_model import LogisticRegression

from app.registry import file_sha256, save_model, write_atomically
from app.rollout import public_reason, reload_registry
from tests.support.servers import both_workers, poll, wait_for_keys

ROW = [1.0, 2.0]  # the row cached under version 1; the load below never sends it
ADMIN_AUTH = basic_auth(ADMIN, ADMIN_KEY)


def add_version(root, version: str) -> LogisticRegression:
    """Register tiny version `version` as `register` would: an estimator fitted on conftest's tiny data with the
    labels flipped (so it answers ROW unlike version 1), dumped with its metadata into MODEL_DIR/tiny/<version>/."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    estimator = LogisticRegression().fit(X, (X[:, 0] + X[:, 1] <= 0).astype(int))
    save_model(estimator, root / "tiny" / version / "model.joblib", "tiny", version, sample_rows=X[:20])
    return estimator


def set_default(root, version: str) -> None:
    """Point tiny's manifest at a version, atomically (a reader never sees half a manifest)."""
    write_atomically(root / "tiny" / "manifest.json", json.dumps({"default": version}).encode())


def add_broken_version(root, version: str, sha_matches: bool) -> None:
    """tiny/<version>: corrupt bytes, with metadata whose sha256 matches them or not."""
    folder = root / "tiny" / version
    shutil.copytree(root / "tiny" / "1", folder, ignore=shutil.ignore_patterns(".compiled"))
    (folder / "model.joblib").write_bytes(b"not a pickle")
    meta = json.loads((folder / "model.json").read_text())
    meta.update(version=version, sha256=file_sha256(folder / "model.joblib") if sha_matches else "0" * 64)
    (folder / "model.json").write_text(json.dumps(meta))


def audit_lines(server, **match) -> list[dict]:
    """The server's admin.rollout audit lines having these fields."""
    lines = [x for x in server.log_lines() if x.get("event") == "audit" and x["action"] == "admin.rollout"]
    return [x for x in lines if all(x.get(k) == v for k, v in match.items())]


def served_version(response_body: bytes) -> tuple[str, list]:
    """The version and predictions of a /predict answer."""
    body = orjson.loads(response_body)
    return body["model"]["version"], body["predictions"]


def new_pids(server, old: list[int]) -> list[int] | None:
    """The master's two workers once neither is one of old (a rollout replaced them both), else None."""
    workers = server.workers()
    return workers if len(workers) == 2 and not set(workers) & set(old) else None


def pids_of(server, request_ids: set[str]) -> set[int]:
    """The pids that logged these requests."""
    return {x["pid"] for x in server.request_lines() if x["request_id"] in request_ids}


# --- in-process: the swap, the refusals, the role ---


@pytest.fixture
def tiny_dir(make_model_dir):
    """MODEL_DIR with tiny version 1 only."""
    return make_model_dir({"tiny": ["1"]})


@pytest.fixture
def tiny_app(make_app, tiny_dir):
    """The app serving tiny_dir with scikit-learn backends."""
    return make_app(MODEL_PATH="", MODEL_DIR=str(tiny_dir), INFERENCE_BACKEND="sklearn")


def test_reload_swaps_in_a_complete_registry_and_says_what_changed(tiny_app, tiny_dir, capsys):
    """A new default version loads into a new registry (generation 2), shown by GET /models, with one audit line."""
    client = tiny_app.test_client()
    first = client.get("/models", headers=basic_auth()).json
    assert (first["generation"], first["models"][0]["default_version"]) == (1, "1") and first["loaded_at"]
    add_version(tiny_dir, "2")
    set_default(tiny_dir, "2")
    capsys.readouterr()
    assert reload_registry(tiny_app) == (True, "generation 2: tiny default 1 -> 2, added 2")
    (line,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines() if '"audit"' in x]
    assert (line["action"], line["outcome"], line["step"], line["generation"]) == ("admin.rollout", "ok", "load", 2)
    assert line["models"] == {"tiny": {"default": ["1", "2"], "added": ["2"]}}
    after = client.get("/models", headers=basic_auth()).json
    assert (after["generation"], after["models"][0]["default_version"]) == (2, "2")
    r = client.post("/predict", json={"features": [ROW]}, headers=basic_auth())
    assert r.json["model"]["version"] == "2"


@pytest.mark.parametrize("sha_matches", [False, True])
def test_reload_of_a_broken_version_keeps_the_old_registry(tiny_app, tiny_dir, capsys, sha_matches):
    """A default version that fails its checks (checksum, or bytes that are no pickle) leaves the registry as it
    was, and the reason names the file relative to MODEL_DIR, never where MODEL_DIR is."""
    before = tiny_app.extensions["sibyl.registry"]
    add_broken_version(tiny_dir, "3", sha_matches)
    set_default(tiny_dir, "3")
    capsys.readouterr()
    ok, reason = reload_registry(tiny_app)
    assert not ok and tiny_app.extensions["sibyl.registry"] is before
    assert reason.startswith("model file tiny/3/model.joblib ") and str(tiny_dir) not in reason
    assert ("could not be loaded" if sha_matches else "sha256") in reason
    (line,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines() if '"audit"' in x]
    assert (line["outcome"], line["reason"], line["generation"]) == ("refused", reason, 1)


def test_public_reason_hides_absolute_model_dir():
    """An absolute MODEL_DIR becomes "MODEL_DIR" and its files relative names; a relative one stays a word."""
    config = {"MODEL_PATH": "", "MODEL_DIR": "/srv/models"}
    assert public_reason("model folder /srv/models holds no models", config) == "model folder MODEL_DIR holds no models"
    assert (
        public_reason("model file /srv/models/a/1/model.joblib is bad", config) == "model file a/1/model.joblib is bad"
    )
    relative = {"MODEL_PATH": "", "MODEL_DIR": "models"}
    assert public_reason("model folder models/a holds no models", relative) == "model folder a holds no models"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [(basic_auth(), 403, "forbidden"), (ADMIN_AUTH, 409, "rollout_refused"), ({}, 401, "unauthorized")],
)
def test_reload_endpoint_needs_admin_and_gunicorn(tiny_app, capsys, headers, status, code):
    """POST /admin/reload: 403 for a predict-only user; 409 for an admin when no gunicorn master can reload; both
    refusals audited as admin.rollout."""
    capsys.readouterr()
    r = tiny_app.test_client().post("/admin/reload", headers=headers)
    assert (r.status_code, r.json["error"]["code"]) == (status, code)
    audited = [orjson.loads(x) for x in capsys.readouterr().out.splitlines() if '"audit"' in x]
    assert [(x["action"], x["outcome"]) for x in audited] == ([] if status == 401 else [("admin.rollout", "refused")])


# --- live gunicorn ---


def keep_predicting(server, path: str, stop: threading.Event, results: list) -> None:
    """POST rows (never ROW) to path, one every 20 ms or so, until stop is set: 20 s and 1000 requests at most."""
    rng = random.Random(path)
    deadline = time.monotonic() + 20
    for _ in range(1000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        row = [round(rng.uniform(-3, 0), 3), round(rng.uniform(-3, 3), 3)]  # first feature < 1: never ROW
        try:
            r = requests.post(server.url + path, json={"features": [row]}, headers=basic_auth(), timeout=10)
            results.append((r.status_code, r.json()["model"]["version"] if r.ok else r.text[:300]))
        except requests.RequestException as e:
            results.append((type(e).__name__, str(e)[:300]))
        stop.wait(0.02)  # pacing only: keeps the load at ~100 requests/s on a shared 2-core machine


def test_rollout_under_load_fails_no_request_and_misses_the_old_cache(
    live_server, make_model_dir, redis_server, redis_url
):
    """Under load on both routes, a new version made default and POST /admin/reload: every request answers 200, a
    request in flight on an old worker is answered by it, both new workers answer version 2, and ROW (cached for
    version 1) is a MISS answered by version 2's own prediction. The master compiles but never loads onnxruntime."""
    root = make_model_dir({"tiny": ["1"]})
    env = {"MODEL_PATH": "", "MODEL_DIR": str(root), "REDIS_URL": redis_url, "CACHE_TIMEOUT_MS": "1000"}
    server = live_server(env=env, workers=2)
    cached = server.predict({"features": [ROW]})
    assert (cached.status_code, cached.headers["X-Cache"], served_version(cached.content)) == (200, "MISS", ("1", [1]))
    assert wait_for_keys(redis_server.client(), 1) == 1  # in Redis, where the new workers would find it
    old_workers = both_workers(server)

    stop, results = threading.Event(), []
    routes = ("/predict", "/models/tiny/predict")
    threads = [threading.Thread(target=keep_predicting, args=(server, path, stop, results)) for path in routes]
    for t in threads:
        t.start()
    try:
        # Pins an old worker mid-request (its body's last byte unsent) across the rollout.
        in_flight = server.held_predict({"features": [[-1.0, -1.0]]})
        v2 = add_version(root, "2")
        set_default(root, "2")
        r = requests.post(server.url + "/admin/reload", headers=ADMIN_AUTH, timeout=30)
        assert (r.status_code, r.json()) == (202, {"status": "rollout started", "generation": 1})

        def version_2_answers():
            """a load request answered by version 2"""
            return (200, "2") in list(results)

        poll(version_2_answers)
        status, _, body = in_flight.finish()
        assert (status, served_version(body)[0]) == (200, "1")  # the old worker finished what it had accepted
        new_workers = poll(lambda: new_pids(server, old_workers))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(results) >= 20, "the load barely ran"
    failed = [answer for answer in results if answer[0] != 200]
    assert failed == []
    assert {version for _, version in results} == {"1", "2"}

    # One request held on one new worker, one answered by the other: each worker answers ROW with version 2.
    held = server.held_predict({"features": [ROW]}, headers={"X-Request-ID": "held"})
    free = server.predict({"features": [ROW]}, headers={"X-Request-ID": "free"})
    status, _, body = held.finish()
    expected = v2.predict(np.asarray([ROW])).tolist()
    assert expected != [1]  # version 2 really answers ROW otherwise
    assert (free.status_code, free.headers["X-Cache"], served_version(free.content)) == (200, "MISS", ("2", expected))
    assert (status, served_version(body)) == (200, ("2", expected))
    assert pids_of(server, {"held", "free"}) == set(new_workers)

    models = requests.get(server.url + "/models", headers=basic_auth(), timeout=10).json()
    assert (models["generation"], models["models"][0]["default_version"]) == (2, "2")
    assert [v["backend"] for v in models["models"][0]["versions"]] == ["onnx", "onnx"]  # compiled in the master's child
    (loaded,) = audit_lines(server, step="load")
    assert (loaded["outcome"], loaded["pid"], loaded["generation"]) == ("ok", server.proc.pid, 2)
    assert loaded["models"] == {"tiny": {"default": ["1", "2"], "added": ["2"]}}
    (checked,) = audit_lines(server, step="check")
    assert (checked["outcome"], checked["user"]) == ("ok", ADMIN) and checked["pid"] in old_workers
    assert "onnxruntime" not in maps(server.proc.pid)
    assert all("onnxruntime" in maps(pid) for pid in new_workers)


def maps(pid: int) -> str:
    """The files mapped into a process (its loaded shared libraries)."""
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_refused_rollout_keeps_serving_the_old_version(live_server, make_model_dir):
    """A broken default version: POST /admin/reload answers 409 with the reason (checksum, then unpicklable bytes);
    a SIGHUP straight to the master loads nothing either, logs why and audits it, and the new workers it forks
    still answer version 1."""
    root = make_model_dir({"tiny": ["1"]})
    server = live_server(env={"MODEL_PATH": "", "MODEL_DIR": str(root), "INFERENCE_BACKEND": "sklearn"}, workers=2)
    add_broken_version(root, "3", sha_matches=False)
    set_default(root, "3")
    r = requests.post(server.url + "/admin/reload", headers=ADMIN_AUTH, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "rollout_refused")
    assert "tiny/3/model.joblib has sha256" in r.json()["error"]["message"] and str(root) not in r.text

    shutil.rmtree(root / "tiny" / "3")
    add_broken_version(root, "3", sha_matches=True)
    r = requests.post(server.url + "/admin/reload", headers=ADMIN_AUTH, timeout=30)
    assert r.status_code == 409 and "tiny/3/model.joblib could not be loaded" in r.json()["error"]["message"]
    assert [x["outcome"] for x in audit_lines(server, step="check")] == ["refused", "refused"]
    assert served_version(server.predict({"features": [ROW]}).content)[0] == "1"

    old_workers = both_workers(server)
    os.kill(server.proc.pid, signal.SIGHUP)

    def refused_in_master():
        """the master's refusal audit line"""
        return audit_lines(server, step="load")

    (line,) = poll(refused_in_master)
    assert (line["outcome"], line["pid"], line["generation"]) == ("refused", server.proc.pid, 1)
    assert line["reason"].startswith("model file tiny/3/model.joblib could not be loaded")
    (why,) = [x for x in server.log_lines() if x["message"].startswith("rollout refused")]
    assert why["message"].startswith("rollout refused, still serving generation 1: model file ")

    new_workers = poll(lambda: new_pids(server, old_workers))
    held = server.held_predict({"features": [ROW]}, headers={"X-Request-ID": "held"})
    free = server.predict({"features": [ROW]}, headers={"X-Request-ID": "free"})
    status, _, body = held.finish()
    assert (status, free.status_code) == (200, 200)
    assert served_version(body)[0] == served_version(free.content)[0] == "1"
    assert pids_of(server, {"held", "free"}) == set(new_workers)
    assert requests.get(server.url + "/models", headers=basic_auth(), timeout=10).json()["generation"] == 1
