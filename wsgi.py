"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`; `flask --app wsgi <command>`: the operator commands."""

import sys

import click
from flask.cli import ScriptInfo

from app import create_app
from app.cli import cli_app
from app.errors import StartupError


def loaded_by_flask_cli() -> bool:
    """Whether Flask's CLI is importing this module to find a command: its click context carries a ScriptInfo."""
    context = click.get_current_context(silent=True)
    return context is not None and context.find_object(ScriptInfo) is not None


if loaded_by_flask_cli():
    # The operator commands must work with no users or model configured, and `list` must never unpickle: so
    # `flask --app wsgi ...` gets an app holding only the commands, never the serving app (gunicorn serves that).
    app = cli_app()
else:
    try:
        app = create_app()
    except StartupError as e:
        # One clear line instead of a traceback; the service never starts half-ready.
        print(f"sibyl: cannot start: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
