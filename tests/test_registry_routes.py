"""The model registry: MODEL_DIR's <name>/<version>/ folders and manifests, the routes that pick a version, and
the names a URL may not smuggle past them."""

import http.client
import json
import random
from collections import Counter

import flask
import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from conftest import IRIS_ROWS, basic_auth, served_model

from app import pipeline
from app.cli import curl
from app.errors import StartupError
from app.registry import ModelError, version_key

TINY_ROWS = [[1.0, 2.0]]


def serve(make_app, root, **overrides):
    """An app serving the registry in root (scikit-learn backends: compiling every copy would only cost time)."""
    return make_app(MODEL_PATH="", MODEL_DIR=str(root), INFERENCE_BACKEND="sklearn", **overrides)


def post(client, path, rows=IRIS_ROWS, headers=None):
    """POST rows with the test user's credentials."""
    return client.post(path, json={"features": rows}, headers={**basic_auth(), **(headers or {})})


def request_lines(text: str) -> list[dict]:
    """The request log lines in captured stdout."""
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "request"]


@pytest.fixture
def registry_client(make_app, make_model_dir):
    """iris 1-3 (default 2, aliases production=2 and staging=3) and tiny 9 and 10; DEFAULT_MODEL=iris."""
    manifest = {"default": "2", "aliases": {"production": "2", "staging": "3"}}
    root = make_model_dir({"iris": ["1", "2", "3"], "tiny": ["9", "10"]}, {"iris": manifest})
    return serve(make_app, root, DEFAULT_MODEL="iris").test_client()


def test_models_lists_every_model_and_version(registry_client):
    """GET /models shows each model's default version, aliases, traffic and every version's description."""
    r = registry_client.get("/models", headers=basic_auth())
    assert r.status_code == 200
    iris, tiny = r.json["models"]
    assert (iris["name"], iris["default_version"], iris["traffic"], iris["unavailable"]) == ("iris", "2", {}, [])
    assert iris["aliases"] == {"production": "2", "staging": "3"}
    assert [v["version"] for v in iris["versions"]] == ["1", "2", "3"]
    assert [v["aliases"] for v in iris["versions"]] == [[], ["production"], ["staging"]]
    assert [v["version"] for v in tiny["versions"]] == ["9", "10"] and tiny["default_version"] == "10"
    two = iris["versions"][1]
    assert set(two) >= {"sha256", "sklearn_version", "feature_names", "n_features", "classes", "task", "backend"}
    assert (two["cache_policy"], two["backend"], two["n_features"]) == ("on", "sklearn", 4)
    assert two["load_seconds"] > 0 and len(two["sample_row"]) == 4
    assert "path" not in two and "/tmp" not in r.text


def test_one_model_and_one_version_by_name_or_alias(registry_client):
    """GET /models/<name> is that model's entry; /versions/<v> takes a version or an alias."""
    r = registry_client.get("/models/iris", headers=basic_auth())
    assert (r.json["name"], r.json["default_version"]) == ("iris", "2")
    r = registry_client.get("/models/iris/versions/staging", headers=basic_auth())
    assert (r.json["name"], r.json["version"], r.json["aliases"]) == ("iris", "3", ["staging"])
    assert registry_client.get("/models/iris/versions/1", headers=basic_auth()).json["version"] == "1"


@pytest.mark.parametrize(
    ("path", "version"),
    [("/predict", "2"), ("/models/iris/predict", "2"), ("/models/iris/versions/1/predict", "1"),
     ("/models/iris/versions/production/predict", "2"), ("/models/iris/versions/staging/predict", "3")],
)  # fmt: skip
def test_predict_by_version_and_alias(registry_client, path, version):
    """Each route answers with the version it names (the default one when it names none), and says so."""
    r = post(registry_client, path)
    assert r.status_code == 200
    assert r.json == {"predictions": ["setosa", "virginica"], "model": {"name": "iris", "version": version}}


def test_default_version_is_the_highest_by_number(registry_client):
    """Without a manifest's "default", the highest version answers, 10 counted above 9."""
    assert post(registry_client, "/models/tiny/predict", TINY_ROWS).json["model"] == {"name": "tiny", "version": "10"}
    assert sorted(["10", "9", "1.10", "1.9", "2a", "2"], key=version_key) == ["1.9", "1.10", "2", "2a", "9", "10"]


