"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import sys

from app import create_app
from app.errors import StartupError

try:
    app = create_app()
except StartupError as e:
    # One clear line instead of a traceback; the service never starts half-ready.
    print(f"sibyl: cannot start: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
