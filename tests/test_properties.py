"""Property-based tests (hypothesis) of validation and of every protocol's translator: any JSON body is a 200 with one
answer per row sent, or a 4xx in the protocol's error shape, never a 5xx; valid rows get the model's own answers."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app import backends, create_app
from app.errors import ApiError
from app.validation import to_matrix
from tests.conftest import basic_auth, iris_settings, served_model

# Reproducible in CI: the same examples every run, none remembered between runs (no .hypothesis/ folder).
PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROUTES = {
    "native": "/predict",
    "mlflow": "/invocations",
    "kserve": "/v1/models/iris:predict",
    "v2": "/v2/models/iris/infer",
}


@pytest.fixture(scope="module")
def app(iris_path):
    """The app serving iris (its default backend), shared by every example."""
    return create_app(iris_settings(iris_path))


@pytest.fixture(scope="module")
def client(app):
    """A test client of that app."""
    return app.test_client()


# --- strategies ---

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(FEATURES)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(FEATURES), inner, max_size=6)
    ),
    max_leaves=30,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = finite | st.integers(-(2**63), 2**63 - 1)
# Rows that are almost right: the right width, or one off; numbers, or now and then anything.
near_rows = st.lists(
    st.lists(numbers | scalars, min_size=3, max_size=5)
    | st.fixed_dictionaries({n: numbers | scalars for n in FEATURES}),
    max_size=5,
)
rows_like = near_rows | json_values
rows4 = st.lists(st.lists(numbers, min_size=4, max_size=4), min_size=1, max_size=5)
columns = st.dictionaries(
    st.sampled_from(FEATURES) | st.text(max_size=4), st.lists(numbers, max_size=4) | numbers | json_values, max_size=5
)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", *FEATURES]) | json_values,
        "shape": st.lists(st.integers(-1, 6), max_size=3) | json_values,
        "datatype": st.sampled_from(["FP64", "FP32", "FP16", "INT64", "INT8", "UINT8", "BOOL", "BYTES"]) | json_values,
        "data": rows_like | st.lists(numbers | scalars, max_size=12),
    },
    optional={"parameters": json_values},
)
split = st.fixed_dictionaries(
    {"columns": st.permutations(FEATURES) | json_values, "data": rows_like}, optional={"index": json_values}
)
# Per protocol: any JSON value, the protocol's own keys holding near-valid or arbitrary values, or valid rows.
BODIES = {
    "native": json_values
    | st.fixed_dictionaries({"features": rows4})
    | st.dictionaries(st.sampled_from(["features", "instances", "data", "probabilities"]), rows_like, max_size=2),
    "mlflow": json_values
    | st.fixed_dictionaries({"inputs": rows4})
    | st.dictionaries(
        st.sampled_from(["instances", "inputs", "dataframe_records", "params"]), rows_like | columns, max_size=2
    )
    | st.fixed_dictionaries({"dataframe_split": split}),
    "kserve": json_values
    | st.fixed_dictionaries({"instances": rows4})
    | st.dictionaries(st.sampled_from(["instances", "inputs"]), rows_like | columns, max_size=2),
    "v2": json_values
    | rows4.map(lambda rows: {"inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}]})
    | st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=4) | json_values},
        optional={"outputs": json_values, "parameters": json_values, "id": json_values},
    ),
}
valid_rows = st.lists(st.lists(finite, min_size=4, max_size=4), min_size=1, max_size=20)


# --- what a 200 must hold ---


def rows_sent(protocol: str, body: dict) -> int:
    """How many rows a body that was answered with 200 sent, by the protocol's documented rules."""
    if protocol == "v2":
        return body["inputs"][0]["shape"][0]
    if protocol == "mlflow" and "dataframe_split" in body:
        return len(body["dataframe_split"]["data"])
    field = next(k for k in body if k not in ("probabilities", "params"))
    rows = body[field]
    if isinstance(rows, dict):  # columns: each a list of values, or one value for one row
        first = next(iter(rows.values()))
        return len(first) if isinstance(first, list) else 1
    flat = rows and type(rows[0]) in (int, float)
    return 1 if flat else len(rows)


def predictions(protocol: str, answer: dict) -> list:
    """The answers in a 200, whatever the protocol."""
    if protocol == "v2":
        return answer["outputs"][0]["data"]
    return answer["predictions"]


