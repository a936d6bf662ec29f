"""Bad input: each failure is a 4xx in the one error shape, with a message that says how to fix it."""

import numpy as np
import orjson
import pytest
from conftest import basic_auth, served_model

from app.errors import ApiError
from app.validation import to_matrix

ROW = [5.1, 3.5, 1.4, 0.2]
NAMED = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
SECRET = "do-not-echo-7f3a"

CASES = [
    # (id, body, status, code, words the message must contain)
    ("wrong-width", {"features": [ROW, ROW, ROW, [1, 2, 3, 4, 5]]}, 400, "invalid_input",
     "features[3] has 5 values; the model expects 4: sepal_length, sepal_width, petal_length, petal_width"),
    ("string-value", {"features": [[1, 2, SECRET, 4]]}, 400, "invalid_input", "features[0][2] is a string"),
    ("bool-value", {"features": [[1, 2, True, 4]]}, 400, "invalid_input", "features[0][2] is a boolean"),
    ("null-value", {"features": [[1, None, 3, 4]]}, 400, "invalid_input", "features[0][1] is null"),
    ("nested-list", {"features": [[1, [2], 3, 4]]}, 400, "invalid_input", "features[0][1] is a list"),
    ("row-not-list", {"features": [ROW, "abc"]}, 400, "invalid_input", "features[1] is a string"),
    ("empty-rows", {"features": []}, 400, "invalid_input", "non-empty list of rows"),
    ("rows-not-list", {"features": {"a": 1}}, 400, "invalid_input", "non-empty list of rows"),
    ("no-rows-field", {}, 400, "invalid_input", "exactly one of"),
    ("both-fields", {"features": [ROW], "instances": [ROW]}, 400, "invalid_input", "exactly one of"),
    ("typo-field", {"feature": [ROW]}, 400, "invalid_input", "unknown field 'feature'"),
    ("missing-name", {"instances": [{k: v for k, v in NAMED.items() if k != "petal_width"}]}, 400,
     "invalid_input", "instances[0] is missing 'petal_width'"),
    ("extra-name", {"instances": [{**NAMED, "colour": 1}]}, 400, "invalid_input", "unknown field 'colour'"),
    ("named-wrong-type", {"instances": [{**NAMED, "petal_width": "wide"}]}, 400, "invalid_input",
     "instances[0]['petal_width'] is a string"),
    ("probabilities-not-bool", {"features": [ROW], "probabilities": "yes"}, 400, "invalid_input",
     "'probabilities' must be true or false"),
    ("body-not-object", [ROW], 400, "invalid_json", "must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_body_is_explained(client, body, status, code, words):
    """Each malformed body gets the right status, code, and a message naming the fix, without echoing input."""
    r = client.post("/predict", json=body, headers=basic_auth())
    assert r.status_code == status
    assert r.json["error"]["code"] == code
    assert words in r.json["error"]["message"]
    assert SECRET not in r.get_data(as_text=True)


@pytest.mark.parametrize(
    "raw",
    [b'{"features": [[NaN, 1, 2, 3]]}', b'{"features": [[Infinity, 1, 2, 3]]}', b'{"features": [[1e400, 1, 2, 3]]}',
     b'{"features": [[1, 2, 3, 4]]', b"", b"\xff\xfe"],
    ids=["nan", "infinity", "overflow", "truncated", "empty", "not-utf8"],
)  # fmt: skip
def test_non_json_and_non_finite_are_400(client, raw):
    """NaN, Infinity, numbers past float64 and broken JSON are refused as invalid JSON."""
    r = client.post("/predict", data=raw, headers=basic_auth(), content_type="application/json")
    assert r.status_code == 400
    assert r.json["error"]["code"] == "invalid_json"


def test_huge_integer_overflows_cleanly(client):
    """An integer too large for float64 is a 400, not a 500."""
    raw = b'{"features": [[1' + b"0" * 400 + b", 1, 2, 3]]}"
    r = client.post("/predict", data=raw, headers=basic_auth(), content_type="application/json")
    assert r.status_code == 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client, content_type):
    """Only JSON bodies are accepted."""
    r = client.post("/predict", data=orjson.dumps({"features": [ROW]}), headers=basic_auth(), content_type=content_type)
    assert r.status_code == 415
    assert r.json["error"]["code"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(client):
    """Content-Type: application/json; charset=utf-8 is still JSON (Postman sends it)."""
    r = client.post("/predict", data=orjson.dumps({"features": [ROW]}), headers=basic_auth(),
                    content_type="application/json; charset=utf-8")  # fmt: skip
    assert r.status_code == 200


def test_too_many_rows_is_413(make_app):
    """More rows than MAX_ROWS is refused with the limit in the message."""
    client = make_app(MAX_ROWS=3).test_client()
    r = client.post("/predict", json={"features": [ROW] * 4}, headers=basic_auth())
    assert r.status_code == 413
    assert r.json["error"]["code"] == "too_many_rows"
    assert "at most 3" in r.json["error"]["message"]
    assert client.post("/predict", json={"features": [ROW] * 3}, headers=basic_auth()).status_code == 200


def test_body_over_limit_is_413(make_app):
    """A body past MAX_BODY_BYTES is refused before it is parsed."""
    client = make_app(MAX_CONTENT_LENGTH=1000).test_client()
    r = client.post("/predict", json={"features": [ROW] * 100}, headers=basic_auth())
    assert r.status_code == 413
    assert r.json["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_bad_probabilities_query_is_400(client, value):
    """?probabilities= takes true/false only."""
    r = client.post(f"/predict?probabilities={value}", json={"features": [ROW]}, headers=basic_auth())
    assert r.status_code == 400


@pytest.mark.parametrize("value", [1, 1.0, -0.0, 1e-300, 1.7976931348623157e308, -(2**63)])
def test_finite_extremes_are_accepted(client, value):
    """Any finite float64 (and ints that fit one) is a valid value, never a 400. The largest overflows the demo
    model's scaler, so the model has no answer for it: 422 non_finite_answer, with or without probabilities."""
    r = client.post("/predict", json={"features": [[value, 1, 1, 1]]}, headers=basic_auth())
    assert r.status_code == (422 if value == 1.7976931348623157e308 else 200), r.json


def test_long_field_names_are_cut_short(client):
    """A field name is quoted in the message only up to 40 characters."""
    r = client.post("/predict", json={"x" * 5000: [[1, 2, 3, 4]]}, headers=basic_auth())
    assert r.status_code == 400 and len(r.get_data()) < 400


# A batch larger than validation's bulk check (_BULK_FROM rows) with one bad row: the bulk check finds it, and the row
# by row check names it exactly as for a small request.
BATCH_CASES = [
    ("wrong-width", [1, 2, 3, 4, 5], "features[10] has 5 values; the model expects 4"),
    ("string-value", [1, 2, SECRET, 4], "features[10][2] is a string"),
    ("bool-value", [1, 2, True, 4], "features[10][2] is a boolean"),
    ("null-value", [1, None, 3, 4], "features[10][1] is null"),
    ("nested-list", [1, [2], 3, 4], "features[10][1] is a list"),
    ("row-not-list", "abc", "features[10] is a string"),
]


@pytest.mark.parametrize(("bad", "words"), [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_a_bad_row_in_a_large_batch_is_named(client, bad, words):
    """12 rows, the 11th bad: a 400 naming it, as a small request gets."""
    rows = [[5.0 + i / 10, 3, 1.5, 0.2] for i in range(12)]
    rows[10] = bad
    r = client.post("/predict", data=orjson.dumps({"features": rows}), headers=basic_auth(),
                    content_type="application/json")  # fmt: skip
    assert r.status_code == 400
    assert r.json["error"]["code"] == "invalid_input"
    assert words in r.json["error"]["message"]
    assert SECRET not in r.get_data(as_text=True)


def test_a_large_batch_answers_as_the_model_does(client):
    """Ints and floats, 12 rows (converted in bulk): exactly the backend's answers for the same rows as float64."""
    rows = [[4 + i % 4, 2.5 + i / 10, 1 + i % 6, 0.1 * (i % 25)] for i in range(12)]
    r = client.post("/predict", json={"features": rows, "probabilities": True}, headers=basic_auth())
    assert r.status_code == 200
    model = served_model(client.application)
    labels, p = model.backend.predict(np.array(rows, dtype=np.float64), True)
    assert r.json["predictions"] == labels.tolist()
    assert r.json["probabilities"] == [dict(zip(model.class_keys, row)) for row in p.tolist()]


@pytest.mark.parametrize("n", [1, 12], ids=["row-by-row", "bulk"])
def test_an_integer_past_float64_is_a_400_either_way(client, n):
    """An integer too large for float64 (orjson refuses one in JSON; a protocol's own decoder may not) is the same 400
    whether the rows are converted one by one or in bulk."""
    rows = [[5.0, 3.0, 1.5, 0.2] for _ in range(n)]
    rows[-1][1] = 10**400
    with pytest.raises(ApiError) as e:
        to_matrix(rows, served_model(client.application), 1000)
    assert (e.value.status, e.value.code) == (400, "invalid_input")
    assert "too large for a 64-bit float" in e.value.message
