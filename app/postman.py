"""GET /openapi.json as a Postman v2.1 collection and environment, every request with tests (`cli postman`)."""

import json
import re
import uuid

SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
# Every id is derived from a name, so the same document always gives the same files (a test compares them).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "sibyl.postman")
_SAFE = frozenset({"get", "head", "options"})


def _id(*parts: str) -> str:
    """A stable id for a named thing in the collection."""
    return str(uuid.uuid5(_NAMESPACE, " ".join(parts)))


def collection(doc: dict) -> dict:
    """The collection: one folder per tag, one request per (operation, request media type, example), each with tests;
    plus, per operation with a JSON body, a wrong key (401) and a malformed body (400), both in the error shape."""
    folders: dict[str, list[dict]] = {}
    for path, ops in sorted(doc["paths"].items()):
        for method, op in sorted(ops.items()):
            tag = (op.get("tags") or ["api"])[0]
            folders.setdefault(tag, []).extend(_requests(doc, path, method, op))
    info = doc.get("info", {})
    return {
        "info": {
            "_postman_id": _id("collection", info.get("title", "API")),
            "name": info.get("title", "API"),
            "description": f"Generated from GET /openapi.json by `python -m app.cli postman`; do not edit by hand. "
            f"{info.get('description', '')}".strip(),
            "schema": SCHEMA,
        },
        # The caller: a predict-role user. Public operations say noauth; admin reads use the admin's key.
        "auth": _basic("user", "key"),
        "item": [{"id": _id("folder", tag), "name": tag, "item": folders[tag]} for tag in sorted(folders)],
    }


def environment(name: str, base_url: str, user: str, admin: str) -> dict:
    """The environment the collection reads: where Sibyl listens, and who calls it (keys left blank to fill in)."""
    values = [("baseUrl", base_url, "default"), ("user", user, "default"), ("key", "", "secret")]
    values += [("adminUser", admin, "default"), ("adminKey", "", "secret")]
    return {
        "id": _id("environment", name),
        "name": name,
        "values": [{"key": key, "value": value, "type": kind, "enabled": True} for key, value, kind in values],
        "_postman_variable_scope": "environment",
    }


def assertions(coll: dict) -> int:
    """How many assertions a run of the collection executes: one per pm.test, as newman counts them."""
    return sum(line.lstrip().startswith("pm.test(") for item in items(coll) for line in script_lines(item))


def items(node: dict) -> list[dict]:
    """Every request of a collection or folder, depth first."""
    return [leaf for child in node.get("item", []) for leaf in ([child] if "request" in child else items(child))]


def script_lines(item: dict) -> list[str]:
    """The lines of an item's test script."""
    return [line for event in item.get("event", []) if event["listen"] == "test" for line in event["script"]["exec"]]


def _requests(doc: dict, path: str, method: str, op: dict) -> list[dict]:
    """The requests for one operation: each example body with its media type (or one request without a body)."""
    ok_status, ok = _success(op)
    auth = _auth(op, method)
    expected = ok_status
    label = f"{method.upper()} {path}"
    if auth is None and "403" in op["responses"] and method not in _SAFE:
        # An admin action that changes the server (POST /admin/reload replaces every worker): a collection run must
        # not roll out, so it checks the refusal a predict key gets; set this request's auth to roll out for real.
        expected, ok, label = "403", _resolve(op["responses"]["403"], doc), f"{label} (predict key: refused)"
    bodies = _bodies(op) or [(None, None, None, None)]
    made: list[dict] = []
    negated = False  # the negative requests go with the operation's first JSON example
    for media, key, value, status in bodies:
        params = _path_values(doc, op, key)
        name = f"{label} [{key}]" if key and len(bodies) > 1 else label
        name += f" ({media})" if media and len({b[0] for b in bodies}) > 1 else ""
        # An example may name the documented status it answers (x-status): POST /feedback's names no real request.
        answer = (str(status), _resolve(op["responses"][str(status)], doc)) if status else (expected, ok)
        tests = _status_tests(int(answer[0]), answer[1], doc)
        rows = _row_count(value)
        if answer[0].startswith("2") and rows is not None and "predictions" in _schema_properties(ok, doc):
            tests += [
                f'pm.test("{rows} prediction(s), one per row sent", function () {{',
                f"    pm.expect(pm.response.json().predictions).to.have.lengthOf({rows});",
                "});",
            ]
        made.append(_item(name, method, path, params, auth, media, value, tests, op.get("summary", "")))
        if media == "application/json" and not negated and "401" in op["responses"]:
            made += _negatives(doc, op, method, path, params, auth, value)
            negated = True
    return made