def assert_error_shape(protocol: str, status: int, answer: dict) -> None:
    """A 4xx in the protocol's own error shape."""
    assert 400 <= status < 500, (status, answer)
    if protocol == "native":
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message", "request_id"}
    elif protocol == "mlflow":
        assert set(answer) == {"error_code", "message"} and answer["error_code"] == "BAD_REQUEST"
    else:
        assert set(answer) == {"error"} and isinstance(answer["error"], str)


def post(client, protocol: str, body: object):
    """POST a JSON body (Python's json writes any int, however big) to the protocol's default route."""
    data = json.dumps(body)
    return client.post(ROUTES[protocol], data=data, content_type="application/json", headers=basic_auth())


# --- properties ---


@pytest.mark.parametrize("protocol", ROUTES)
@PROPERTY
@given(data=st.data())
def test_any_json_body_is_an_answer_per_row_or_a_4xx(client, protocol, data):
    """Whatever JSON arrives, the translator and validation answer 200 with one prediction per row, or their 4xx."""
    body = data.draw(BODIES[protocol], label="body")
    r = post(client, protocol, body)
    answer = r.get_json()
    event(f"status {r.status_code}")  # --hypothesis-show-statistics: how often each answer came
    assert r.status_code < 500, (r.status_code, answer)
    if r.status_code == 200:
        assert len(predictions(protocol, answer)) == rows_sent(protocol, body)
    else:
        assert_error_shape(protocol, r.status_code, answer)


@pytest.mark.parametrize("protocol", ROUTES)
@PROPERTY
@given(rows=valid_rows)
def test_valid_rows_get_the_models_own_answers(app, client, protocol, rows):
    """Rows of the model's width and finite floats: each protocol answers what the estimator predicts for them; when
    the estimator has no finite answer (values so large that scaling them overflows), a 422 non_finite_answer."""
    body = {
        "native": {"features": rows},
        "mlflow": {"dataframe_split": {"columns": FEATURES, "data": rows}},
        "kserve": {"instances": [dict(zip(FEATURES, row)) for row in rows]},
        "v2": {"inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}]},
    }[protocol]
    r = post(client, protocol, body)
    estimator, X = served_model(app).estimator, np.array(rows)
    try:
        with np.errstate(all="ignore"):
            expected = estimator.predict(X).tolist()
            finite = bool(np.isfinite(estimator.predict_proba(X)).all())
    except ValueError:  # scikit-learn refuses the infinities its own scaler made
        expected, finite = None, False
    if not finite:
        assert r.status_code == 422 and "finite" in json.dumps(r.get_json()), r.get_json()
        return
    assert r.status_code == 200, r.get_json()
    assert predictions(protocol, r.get_json()) == expected


@PROPERTY
@given(rows=json_values | near_rows)
def test_validation_gives_a_finite_matrix_or_a_4xx(app, rows):
    """to_matrix alone: any JSON value is a finite float64 matrix of the model's width, or an ApiError 4xx."""
    model = served_model(app)
    try:
        X = to_matrix(rows, model, max_rows=1000)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert X.dtype == np.float64 and X.ndim == 2 and X.shape[1] == 4 and np.isfinite(X).all()
    assert len(X) == (1 if type(rows[0]) in (int, float) else len(rows))


# Probabilities as a backend may return them: near-ties, exact ties, NaN, both infinities, any width.
_PROBABILITY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 0.5 + 1e-5, 0.5 - 1e-5, 0.5 + 3e-5, 1 / 3]),
)


@PROPERTY
@given(st.integers(2, 5).flatmap(lambda k: st.lists(st.lists(_PROBABILITY, min_size=k, max_size=k), min_size=1)))
def test_near_ties_found_in_python_match_numpys(rows):
    """The compiled backend's few-row near-tie search (in Python) picks exactly the rows numpy's picks, whatever
    the probabilities hold; those rows are the ones scikit-learn answers instead."""
    p = np.asarray(rows, dtype=np.float64)
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as it is to numpy's own search
        expected = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * backends.PROBA_ATOL).tolist()
    assert list(backends._near_ties(p[: backends.SMALL_BATCH])) == [i for i in expected if i < backends.SMALL_BATCH]
