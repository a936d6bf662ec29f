"""GET /openapi.json describes what the app serves, from its routes and registry; GET /docs is Swagger UI, offline."""

import json
import re
import sys
from html.parser import HTMLParser

import pytest
from conftest import basic_auth
from openapi_spec_validator import validate

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def two_models(make_app, make_model_dir):
    """iris 1 and 2 (4 named features) and tiny 9 (2 unnamed features); DEFAULT_MODEL=iris."""
    root = make_model_dir({"iris": ["1", "2"], "tiny": ["9"]})
    return make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", INFERENCE_BACKEND="sklearn")


@pytest.fixture
def spec(two_models):
    """The document two_models serves."""
    r = two_models.test_client().get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.json


def test_document_is_valid_openapi_3_1(spec):
    """A real validator accepts it as OpenAPI 3.1."""
    assert spec["openapi"].startswith("3.1.")
    validate(spec)


def test_paths_are_the_registered_routes_both_ways(two_models, spec):
    """Every (path, method) the app routes is in the document, and the document lists nothing else."""
    served = {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method)
        for rule in two_models.url_map.iter_rules()
        if rule.endpoint not in ("static", "page.index")  # files: the static ones, and the web page for browsers
        for method in rule.methods & METHODS
    }
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    assert documented == served
    assert ("/openapi.json", "GET") in served and ("/docs", "GET") in served


def test_security_matches_what_the_routes_enforce(two_models, spec):
    """An operation that lists security answers 401 without credentials; one that does not, never does."""
    client = two_models.test_client()
    for path, ops in spec["paths"].items():
        url = path.replace("{name}", "iris").replace("{version}", "1")
        for method, op in ops.items():
            status = client.open(url, method=method.upper(), json={}).status_code
            if "security" in op:
                assert status == 401, (method, path)
                assert {"basic", "bearer"} == {name for req in op["security"] for name in req}
                assert "401" in op["responses"]
            else:
                assert status != 401, (method, path)
            if path.startswith("/admin/"):
                assert "403" in op["responses"]
    assert "409" in spec["paths"]["/admin/reload"]["post"]["responses"]
    schemes = spec["components"]["securitySchemes"]
    assert (schemes["basic"], schemes["bearer"]) == (
        {"type": "http", "scheme": "basic", "description": "user name and API key"},
        {"type": "http", "scheme": "bearer", "description": "the API key itself"},
    )


def test_every_error_is_the_one_shape(spec):
    """Every documented non-2xx answer points at its protocol's one error schema: Sibyl's Error, or the shape a
    protocol module names in its ERROR_SCHEMA (MLflow's for the mlflow routes)."""
    shapes = {}
    for ops in spec["paths"].values():
        for op in ops.values():
            protocol = sys.modules.get(f"app.protocols.{op['tags'][0]}")
            shape = protocol.ERROR_SCHEMA[0] if hasattr(protocol, "ERROR_SCHEMA") else ""
            shapes[op["operationId"]] = shape
            for status, response in op["responses"].items():
                if not status.startswith("2"):
                    assert response == {"$ref": f"#/components/responses/{shape}{status}"}
    assert shapes["native_predict"] == "" and shapes["mlflow_invocations"] == "MlflowError"
    assert shapes["kserve_predict"] == "KserveError" and shapes["v2_infer"] == "V2Error"
    assert spec["components"]["schemas"]["KserveError"]["properties"]["error"]["type"] == "string"
    for key, response in spec["components"]["responses"].items():
        shape = key.rstrip("0123456789") or "Error"
        assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}
    assert spec["components"]["schemas"]["Error"]["properties"]["error"]["required"] == [
        "code",
        "message",
        "request_id",
    ]
    assert spec["components"]["schemas"]["MlflowError"]["required"] == ["error_code", "message"]


