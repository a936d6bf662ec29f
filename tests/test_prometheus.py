"""The monitoring Sibyl ships (deploy/prometheus, deploy/grafana) against the metrics it serves: promtool's checks and
the alerts' unit tests, the metric names and labels every query uses, and a real Prometheus running the config."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app import drift, feedback
from app.metrics import Metrics
from tests.support.servers import DEPLOY, ROOT, Prometheus, shipped_jobs, sibyl_prometheus_config


# ---- THE METRIC CONTRACT ------------------------------------------------------------------------------------------
# Metric name -> its labels (Prometheus adds job and instance), as app.metrics really registers them, so the
# dashboards and alerts are held to what the service exports. Multiprocess mode adds pid to the liveall gauge.
# drift.py and feedback.py declare theirs at module level.
def _labels_of(holder: object) -> dict[str, set[str]]:
    """Each metric object's name and label names (of a Metrics, or a module), read from the objects themselves."""
    out = {}
    for value in vars(holder).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            out[name] = set(value._labelnames)
    return out


CONTRACT: dict[str, set[str]] = (
    _labels_of(Metrics()) | _labels_of(drift) | _labels_of(feedback) | {"sibyl_process_resident_memory_bytes": {"pid"}}
)
HISTOGRAMS = {"sibyl_request_duration_seconds", "sibyl_prediction_duration_seconds"}
# --------------------------------------------------------------------------------------------------------------------

TARGET_LABELS = {"job", "instance"}


def exposed_series() -> dict[str, set[str]]:
    """Series names a scrape of the contract yields, with their labels: a histogram as _bucket (plus le), _sum and
    _count; its bare name is no series, so a query naming it finds nothing."""
    series = {}
    for name, labels in CONTRACT.items():
        if name in HISTOGRAMS:
            series |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels}
        else:
            series[name] = labels
    return series


SERIES = exposed_series()
RULES = yaml.safe_load((DEPLOY / "sibyl-rules.yml").read_text())
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"] if "alert" in rule]
RULES_TEST = ROOT / "tests" / "prometheus" / "rules.test.yml"
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "sibyl.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
VARIABLES = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend format) for every panel target; a variable's label_values(selector, label) counts as
    its selector."""
    queries = [(f"panel {p['title']!r}", t["expr"], t.get("legendFormat", "")) for p in PANELS for t in p["targets"]]
    for variable in VARIABLES:
        selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
        assert selector, f"variable {variable['name']}: not label_values(selector, label)"
        queries.append((f"variable ${variable['name']}", selector[1], ""))
    return queries


QUERIES = [(f"rule {rule['alert']}", rule["expr"], "") for rule in ALERTS] + dashboard_queries()


def without_strings(expr: str) -> str:
    """The expression with its string literals emptied: label values such as job=~"sibyl.*" are no metric names."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def grafana_free(expr: str) -> str:
    """A dashboard query as Grafana sends it with every job and model selected."""
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$model", ".*")


@pytest.mark.parametrize(("where", "expr", "legend"), QUERIES, ids=[q[0] for q in QUERIES])
def test_query_names_contract_metrics_and_their_labels(where, expr, legend):
    """Each query's sibyl_* names are series of the contract; labels it matches, groups by or prints belong to
    those series."""
    code = without_strings(expr)
    names = set(re.findall(r"\bsibyl_\w+", code))
    assert names or re.search(r"\bup\b", code), f"{where}: names no metric"
    assert names <= SERIES.keys(), f"{where}: not in the contract: {sorted(names - SERIES.keys())}"
    known = TARGET_LABELS.union(*(SERIES[n] for n in names)) if names else TARGET_LABELS
    for name, matchers in re.findall(r"\b(sibyl_\w+)\s*\{([^}]*)\}", code):
        matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        assert matched <= SERIES[name] | TARGET_LABELS, f"{where}: {name} has no label {matched - SERIES[name]}"
    grouped = {label for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", code) for label in
               re.findall(r"\w+", clause)}  # fmt: skip
    assert grouped <= known, f"{where}: groups by labels its metrics lack: {sorted(grouped - known)}"
    printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    assert printed <= known, f"{where}: legend names labels its metrics lack: {sorted(printed - known)}"


def test_dashboard_shows_every_contract_metric():
    """Nothing Sibyl exports is left off the dashboard."""
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for _, expr, _ in dashboard_queries() for n in
             re.findall(r"\bsibyl_\w+", without_strings(expr))}  # fmt: skip
    assert set(CONTRACT) - shown == set()