@pytest.mark.parametrize(
    ("path", "code", "listed"),
    [("/models/nope/predict", "model_not_found", "iris, tiny"),
     ("/models/iris/versions/7/predict", "version_not_found", "versions: 1, 2, 3; aliases: production, staging"),
     ("/models/nope", "model_not_found", "iris, tiny"),
     ("/models/tiny/versions/production", "version_not_found", "versions: 9, 10")],
)  # fmt: skip
def test_unknown_names_are_404_listing_what_exists(registry_client, path, code, listed):
    """An unknown model or version is a 404 naming what is served, never echoing what was asked."""
    r = registry_client.open(path, method="POST" if path.endswith("predict") else "GET", headers=basic_auth())
    assert (r.status_code, r.json["error"]["code"]) == (404, code)
    assert listed in r.json["error"]["message"] and "nope" not in r.json["error"]["message"]


def test_canary_weight_zero_never_answers(make_app, make_model_dir):
    """traffic {1: 0, 2: 1}: the default route always answers 2; naming version 1 still reaches it."""
    root = make_model_dir({"tiny": ["1", "2"]}, {"tiny": {"default": "1", "traffic": {"1": 0, "2": 1}}})
    client = serve(make_app, root).test_client()
    assert {post(client, "/predict", TINY_ROWS).json["model"]["version"] for _ in range(30)} == {"2"}
    assert post(client, "/models/tiny/versions/1/predict", TINY_ROWS).json["model"]["version"] == "1"


def test_even_split_answers_both_and_logs_the_answering_version(make_app, make_model_dir, capsys):
    """traffic 50/50 over 200 requests reaches both versions; each response and its log line name the version
    that answered."""
    root = make_model_dir({"tiny": ["1", "2"]}, {"tiny": {"traffic": {"1": 50, "2": 50}}})
    client = serve(make_app, root).test_client()
    random.seed(0)
    capsys.readouterr()
    answered = {}
    for i in range(200):
        r = post(client, "/models/tiny/predict", TINY_ROWS, headers={"X-Request-ID": f"r{i}"})
        answered[f"r{i}"] = r.json["model"]["version"]
    assert 60 < Counter(answered.values())["1"] < 140
    logged = {line["request_id"]: (line["model"], line["version"]) for line in request_lines(capsys.readouterr().out)}
    assert logged == {rid: ("tiny", version) for rid, version in answered.items()}


def test_refused_body_logs_the_model_it_was_sent_to(registry_client, capsys):
    """A 400 from a model's route still carries the model and version in its log line."""
    capsys.readouterr()
    assert post(registry_client, "/models/iris/versions/staging/predict", [[1.0]]).status_code == 400
    (line,) = request_lines(capsys.readouterr().out)
    assert (line["model"], line["version"], line["status"]) == ("iris", "3", 400)


@pytest.mark.parametrize(
    ("manifest", "key"),
    [({"default": "9"}, "default"), ({"default": 2}, "default"), ({"aliases": {"2": "1"}}, "aliases"),
     ({"aliases": {"prod": "7"}}, "aliases"), ({"aliases": {"../x": "1"}}, "aliases"), ({"aliases": ["1"]}, "aliases"),
     ({"traffic": {"1": -1, "2": 1}}, "traffic"), ({"traffic": {"1": 0, "2": 0}}, "traffic"),
     ({"traffic": {"7": 1}}, "traffic"), ({"traffic": {"1": True}}, "traffic"), ({"traffic": {"1": 0.5}}, "traffic"),
     ({"cache": "sometimes"}, "cache"), ({"defualt": "1"}, "defualt")],
)  # fmt: skip
def test_bad_manifest_stops_startup_naming_file_and_key(make_app, make_model_dir, manifest, key):
    """A manifest that can't be followed stops startup with one line naming the file and the key."""
    root = make_model_dir({"tiny": ["1", "2"]}, {"tiny": manifest})
    with pytest.raises(StartupError) as e:
        serve(make_app, root)
    message = str(e.value)
    assert str(root / "tiny" / "manifest.json") in message and repr(key) in message and "\n" not in message