def test_schemas_and_examples_come_from_the_registry(two_models, spec):
    """Feature counts, feature names and example rows are each model's own."""
    registry = two_models.extensions["sibyl.registry"]
    iris, tiny = registry.resolve("iris"), registry.resolve("tiny")
    media = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    schema = media["schema"]
    row = schema["properties"]["features"]["items"]
    assert (row["minItems"], row["maxItems"]) == (4, 4) and schema["additionalProperties"] is False
    named = schema["properties"]["instances"]["items"]["anyOf"][1]
    assert list(named["properties"]) == iris.feature_names and named["additionalProperties"] is False
    assert schema["properties"]["probabilities"]["type"] == "boolean"
    assert media["example"] == {"features": [iris.sample_row]}

    per_model = spec["paths"]["/models/{name}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert set(per_model["examples"]) == {"iris", "tiny"}
    assert per_model["examples"]["tiny"]["value"] == {"features": [tiny.sample_row]}
    widths = sorted(s["properties"]["features"]["items"]["maxItems"] for s in per_model["schema"]["anyOf"])
    assert widths == [2, 4]
    response = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(response["properties"]) == {"predictions", "model", "probabilities"}


def test_each_example_body_predicts(two_models, spec):
    """Every example body, POSTed to its route as the document describes it, answers 200 with one prediction, or
    the documented status its x-status names (POST /feedback's example names an unknown request: 404)."""
    client = two_models.test_client()
    sent = {}
    for path, ops in spec["paths"].items():
        for op in ops.values():
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                examples = {"": (media["example"], 200)} if "example" in media else {}
                examples |= {key: (e["value"], e.get("x-status", 200)) for key, e in media.get("examples", {}).items()}
                for key, (body, status) in examples.items():
                    name, _, version = key.partition(" ")
                    url = path.replace("{name}", name or "iris").replace("{version}", version)
                    data = body if isinstance(body, str) else json.dumps(body)
                    r = client.post(url, data=data, content_type=media_type, headers=basic_auth())
                    assert r.status_code == status and str(status) in op["responses"], (url, r.json)
                    sent[path] = sent.get(path, 0) + 1
    assert sent["/feedback"] == 1
    # The default model, one per model, one per version; each as JSON and as CSV.
    assert (sent["/predict"], sent["/models/{name}/predict"], sent["/models/{name}/versions/{version}/predict"]) == (
        2,
        4,
        6,
    )


def test_document_reveals_no_infrastructure(two_models, spec):
    """No filesystem path, host, library version or digest: the document is public."""
    r = two_models.test_client().get("/openapi.json", base_url="http://sibyl-internal.example:8123")
    text = r.text
    root = two_models.config["MODEL_DIR"]
    for secret in (root, "/tmp", "sibyl-internal", "8123", "localhost", "joblib", "sha256", "sklearn_version"):
        assert secret not in text
    for model in two_models.extensions["sibyl.registry"].loaded():
        assert str(model.path) not in text and model.sha256 not in text
    assert spec["servers"] == [{"url": "/"}]


class _Refs(HTMLParser):
    """Collects every src and href of a page, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.urls += [value for key, value in attrs if key in ("src", "href") and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_docs_is_swagger_ui_from_local_files(client):
    """/docs needs no credentials and no network: every URL it names is this server's, and answers."""
    r = client.get("/docs")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = _Refs()
    page.feed(r.text)
    assert page.urls, "the page loads Swagger UI's files"
    assert not re.search(r"https?://|//[a-z]", r.text, re.I)  # nothing absolute, nothing protocol-relative
    types = {}
    for url in page.urls:
        assert url.startswith("/") and not url.startswith("//")
        asset = client.get(url)
        assert asset.status_code == 200, url
        types[url.rsplit(".", 1)[-1]] = asset.mimetype
    assert types["css"] == "text/css"
    assert types["js"] in {"text/javascript", "application/javascript"}
    assert '"/openapi.json"' in "".join(page.scripts) and "validatorUrl: null" in "".join(page.scripts)


def test_openapi_and_docs_are_public(client):
    """Both answer without credentials (the predict routes they describe still need them)."""
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.post("/predict", json={"features": [[1, 2, 3, 4]]}).status_code == 401