def _negatives(doc: dict, op: dict, method: str, path: str, params: dict, auth: dict | None, value) -> list[dict]:
    """A wrong key answers 401 and a body that is not JSON answers 400, each in the operation's error shape."""
    label = f"{method.upper()} {path}"
    wrong = {"type": "basic", "basic": [_var("username", "{{user}}"), _var("password", "not-the-key")]}
    made = [
        _item(
            f"{label} (wrong key: 401)",
            method,
            path,
            params,
            wrong,
            "application/json",
            value,
            _status_tests(401, _resolve(op["responses"]["401"], doc), doc),
            "A wrong key is refused before the body is read, in this protocol's error shape.",
        )
    ]
    if "400" in op["responses"]:
        made.append(
            _item(
                f"{label} (malformed JSON: 400)",
                method,
                path,
                params,
                auth,
                "application/json",
                '{"cut short": [',
                _status_tests(400, _resolve(op["responses"]["400"], doc), doc),
                "A body that is not JSON is a 400 in this protocol's error shape, never a 500.",
            )
        )
    return made


def _item(name, method, path, params, auth, media, value, tests, description) -> dict:
    """One request of the collection with its test script."""
    # A parameter may be part of a segment ("/v1/models/{name}:predict"), so it is replaced wherever it stands.
    filled = re.sub(r"\{([^{}]+)\}", lambda m: params.get(m.group(1), m.group(0)), path)
    segments = filled.strip("/").split("/")
    request: dict = {
        "method": method.upper(),
        "header": [],
        "url": {
            "raw": "{{baseUrl}}/" + "/".join(segments),
            "host": ["{{baseUrl}}"],
            "path": segments,
        },
        "description": description,
    }
    if auth is not None:
        request["auth"] = auth
    if media is not None:
        raw = value if isinstance(value, str) else json.dumps(value, indent=2)
        request["header"].append({"key": "Content-Type", "value": media})
        language = "json" if media == "application/json" else "text"
        request["body"] = {"mode": "raw", "raw": raw, "options": {"raw": {"language": language}}}
    return {
        "id": _id("request", name),
        "name": name,
        "event": [{"listen": "test", "script": {"id": _id("test", name), "type": "text/javascript", "exec": tests}}],
        "request": request,
    }


def _status_tests(status: int, response: dict, doc: dict) -> list[str]:
    """Tests for an answer: its status, its media type, and every field the documented schema requires."""
    lines = [f'pm.test("status is {status}", function () {{', f"    pm.response.to.have.status({status});", "});"]
    media = next(iter(response.get("content", {})), None)
    if media is None:
        return lines
    lines += [
        f'pm.test("Content-Type is {media}", function () {{',
        f'    pm.expect(pm.response.headers.get("Content-Type")).to.include("{media}");',
        "});",
    ]
    for field in _required(response["content"][media].get("schema", {}), doc):
        lines += [
            f'pm.test("body has {field}", function () {{',
            f'    pm.expect(pm.response.json()).to.have.nested.property("{field}");',
            "});",
        ]
    return lines


def _required(schema: dict, doc: dict, prefix: str = "") -> list[str]:
    """The dotted paths of every field a schema requires, nested objects' own required fields included."""
    schema = _resolve(schema, doc)
    fields = []
    for name in schema.get("required", []):
        fields.append(prefix + name)
        sub = schema.get("properties", {}).get(name)
        if sub is not None:
            fields += _required(sub, doc, f"{prefix}{name}.")
    return fields


