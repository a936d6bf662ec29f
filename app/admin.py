"""Admin routes: registry operations, users; each needs the admin role and writes one audit line."""

from flask import Blueprint, Response, current_app

from app.audit import audit
from app.auth import auth
from app.protocols import json_response

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("/users")
@auth.login_required(role="admin")
def users() -> Response:
    """Who may call Sibyl and with which roles (names and roles only, never digests)."""
    listed = [{"name": name, "roles": list(user.roles)} for name, user in current_app.extensions["sibyl.users"].items()]
    audit("admin.users", "ok", users=len(listed))
    return json_response({"users": listed})