def test_dashboard_is_importable():
    """One dashboard Grafana imports as is: its own uid, panels with unique ids laid out on the 24-column grid
    without overlap, every query on the $datasource variable with a unique refId."""
    assert DASHBOARD["uid"] == "sibyl" and DASHBOARD["title"] == "Sibyl"
    assert [v["name"] for v in DASHBOARD["templating"]["list"]] == ["datasource", "job", "model"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in DASHBOARD["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    """promtool with these arguments, its output captured."""
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules():
    """`promtool check rules` finds every rule valid."""
    checked = promtool("check", "rules", DEPLOY / "sibyl-rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_alerts_fire_on_their_conditions():
    """`promtool test rules`: each alert fires on its condition, only after its `for`, and not on the look-alikes it
    ignores (tests/prometheus/rules.test.yml)."""
    tested = promtool("test", "rules", RULES_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    """The rules' unit tests see each alert both fire and stay quiet, so none is unproven."""
    cases = [case for test in yaml.safe_load(RULES_TEST.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in ALERTS:
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == alert["alert"]]
        assert any(expected), f"{alert['alert']}: no unit test sees it fire"
        assert [] in expected, f"{alert['alert']}: no unit test sees it stay quiet"


@pytest.mark.parametrize("way", ["basic_auth", "metrics_bind"])
def test_promtool_accepts_the_config_both_ways(way, tmp_path):
    """The shipped prometheus.yml passes `promtool check config` with the basic-auth job (password from a file) and,
    in its place, the unauthenticated METRICS_BIND job its comments hold."""
    basic, bind = shipped_jobs()
    assert basic["job_name"] == bind["job_name"] == "sibyl"
    assert set(basic["basic_auth"]) == {"username", "password_file"}
    assert "basic_auth" not in bind
    key = tmp_path / "sibyl-metrics.key"
    key.write_text("a-key\n")
    config = tmp_path / "prometheus.yml"
    job = basic if way == "basic_auth" else bind
    config.write_text(json.dumps(sibyl_prometheus_config([job], ["127.0.0.1:9100"], key)))
    checked = promtool("check", "config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus running the shipped config and rules, scraping its own /metrics, which demands basic auth:
    once as the shipped `sibyl` job (key from a password file) and once without credentials."""
    workdir = tmp_path_factory.mktemp("prometheus")
    basic = shipped_jobs()[0]
    key = workdir / "sibyl-metrics.key"
    key.write_text("prometheus-test-key-0123456789\n")  # the trailing newline, as `echo` leaves it: Prometheus trims it
    without = {k: v for k, v in basic.items() if k != "basic_auth"} | {"job_name": "sibyl-without-credentials"}
    server = Prometheus(workdir, {}, users={basic["basic_auth"]["username"]: "prometheus-test-key-0123456789"})
    server.config = sibyl_prometheus_config([basic, without], [f"127.0.0.1:{server.port}"], key)
    yield server.start()
    server.stop()


def test_prometheus_loads_every_shipped_alert(prometheus):
    """GET /api/v1/rules lists each alert of sibyl-rules.yml, and each evaluates without error."""
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules", type="alert")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        # "unknown" until the first evaluation, a second (evaluation_interval) after loading.
        if all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(rule["name"] for rule in rules) == sorted(alert["alert"] for alert in ALERTS)
    assert {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules} == {
        alert["alert"]: ("ok", "") for alert in ALERTS
    }


def test_prometheus_scrapes_with_the_shipped_basic_auth(prometheus):
    """The shipped job's credentials get a scrape through (up == 1); the same target without them is refused, and
    SibylTargetDown goes pending for it."""
    assert prometheus.await_query('up{job="sibyl"} == 1')
    assert prometheus.await_query('up{job="sibyl-without-credentials"} == 0')
    targets = prometheus.api("targets")["data"]["activeTargets"]
    refused = [t for t in targets if t["labels"]["job"] == "sibyl-without-credentials"]
    assert "401" in refused[0]["lastError"]
    pending = prometheus.await_query('ALERTS{alertname="SibylTargetDown", alertstate="pending"}')
    assert [a["metric"]["job"] for a in pending] == ["sibyl-without-credentials"]


@pytest.mark.parametrize(
    ("where", "expr"), [q[:2] for q in dashboard_queries()], ids=[q[0] for q in dashboard_queries()]
)
def test_dashboard_query_runs_in_prometheus(prometheus, where, expr):
    """Prometheus accepts each dashboard query, with Grafana's variables filled in as "All" would."""
    query = grafana_free(expr)
    assert "$" not in query, f"{where}: a Grafana variable this test does not fill in"
    if where.startswith("variable"):
        answer = prometheus.api("series", **{"match[]": query})
        assert answer["status"] == "success", answer
    else:
        prometheus.query(query)  # HarnessError if rejected