@pytest.mark.parametrize("text", ["{not json", "[]"])
def test_unreadable_manifest_stops_startup(make_app, make_model_dir, text):
    """A manifest that is not a JSON object stops startup with one line naming it."""
    root = make_model_dir({"tiny": ["1"]})
    (root / "tiny" / "manifest.json").write_text(text)
    with pytest.raises(StartupError, match=r"manifest .*manifest\.json"):
        serve(make_app, root)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"iris"'])
def test_metadata_that_is_not_an_object_stops_startup(make_app, make_model_dir, text):
    """A version's model.json that is not a JSON object is one line naming it, not a traceback."""
    root = make_model_dir({"tiny": ["1"]})
    (root / "tiny" / "1" / "model.json").write_text(text)
    with pytest.raises(ModelError, match=r"model metadata .*tiny/1/model\.json is (unreadable|not a JSON object)"):
        serve(make_app, root)


def test_unavailable_versions_are_listed_in_version_order(make_app, make_model_dir):
    """Unavailable versions sort as numbers, like the loaded ones: 9 before 10."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1", "9", "10"]})
    tamper(root, "tiny", "9")
    tamper(root, "tiny", "10")
    client = serve(make_app, root, DEFAULT_MODEL="iris", SKIP_BAD_MODELS=True).test_client()
    listed = client.get("/models/tiny", headers=basic_auth()).json["unavailable"]
    assert [u["version"] for u in listed] == ["9", "10"]


def tamper(root, name, version):
    """Change an artifact's bytes after its metadata recorded them."""
    artifact = root / name / version / "model.joblib"
    artifact.write_bytes(artifact.read_bytes() + b"\0")


def test_bad_version_stops_startup_unless_skipped(make_app, make_model_dir, capsys):
    """A bad artifact stops startup; with SKIP_BAD_MODELS (and not the default's default version) it is
    reported unavailable: listed with its reason, a 503 when asked for, logged once."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1", "2"]})
    tamper(root, "tiny", "2")
    with pytest.raises(ModelError, match="has sha256"):
        serve(make_app, root, DEFAULT_MODEL="iris")
    capsys.readouterr()
    client = serve(make_app, root, DEFAULT_MODEL="iris", SKIP_BAD_MODELS=True).test_client()
    assert capsys.readouterr().out.count("is unavailable") == 1
    r = post(client, "/models/tiny/predict", TINY_ROWS)
    assert (r.status_code, r.json["error"]["code"]) == (503, "model_unavailable")
    assert post(client, "/models/tiny/versions/1/predict", TINY_ROWS).status_code == 200
    assert post(client, "/predict").status_code == 200
    tiny = client.get("/models/tiny", headers=basic_auth()).json
    assert [v["version"] for v in tiny["versions"]] == ["1"]
    (unavailable,) = tiny["unavailable"]
    bad, reason = unavailable["version"], unavailable["reason"]
    assert bad == "2" and "tiny/2/model.joblib has sha256" in reason and str(root) not in reason


@pytest.mark.parametrize("default", ["DEFAULT_MODEL", "only-model"])
def test_bad_default_stops_startup_even_when_skipping(make_app, make_model_dir, default):
    """The default model's default version must load, SKIP_BAD_MODELS or not."""
    root = make_model_dir({"iris": ["1", "2"]} if default == "only-model" else {"iris": ["1", "2"], "tiny": ["1"]})
    tamper(root, "iris", "2")
    extra = {"DEFAULT_MODEL": "iris"} if default == "DEFAULT_MODEL" else {}
    with pytest.raises(ModelError, match=r"iris/2/model\.joblib has sha256"):
        serve(make_app, root, SKIP_BAD_MODELS=True, **extra)


