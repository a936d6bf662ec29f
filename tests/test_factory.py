"""The config contract and model loading: verified once at startup, or no start at all."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, USERS, basic_auth, served_model

from app import create_app
from app.registry import ModelError, file_sha256
from config import Config


def test_defaults_come_from_config_and_overrides_win(app):
    """create_app() reads Config, and a mapping overrides it (no test-config class needed)."""
    assert app.config["MAX_ROWS"] == Config.MAX_ROWS == 1000
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    assert app.config["CACHE_TTL"] == 3600
    assert app.config["REDIS_URL"] == ""  # the override from the fixture


def test_model_loaded_once_at_startup(app, iris_path):
    """The model object is built by create_app and reused by every request."""
    model = served_model(app)
    assert (model.name, model.version, model.sha256) == ("iris", "1", file_sha256(iris_path))
    client = app.test_client()
    client.get("/health")
    assert served_model(app) is model


@pytest.fixture
def model_copy(iris_path, tmp_path):
    """A private copy of the iris artifact and metadata to damage."""
    path = tmp_path / "iris.joblib"
    shutil.copy(iris_path, path)
    shutil.copy(iris_path.with_suffix(".json"), path.with_suffix(".json"))
    return path


def damage(path, how):
    """Break an artifact in one of the ways an operator meets."""
    meta_path = path.with_suffix(".json")
    if how == "missing":
        path.unlink()
    elif how == "no-metadata":
        meta_path.unlink()
    elif how == "tampered":
        path.write_bytes(path.read_bytes() + b"\0")
    elif how == "garbage":
        path.write_bytes(b"not a pickle")
        meta = json.loads(meta_path.read_text())
        meta["sha256"] = file_sha256(path)
        meta_path.write_text(json.dumps(meta))
    elif how == "bad-metadata":
        meta_path.write_text("{not json")
    elif how == "world-writable":
        path.chmod(0o666)


@pytest.mark.parametrize(
    ("how", "words"),
    [("missing", "does not exist"), ("no-metadata", "metadata"), ("tampered", "has sha256"),
     ("garbage", "could not be loaded"), ("bad-metadata", "iris.json is unreadable"),
     ("world-writable", "world-writable")],
)  # fmt: skip
def test_bad_model_stops_startup_naming_the_file(model_copy, how, words):
    """Every way a model can be unusable stops create_app with one message naming the file."""
    damage(model_copy, how)
    with pytest.raises(ModelError) as e:
        create_app({"MODEL_PATH": str(model_copy), "SIBYL_USERS": USERS})
    assert words in str(e.value) and str(model_copy.parent) in str(e.value)
    assert "\n" not in str(e.value)


def test_sha256_pin_must_match(model_copy):
    """MODEL_SHA256 from deployment config must equal the artifact's digest."""
    with pytest.raises(ModelError, match="MODEL_SHA256"):
        create_app({"MODEL_PATH": str(model_copy), "SIBYL_USERS": USERS, "MODEL_SHA256": "0" * 64})
    good = create_app({"MODEL_PATH": str(model_copy), "SIBYL_USERS": USERS, "MODEL_SHA256": file_sha256(model_copy)})
    assert served_model(good).name == "iris"


def test_gunicorn_refuses_to_start_with_one_clear_line(model_copy, tmp_path):
    """Under gunicorn a tampered model exits non-zero with one line naming the file and no traceback."""
    damage(model_copy, "tampered")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MODEL_PATH": str(model_copy), "SIBYL_USERS": USERS}
    env["BIND"] = "127.0.0.1:0"
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "sibyl: cannot start" in line]
    assert len(lines) == 1 and str(model_copy) in lines[0]
    assert "Traceback" not in proc.stderr


def test_numeric_strings_in_a_mapping_become_numbers(make_app):
    """A mapping may carry numbers as strings, as the environment does."""
    app = make_app(MAX_ROWS="3", CACHE_RETRY_SECONDS="0.5")
    assert (app.config["MAX_ROWS"], app.config["CACHE_RETRY_SECONDS"]) == (3, 0.5)
    rows = [[5.1, 3.5, 1.4, 0.2]] * 4
    assert app.test_client().post("/predict", json={"features": rows}, headers=basic_auth()).status_code == 413


def test_register_makes_a_bare_joblib_servable(make_app, tmp_path):
    """`register` writes the metadata a plain joblib file lacks; the app then serves it."""
    import joblib
    from click.testing import CliRunner
    from sklearn.linear_model import LogisticRegression

    from app.cli import register

    path = tmp_path / "churn.joblib"
    joblib.dump(LogisticRegression().fit([[0, 0], [1, 1], [0, 1], [1, 0]], ["stay", "go", "stay", "go"]), path)
    result = CliRunner().invoke(register, [str(path), "--version", "7", "--features", "tenure,spend"])
    assert result.exit_code == 0, result.output
    client = make_app(MODEL_PATH=str(path)).test_client()
    r = client.post("/predict", json={"instances": [{"spend": 1, "tenure": 1}]}, headers=basic_auth())
    assert r.json["model"] == {"name": "churn", "version": "7"}
    assert r.json["predictions"][0] in {"stay", "go"}