def _schema_properties(response: dict, doc: dict) -> dict:
    """The top-level properties of a response's JSON schema ({} when it has none)."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return _resolve(schema, doc).get("properties", {})


def _resolve(node: dict, doc: dict) -> dict:
    """A local $ref followed to what it names."""
    while "$ref" in node:
        target = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _success(op: dict) -> tuple[str, dict]:
    """The documented 2xx status and its response."""
    status = min(s for s in op["responses"] if s.startswith("2"))
    return status, op["responses"][status]


def _auth(op: dict, method: str) -> dict | None:
    """Postman auth for an operation: none for a public one, the admin's for an admin read, else None (the
    collection's, inherited)."""
    if not op.get("security"):
        return {"type": "noauth"}  # also shows it is public: no credentials are sent
    if "403" in op["responses"] and method in _SAFE:
        return _basic("adminUser", "adminKey")
    return None


def _basic(user: str, key: str) -> dict:
    """Basic auth from two environment variables."""
    return {"type": "basic", "basic": [_var("username", f"{{{{{user}}}}}"), _var("password", f"{{{{{key}}}}}")]}


def _var(key: str, value: str) -> dict:
    """One key/value entry of a Postman auth block."""
    return {"key": key, "value": value, "type": "string"}


def _bodies(op: dict) -> list[tuple[str, str | None, object, int | None]]:
    """(media type, example key, value, its x-status or None) for every example of every request media type, in a
    stable order."""
    found = []
    for media, content in sorted(op.get("requestBody", {}).get("content", {}).items()):
        if "example" in content:
            found.append((media, None, content["example"], None))
        for key, example in sorted(content.get("examples", {}).items()):
            if "value" in example:
                found.append((media, key, example["value"], example.get("x-status")))
    return found


def _path_values(doc: dict, op: dict, key: str | None) -> dict[str, str]:
    """Each path parameter's value: from the example's key when it names them all ("iris", "iris 2"), else each
    parameter's first documented example."""
    params = [p for p in op.get("parameters", []) if p.get("in") == "path"]
    words = key.split(" ") if key else []
    if params and len(words) == len(params):
        return {p["name"]: word for p, word in zip(params, words)}
    values = {}
    for p in params:
        examples = p.get("examples") or {}
        first = next(iter(sorted(examples)), None)
        values[p["name"]] = str(examples[first]["value"]) if first is not None else str(p.get("example", ""))
    return values


def _row_count(value) -> int | None:
    """How many rows an example body sends, when its shape says so: a JSON object with one list of rows (a flat list
    of numbers is one row) or a "data" list inside one object, or CSV text after its header; None when unsure."""
    if isinstance(value, str):
        lines = [line for line in value.splitlines() if line.strip()]
        return len(lines) - 1 if len(lines) > 1 else None
    if not isinstance(value, dict):
        return None
    lists = [v for v in value.values() if isinstance(v, list)]
    if len(lists) == 1:
        rows = lists[0]
        return 1 if rows and not isinstance(rows[0], list | dict) else len(rows)
    inner = [v for v in value.values() if isinstance(v, dict)]
    if not lists and len(inner) == 1 and isinstance(inner[0].get("data"), list):
        return len(inner[0]["data"])
    return None


COLLECTION_FILE = "sibyl.postman_collection.json"
ENVIRONMENT_FILE = "sibyl.postman_environment.json"


def files(model_dir: str, base_url: str = "http://127.0.0.1:8000", user: str = "demo", admin: str = "admin") -> dict:
    """The collection and environment files for the registry in model_dir, as the text to write (file name -> text).
    Defaults: `make run`'s address and user."""
    from app import create_app
    from app.openapi import document

    # The document needs the registry and routes only: no Redis, no compiled backend, and a user nobody can be
    # (no key hashes to zeros), because create_app insists on one.
    config = {"MODEL_DIR": model_dir, "MODEL_PATH": "", "REDIS_URL": "", "INFERENCE_BACKEND": "sklearn"}
    config |= {"SIBYL_USERS": f"postman:sha256:{'0' * 64}", "SIBYL_USERS_FILE": ""}
    doc = document(create_app(config))
    made = {
        COLLECTION_FILE: collection(doc),
        ENVIRONMENT_FILE: environment(f"{doc['info']['title']} (local)", base_url, user, admin),
    }
    return {name: json.dumps(data, indent=2) + "\n" for name, data in made.items()}