@pytest.mark.parametrize("link", ["version-folder", "artifact", "model-folder"])
def test_links_out_of_model_dir_are_refused(make_app, make_model_dir, tmp_path, link):
    """A version folder, artifact or model folder that is a symlink leading outside MODEL_DIR is not loaded."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    outside = make_model_dir({"tiny": ["2"]})
    if link == "version-folder":
        (root / "tiny" / "2").symlink_to(outside / "tiny" / "2")
    elif link == "artifact":
        (root / "tiny" / "1" / "model.joblib").unlink()
        (root / "tiny" / "1" / "model.joblib").symlink_to(outside / "tiny" / "2" / "model.joblib")
    else:
        (root / "tinier").symlink_to(outside / "tiny")
    with pytest.raises(ModelError, match="outside MODEL_DIR") as e:
        serve(make_app, root, DEFAULT_MODEL="iris")
    assert "\n" not in str(e.value)


def test_odd_folders_are_skipped(make_app, make_model_dir, capsys):
    """Folders whose names a URL can't carry are skipped with a warning; dot folders (.compiled) and loose files
    are not models; metadata that disagrees with its folders stops startup naming both."""
    root = make_model_dir({"tiny": ["1"]})
    (root / "bad name" / "1").mkdir(parents=True)
    (root / "tiny" / "-1").mkdir()
    (root / ".compiled").mkdir()
    (root / "train_demo.py").write_text("")
    capsys.readouterr()
    app = serve(make_app, root)
    assert [e["name"] for e in app.test_client().get("/models", headers=basic_auth()).json["models"]] == ["tiny"]
    warned = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(warned) == 2 and "bad name" in warned[0] and "tiny/-1" in warned[1]
    (root / "tiny" / "2").mkdir()
    for name in ("model.joblib", "model.json"):
        (root / "tiny" / "2" / name).write_bytes((root / "tiny" / "1" / name).read_bytes())
    with pytest.raises(ModelError, match=r"is tiny version 1 by its metadata, but sits in folder tiny/2"):
        serve(make_app, root)


def test_default_model_rules(make_app, make_model_dir, iris_path):
    """One model is the default by itself; several need DEFAULT_MODEL for POST /predict (else a 404 that says
    what to do); DEFAULT_MODEL naming no model stops startup with one line."""
    one = serve(make_app, make_model_dir({"tiny": ["1"]})).test_client()
    assert post(one, "/predict", TINY_ROWS).json["model"] == {"name": "tiny", "version": "1"}
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    several = serve(make_app, root).test_client()
    r = post(several, "/predict")
    assert (r.status_code, r.json["error"]["code"]) == (404, "model_not_found")
    assert "/models/<name>/predict" in r.json["error"]["message"] and "DEFAULT_MODEL" in r.json["error"]["message"]
    assert post(several, "/models/iris/predict").status_code == 200
    with pytest.raises(StartupError, match="DEFAULT_MODEL='churn' names no model") as e:
        serve(make_app, root, DEFAULT_MODEL="churn")
    assert "\n" not in str(e.value)
    with pytest.raises(StartupError, match="DEFAULT_MODEL='tiny' is not the model MODEL_PATH serves"):
        make_app(MODEL_PATH=str(iris_path), DEFAULT_MODEL="tiny")


def test_model_path_is_a_one_model_registry_and_model_dir_is_ignored(make_app, make_model_dir, iris_path):
    """MODEL_PATH serves that one artifact by its metadata's name and version; MODEL_DIR is not read."""
    app = make_app(MODEL_PATH=str(iris_path), MODEL_DIR=str(make_model_dir({"tiny": ["1"]})))
    client = app.test_client()
    (entry,) = client.get("/models", headers=basic_auth()).json["models"]
    assert (entry["name"], entry["default_version"]) == ("iris", "1")
    assert post(client, "/models/iris/versions/1/predict").json["model"] == {"name": "iris", "version": "1"}
    with pytest.raises(StartupError, match="MODEL_SHA256"):
        serve(make_app, make_model_dir({"tiny": ["1"]}), MODEL_SHA256="0" * 64)


