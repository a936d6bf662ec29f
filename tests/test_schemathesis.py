"""schemathesis fuzzes every operation of the live GET /openapi.json with all its checks: the service keeps the
document's promises (statuses, bodies, headers, auth), and answers no request with a 5xx."""

import base64
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import requests
from conftest import ADMIN, ADMIN_KEY, KEY, USER

# Feedback on, so POST /feedback runs its real lookup (its example names an unknown request: 404).
FEEDBACK = {"FEEDBACK_TTL": "600"}
CONFIG = Path(__file__).with_name("schemathesis.toml")
# Per operation: bounded, so the run stays around a minute on two busy cores. A fixed seed makes a failure in CI
# the same failure on a laptop (`st replay` needs the same run); change it to explore other inputs.
MAX_EXAMPLES, SEED = 60, 20261201


def _basic(user: str, key: str) -> str:
    """An Authorization header value for basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


def test_live_service_keeps_the_documented_contract(live_server, redis_url, demo_model_dir, tmp_path):
    """schemathesis run --checks all against gunicorn + Redis serving the demo registry exits 0: zero failures."""
    server = live_server(env={"MODEL_PATH": "", "MODEL_DIR": str(demo_model_dir), "REDIS_URL": redis_url, **FEEDBACK})
    report = tmp_path / "schemathesis.xml"
    env = {
        **os.environ,
        "SIBYL_ST_AUTH": _basic(USER, KEY),
        "SIBYL_ST_ADMIN_AUTH": _basic(ADMIN, ADMIN_KEY),
        # Loopback only: no proxy may stand between schemathesis and the server.
        "NO_PROXY": "*",
    }
    args = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--workers",
        "1",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",  # no .hypothesis/ folder left in the tree; every run starts from the seed alone
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-12000:]
    suite = ElementTree.parse(report).getroot()  # noqa: S314
    assert (suite.get("failures"), suite.get("errors")) == ("0", "0")
    # Every operation the document lists was tested, plus the stateful links; schemathesis leaves out the one it
    # loaded the document from (seen: "12 selected / 12 total" of 13; its own filter includes it), which
    # test_openapi and the Postman collection cover.
    spec = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    documented = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    tested = {case.get("name") for case in suite.iter("testcase")}
    assert tested == documented - {"GET /openapi.json"} | {"Stateful tests"}
    # The server's own log agrees: no request it answered was a 5xx.
    answered = [line["status"] for line in server.request_lines()]
    assert len(answered) > len(documented) * MAX_EXAMPLES
    assert not [status for status in answered if status >= 500]
