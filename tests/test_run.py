"""`make run` (scripts/run.sh) as a user meets it: a curl for the served model, once it serves; one per folder."""

import base64
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import requests
from conftest import ROOT, basic_auth
from sklearn.linear_model import LinearRegression

from tests.support.servers import free_port


class RunScript:
    """scripts/run.sh in its own process group, its output collected line by line."""

    def __init__(self, env: dict, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["scripts/run.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        """Everything printed so far."""
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        """The output once it holds text; fails if the script exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"run.sh exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.1)
        return self.output()

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it to the whole foreground group; the exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(30)
        finally:
            with_group_gone(self.proc.pid)


def with_group_gone(pgid: int) -> None:
    """Fail (after killing them) if any of the script's processes outlived it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail("gunicorn or Redis outlived make run")


@pytest.fixture
def run_env(tmp_path, make_model):
    """Environment for run.sh serving a MODEL_DIR whose one model (prices 1, not iris) has named features, on a free
    port, state in tmp_path."""
    path = make_model(LinearRegression(), n_features=3, name="prices", classify=False, feature_names=["x", "y", "z"])
    folder = tmp_path / "registry" / "prices" / "1"
    folder.mkdir(parents=True)
    shutil.copy(path, folder / "model.joblib")
    shutil.copy(path.with_suffix(".json"), folder / "model.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIBYL_", "REDIS_", "CACHE_", "MODEL_"))}
    port = free_port()
    env.update(MODEL_DIR=str(tmp_path / "registry"), BIND=f"127.0.0.1:{port}", SIBYL_STATE_DIR=str(tmp_path / "state"))
    env.update(WEB_CONCURRENCY="1")
    return env


@pytest.mark.parametrize("setting", ["MODEL_DIR", "MODEL_PATH"])
def test_make_run_prints_a_working_curl_for_the_served_model(run_env, tmp_path, setting):
    """The printed curl is built from the served model's own features (a registry's default model, or the one
    MODEL_PATH names) and answers 200 as pasted."""
    if setting == "MODEL_PATH":
        registry = Path(run_env.pop("MODEL_DIR"))
        run_env["MODEL_PATH"] = str(registry / "prices" / "1" / "model.joblib")
    run = RunScript(run_env, tmp_path / "run.log")
    try:
        out = run.wait_for("/predict\n")
        assert out.index("sibyl: serving") > out.index("Listening at")  # "serving" only once it answers
        command = out[out.index("  curl") :].split("/predict")[0] + "/predict"
        assert '"x": ' in command and '"z": ' in command and "setosa" not in command
        answer = subprocess.run(["bash", "-c", command.replace("\\\n", " ")], capture_output=True, timeout=30)
        body = orjson.loads(answer.stdout)
        assert body["model"] == {"name": "prices", "version": "1"} and len(body["predictions"]) == 1
        # The demo user scrapes /metrics too: the README's curl of it works as printed.
        scrape = command.split(" -X POST")[0] + " " + command.rsplit(" ", 1)[1].replace("/predict", "/metrics")
        metrics = subprocess.run(["bash", "-c", scrape], capture_output=True, text=True, timeout=30)
        assert 'sibyl_rows_predicted_total{model="prices",version="1"} 1.0' in metrics.stdout
        # And it keeps answers for POST /feedback: the README's example joins.
        user, key = command.split("-u ", 1)[1].split(" ", 1)[0].split(":", 1)
        url = command.rsplit(" ", 1)[1].rsplit("/", 1)[0]
        sent = {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}
        answer = requests.post(url + "/predict", json={"features": [[1, 2, 3]]}, headers=sent, timeout=10)
        truth = {"request_id": answer.headers["X-Request-ID"], "truth": [answer.json()["predictions"][0] + 1]}
        joined = requests.post(url + "/feedback", json=truth, headers=sent, timeout=10)
        assert joined.status_code == 200 and joined.json()["window"]["mae"] == 1.0, (joined.json(), run.output())
        # The web page it points browsers at: the printed address, with the demo user, whose status tab works too.
        page = re.search(r"or open (\S+) in a browser and sign in as (\S+) with that key", run.wait_for("that key"))
        assert page and page[2] == user
        assert requests.get(page[1], headers=sent, timeout=10).headers["Content-Type"].startswith("text/html")
        assert requests.get(page[1] + "status", headers=sent, timeout=10).json()["models"][0]["name"] == "prices"
    finally:
        assert run.interrupt() in (0, 130, -signal.SIGINT)


def test_second_make_run_in_the_same_folder_is_refused(run_env, tmp_path):
    """A second make run would take over the first one's Redis socket: it stops with one line naming the first."""
    first = RunScript(run_env, tmp_path / "first.log")
    try:
        first.wait_for("sibyl: serving")
        second = RunScript({**run_env, "BIND": f"127.0.0.1:{free_port()}"}, tmp_path / "second.log")
        assert second.proc.wait(30) == 1
        (line,) = second.output().splitlines()
        assert re.fullmatch(rf"sibyl: cannot start: make run is already running here \(pid {first.proc.pid}, .*", line)
        assert first.proc.poll() is None  # and the first one still serves
    finally:
        first.interrupt()


def test_first_production_user_is_made_without_a_running_config(tmp_path, make_app):
    """`python -m app.cli create-user` needs no users, model or Redis, so it makes the first production user;
    SIBYL_ENV=production then starts with that file and accepts the printed key."""
    env = {**os.environ, "SIBYL_ENV": "production", "SIBYL_USERS": "", "MODEL_PATH": str(tmp_path / "none.joblib")}
    users = tmp_path / "users"
    made = subprocess.run(
        [".venv/bin/python", "-m", "app.cli", "create-user", "admin", "--file", str(users)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = re.search(r"^key:  (\S+)$", made.stdout, re.M).group(1)
    app = make_app(SIBYL_ENV="production", SIBYL_USERS="", SIBYL_USERS_FILE=str(users))
    r = app.test_client().post("/predict", json={"features": [[5.1, 3.5, 1.4, 0.2]]}, headers=basic_auth("admin", key))
    assert r.status_code == 200


def test_make_run_with_tls_prints_https_addresses_and_a_curl_that_trusts_the_certificate(run_env, tmp_path):
    """With TLS_CERT_FILE and TLS_KEY_FILE, make run waits for the HTTPS listener and prints https:// addresses;
    the curl, pasted as printed, verifies the (self-signed) certificate and predicts."""
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    self_signed = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=127.0.0.1"
    subprocess.run(
        [
            "openssl",
            "req",
            *self_signed.split(),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    run = RunScript(run_env | {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}, tmp_path / "run.log")
    try:
        out = run.wait_for("that key")
        assert f"serving {run_env['MODEL_DIR']} on https://{run_env['BIND']}" in out
        assert f"or open https://{run_env['BIND']}/ in a browser" in out
        command = out[out.index("  curl") :].split("/predict")[0] + "/predict"
        assert f"--cacert {cert}" in command
        answer = subprocess.run(["bash", "-c", command.replace("\\\n", " ")], capture_output=True, timeout=30)
        assert orjson.loads(answer.stdout)["model"] == {"name": "prices", "version": "1"}, answer
    finally:
        assert run.interrupt() in (0, 130, -signal.SIGINT)