def test_cache_off_in_a_manifest_skips_the_cache(make_app, make_model_dir, redis_url):
    """A manifest's "cache": "off" serves that model with no cache at all; other models keep theirs."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]}, {"tiny": {"cache": "off"}})
    app = serve(make_app, root, REDIS_URL=redis_url, DEFAULT_MODEL="iris")
    client = app.test_client()
    assert [post(client, "/models/tiny/predict", TINY_ROWS).headers["X-Cache"] for _ in range(2)] == ["OFF", "OFF"]
    assert [post(client, "/predict").headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert client.get("/models/tiny/versions/1", headers=basic_auth()).json["cache_policy"] == "off"


def test_ready_checks_every_loaded_model(make_app, make_model_dir):
    """/ready is 503 when any loaded model's backend fails, not only the default one's."""

    class Broken:
        name = scope = "broken"

        def predict(self, X, proba):
            raise RuntimeError("session gone")

    app = serve(make_app, make_model_dir({"iris": ["1"], "tiny": ["1", "2"]}), DEFAULT_MODEL="iris")
    assert app.test_client().get("/ready").status_code == 200
    app.extensions["sibyl.registry"].entries["tiny"].versions["1"].backend = Broken()
    assert app.test_client().get("/ready").status_code == 503


def test_pipeline_predicts_outside_any_request(make_app, redis_url):
    """pipeline.predict needs no Flask context: a model and a cache in, answers, cache outcome and timings out."""
    app = make_app(REDIS_URL=redis_url, INFERENCE_BACKEND="sklearn")
    model, cache = served_model(app), app.extensions["sibyl.cache"]
    assert not flask.has_app_context() and not flask.has_request_context()
    X = np.asarray(IRIS_ROWS, dtype=np.float64)
    first = pipeline.predict(model, X, True, cache)
    again = pipeline.predict(model, X, True, cache)
    assert first.predictions == again.predictions == ["setosa", "virginica"]
    assert (first.cache, again.cache, again.hits) == ("MISS", "HIT", 2)
    assert first.model is model and set(first.timings) == {"cache_get", "predict", "cache_set"}
    assert pipeline.predict(model, X, False, cache, lookup=False).cache == "BYPASS"


def test_printed_curl_for_a_model_dir(make_model_dir):
    """`app.cli curl --model-dir` reads the default version's metadata: /predict for a lone model, the model's own
    route when there are several."""
    one = make_model_dir({"iris": ["1", "2"]})
    out = CliRunner().invoke(curl, ["--model-dir", str(one)]).output
    assert out.rstrip().endswith("http://127.0.0.1:8000/predict") and '"sepal_length": ' in out
    several = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    out = CliRunner().invoke(curl, ["--model-dir", str(several), "--name", "tiny"]).output
    assert out.rstrip().endswith("/models/tiny/predict")
    body = json.loads(out.split("-d '")[1].split("'")[0])
    assert len(body["instances"][0]) == 2


# Request targets sent byte for byte (requests/urllib3 would normalize the dot segments away).
TRAVERSAL = [
    "/models/../predict",
    "/models/%2e%2e/predict",
    "/models/%2E%2E/versions/1/predict",
    "/models/iris%2Fversions%2F1/predict",  # an encoded slash must not reach the versions route
    "/models/iris%2fpredict",
    "/models/..%2F..%2Fetc%2Fpasswd/predict",
    "/models/%2Fetc%2Fpasswd/predict",
    "/models//etc/passwd/predict",
    "/models/iris/versions/..%2F1/predict",
    "/models/iris/versions/%2e%2e/predict",
    "/models/iris/versions/%2Ftmp/predict",
    "/models/" + "i" * 300 + "/predict",
    "/models/ir%00is/predict",
    "/models/iris%20/predict",
    "/models/%C3%AFris/predict",
    "/models/iris%5C1/predict",
    "GET /models/%2e%2e",
    "GET /models/iris/versions/%2e%2e%2f1",
    "GET /models/iris%2Fversions%2F1",
]


def test_path_traversal_is_404_json_over_gunicorn(live_server, make_model_dir):
    """Dot segments, encoded slashes, absolute paths, overlong and odd names, raw or percent-encoded, are 404 JSON
    through gunicorn's own URL decoding: never another route, never a file."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    server = live_server({"MODEL_PATH": "", "MODEL_DIR": str(root), "INFERENCE_BACKEND": "sklearn"}, workers=1)
    body = json.dumps({"features": IRIS_ROWS})
    headers = {**basic_auth(), "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/models/iris/versions/1/predict", body, headers)
    assert conn.getresponse().status == 200  # the routes work: what follows is refused for its name alone
    conn.close()
    for target in TRAVERSAL:
        method, _, path = target.rpartition(" ")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest(method or "POST", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body.encode())
        resp = conn.getresponse()
        answer = resp.read()
        assert resp.status == 404, (target, resp.status, answer[:200])
        error = orjson.loads(answer)["error"]
        assert error["code"] in {"not_found", "model_not_found", "version_not_found"}, target
        assert "passwd" not in error["message"] and "iiii" not in error["message"]
        conn.close()
