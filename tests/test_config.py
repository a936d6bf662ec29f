"""Every setting's rule: a bad value, from the environment or a mapping, stops startup with one line naming it."""

import os
import re
import subprocess
import sys

import pytest
from conftest import IRIS_ROWS, ROOT, basic_auth, served_model

import config
from app.errors import StartupError

RATE_RULE = "must be off or <count>/<second|minute|hour|day> with a count of at least 1, e.g. 600/minute"
BAD = [
    ("MAX_ROWS", "lots", "must be a whole number >= 1"),
    ("CACHE_TTL", "0", "must be a whole number >= 1"),
    ("CACHE_TIMEOUT_MS", "-5", "must be a whole number >= 1"),
    ("COMPILE_TIMEOUT_SECONDS", "soon", "must be a number >= 1"),
    ("COMPILE_TIMEOUT_SECONDS", "inf", "must be a number >= 1"),
    ("CACHE_RETRY_SECONDS", "nan", "must be a number >= 0"),
    ("LOG_LEVEL", "verbose", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_FORMAT", "jsno", "must be one of json, text"),
    ("SIBYL_ENV", "prod", "must be one of development, production"),
    ("INFERENCE_BACKEND", "fast", "must be one of auto, sklearn, onnx"),
    ("CACHE_SCOPE", "team", "must be one of shared, user"),
    ("CACHE_ENABLED", "nah", "must be true or false (a bool, or 1/0, true/false, yes/no, on/off)"),
    ("MODEL_SHA256", "abc123", "must be empty or 64 hex digits (a sha256)"),
    ("METRICS_BIND", "9100", "must be empty or host:port, e.g. 127.0.0.1:9100"),
    ("METRICS_BIND", "127.0.0.1:99999", "must be empty or host:port, e.g. 127.0.0.1:9100"),
    ("FEEDBACK_TTL", "-1", "must be a whole number >= 0"),
    ("FEEDBACK_WINDOW", "0", "must be a whole number >= 1"),
    ("DRIFT_WINDOW", "ten", "must be a whole number >= 0"),
    ("RATE_LIMIT_PREDICT", "lots", RATE_RULE),
    ("RATE_LIMIT_ADMIN", "10/fortnight", RATE_RULE),
    ("RATE_LIMIT_LOGIN_FAILURES", "0/minute", RATE_RULE),
    ("TRUSTED_PROXY_HOPS", "-1", "must be a whole number >= 0"),
]
REDIS_URL_RULE = "REDIS_URL must be a redis://, rediss:// or unix:// URL with a valid port and options"
# Malformed URLs, each carrying a password that must never reach the log.
BAD_REDIS_URLS = [
    "localhost:6379",
    "http://:hunter2@cache:6379/0",
    "redis://:hunter2@cache:99999/0",
    "redis://:hunter2@cache:port/0",
]


def import_config(tmp_path, **env) -> subprocess.CompletedProcess:
    """`import config` in a fresh interpreter with only these variables set."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env}
    code = "import config; print(config.Config.CACHE_ENABLED)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(("name", "value", "why"), BAD)
def test_bad_environment_value_stops_with_one_line(tmp_path, name, value, why):
    """A malformed or out-of-range value in the environment stops startup with one line naming the variable."""
    proc = import_config(tmp_path, **{name: value})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"sibyl: cannot start: {name}={value!r} {why}"]


@pytest.mark.parametrize(("name", "value", "why"), BAD)
def test_bad_mapping_value_stops_create_app(make_app, name, value, why):
    """create_app holds a mapping's values to the same rules, naming the variable."""
    with pytest.raises(StartupError, match=f"^{re.escape(f'{name}={value!r} {why}')}$"):
        make_app(**{name: value})


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("CACHE_TTL", 0, "CACHE_TTL=0 must be a whole number >= 1"),
        ("CACHE_RETRY_SECONDS", -1, "CACHE_RETRY_SECONDS=-1 must be a number >= 0"),
        ("MAX_ROWS", True, "MAX_ROWS=True must be a whole number >= 1"),
        ("MAX_CONTENT_LENGTH", 2.5, "MAX_BODY_BYTES=2.5 must be a whole number >= 1"),
        ("CACHE_ENABLED", 1, "CACHE_ENABLED=1 must be true or false (a bool, or 1/0, true/false, yes/no, on/off)"),
        ("LOG_LEVEL", 10, "LOG_LEVEL=10 must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("CACHE_PREFIX", None, "CACHE_PREFIX=None must be a string"),
    ],
)
def test_mapping_values_of_the_wrong_type_are_refused(make_app, setting, value, message):
    """A mapping's value must already have the setting's type (or be a string, as the environment's are)."""
    with pytest.raises(StartupError, match=f"^{re.escape(message)}$"):
        make_app(**{setting: value})


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("0", False), ("TRUE", True), ("Off", False),
                                                ("yes", True), ("no", False), ("", True)])  # fmt: skip
def test_flag_spellings_in_the_environment(tmp_path, value, enabled):
    """CACHE_ENABLED takes 1/0, true/false, yes/no, on/off in any case; empty means the default."""
    proc = import_config(tmp_path, CACHE_ENABLED=value)
    assert (proc.returncode, proc.stdout.strip()) == (0, str(enabled))


def test_strings_in_a_mapping_mean_what_they_say(make_app, redis_url):
    """CACHE_ENABLED="false" in a mapping turns the cache off (it was truthy); choices ignore case."""
    app = make_app(REDIS_URL=redis_url, CACHE_ENABLED="false", INFERENCE_BACKEND="SKLearn", LOG_FORMAT="JSON")
    r = app.test_client().post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    assert (r.status_code, r.headers["X-Cache"]) == (200, "OFF")
    assert served_model(app).backend.name == "sklearn"
    assert (app.config["CACHE_ENABLED"], app.config["LOG_FORMAT"]) == (False, "json")


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_malformed_redis_url_stops_startup_without_printing_it(tmp_path, make_app, url):
    """A REDIS_URL redis-py can't parse stops startup naming REDIS_URL, never echoing the URL (or its password)."""
    proc = import_config(tmp_path, REDIS_URL=url)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"sibyl: cannot start: {REDIS_URL_RULE}"]
    with pytest.raises(StartupError) as e:
        make_app(REDIS_URL=url)
    assert str(e.value) == REDIS_URL_RULE


@pytest.mark.parametrize("url", ["", "redis://:pw@127.0.0.1:1/0", "rediss://cache", "unix:///tmp/redis.sock"])
def test_usable_redis_urls_start_without_connecting(tmp_path, url):
    """A well-formed URL passes the check without Redis answering; empty still means no cache."""
    assert import_config(tmp_path, REDIS_URL=url).returncode == 0


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({}, None),  # no cgroup files: the affinity mask alone
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still needs one worker
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: round up
        ({"cpu.max": "6400000 100000\n"}, None),  # a quota above the mask: the mask wins
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 without a quota
    ],
)
def test_usable_cpus_follows_the_cgroup_quota(tmp_path, files, cpus):
    """The worker default is the CPUs the process may use: the cgroup quota, rounded up, capped by affinity."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(content)
    mask = len(os.sched_getaffinity(0))
    assert config.usable_cpus(tmp_path) == min(mask, cpus or mask)


def test_usable_cpus_follows_the_affinity_mask(tmp_path):
    """A process pinned to one CPU (taskset, a container's cpuset) counts one, however many the machine has."""
    one = min(os.sched_getaffinity(0))
    code = f"import config; print(config.usable_cpus({str(tmp_path)!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "1")
