"""The Postman collection in postman/ is generated from GET /openapi.json, and newman runs it green on a live Sibyl."""

import json
import subprocess

from conftest import ADMIN, ADMIN_KEY, KEY, ROOT, USER

from app import postman

# Feedback on, so POST /feedback runs its real lookup (its example names an unknown request: 404).
FEEDBACK = {"FEEDBACK_TTL": "600"}
NEWMAN = ROOT / "node_modules" / ".bin" / "newman"
CHECKED_IN = ROOT / "postman"


def test_checked_in_files_are_a_fresh_generation(demo_model_dir):
    """postman/ holds exactly what the generator writes for the demo registry (`make model` trains the same one)."""
    for name, text in postman.files(str(demo_model_dir)).items():
        assert (CHECKED_IN / name).read_text() == text, f"postman/{name} is stale: run `make postman` and commit it"


def test_every_operation_has_tested_requests(make_model_dir, make_app):
    """One request per (operation, example), path parameters from the example's key; public ones send no auth;
    every request tests its status; predict requests count their predictions."""
    root = make_model_dir({"iris": ["1", "2"], "tiny": ["9"]})
    app = make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris")
    doc = app.test_client().get("/openapi.json").json
    public = {op["operationId"] for ops in doc["paths"].values() for op in ops.values() if "security" not in op}
    assert {"health_health", "openapi_spec", "mlflow_ping"} <= public
    routes = app.url_map.bind("localhost")
    items = postman.items(postman.collection(doc))
    urls = {(i["request"]["method"], i["request"]["url"]["raw"]) for i in items}
    for path, ops in doc["paths"].items():
        for method in ops:
            prefix = "{{baseUrl}}" + path.split("{")[0].rstrip("/")
            assert any(m == method.upper() and url.startswith(prefix) for m, url in urls), (method, path)
    assert {url for m, url in urls if url.endswith("/predict") and "versions" in url} == {
        "{{baseUrl}}/models/iris/versions/1/predict",
        "{{baseUrl}}/models/iris/versions/2/predict",
        "{{baseUrl}}/models/tiny/versions/9/predict",
    }
    for item in items:
        lines = postman.script_lines(item)
        assert any("pm.response.to.have.status(" in line for line in lines), item["name"]
        path = "/" + "/".join(item["request"]["url"]["path"])
        endpoint, _ = routes.match(path, method=item["request"]["method"])
        no_auth = item["request"].get("auth") == {"type": "noauth"}
        assert no_auth == (endpoint.replace(".", "_") in public), item["name"]
        if path.endswith("/predict") and "(" not in item["name"]:
            assert any("predictions).to.have.lengthOf(1)" in line for line in lines), item["name"]


def test_newman_runs_the_collection_green(live_server, redis_url, demo_model_dir, tmp_path):
    """newman runs every request of the checked-in collection against gunicorn + Redis serving the demo registry:
    no failed request or assertion, and every assertion the collection holds was executed."""
    server = live_server(env={"MODEL_PATH": "", "MODEL_DIR": str(demo_model_dir), "REDIS_URL": redis_url, **FEEDBACK})
    collection = CHECKED_IN / postman.COLLECTION_FILE
    report = tmp_path / "newman.json"
    credentials = {"user": USER, "key": KEY, "adminUser": ADMIN, "adminKey": ADMIN_KEY}
    args = [str(NEWMAN), "run", str(collection), "-e", str(CHECKED_IN / postman.ENVIRONMENT_FILE)]
    for name, value in {"baseUrl": server.url, **credentials}.items():
        args += ["--env-var", f"{name}={value}"]
    args += ["--reporters", "cli,json", "--reporter-json-export", str(report), "--color", "off", "--timeout", "120000"]
    assert NEWMAN.exists(), "newman is not installed: run `make test` (it runs `npm ci`)"
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    stats = json.loads(report.read_text())["run"]["stats"]
    expected = postman.assertions(json.loads(collection.read_text()))
    assert (stats["requests"]["total"], stats["requests"]["failed"]) == (
        len(postman.items(json.loads(collection.read_text()))),
        0,
    )
    assert (stats["assertions"]["total"], stats["assertions"]["failed"]) == (expected, 0)
    assert expected > 3 * stats["requests"]["total"]  # status, media type and fields, not the status alone
