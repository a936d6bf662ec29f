"""Admin routes: registry operations, users; each needs the admin role and writes one audit line."""

import os
import signal

from flask import Blueprint, Response, current_app

from app.audit import audit
from app.auth import auth
from app.errors import error_response
from app.protocols import json_response
from app.registry import metadata_path
from app.rollout import ACTION, check

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("/users")
@auth.login_required(role="admin")
def users() -> Response:
    """Who may call Sibyl and with which roles (names and roles only, never digests)."""
    listed = [{"name": name, "roles": list(user.roles)} for name, user in current_app.extensions["sibyl.users"].items()]
    audit("admin.users", "ok", users=len(listed))
    return json_response({"users": listed})


@bp.post("/reload")
@auth.login_required(role="admin")
def rollout() -> Response:  # named for its audit action: a 403's line names the endpoint, admin.rollout
    """Roll out what MODEL_DIR now holds: check it would load, then SIGHUP the gunicorn master (202), or 409 why not."""
    # Recorded by post_worker_init; compared with our parent, so a worker whose master died never signals init.
    master = current_app.extensions.get("sibyl.master_pid")
    if master is None or os.getppid() != master:
        return _refuse("This server is not a gunicorn worker, so it cannot roll out in place; restart it instead.")
    reason = check(current_app.config)
    if reason is not None:
        return _refuse(f"The models on disk would not load, so nothing changed: {reason}")
    generation = current_app.extensions["sibyl.registry"].generation
    audit(ACTION, "ok", step="check", generation=generation)
    # The master loads the registry again itself, then replaces every worker (this one too, once it has answered).
    os.kill(master, signal.SIGHUP)
    return json_response({"status": "rollout started", "generation": generation}, status=202)


def _refuse(message: str) -> Response:
    """A refused rollout: audited, 409 in the one error shape."""
    audit(ACTION, "refused", reason=message, step="check")
    return error_response(409, "rollout_refused", message)


@bp.get("/models")
@auth.login_required(role="admin")
def registry_files() -> Response:
    """The registry as GET /models lists it, plus where each version's files are on this server (admins only:
    paths reveal infrastructure)."""
    registry = current_app.extensions["sibyl.registry"]
    listed = registry.describe()
    for entry in listed:
        for version in entry["versions"]:
            model = registry.entries[entry["name"]].versions[version["version"]]
            version["files"] = {"artifact": str(model.path), "metadata": str(metadata_path(model.path))}
    audit("admin.registry_files", "ok", models=len(listed))
    return json_response({"models": listed, "generation": registry.generation, "loaded_at": registry.loaded_at})
