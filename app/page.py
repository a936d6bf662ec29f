"""GET /: the web page for people (try a model, score a file, see its status), behind the same auth as the API."""

from functools import cache
from pathlib import Path

from flask import Blueprint, Response

from app import errors
from app.auth import auth

bp = Blueprint("page", __name__)
errors.register_handlers(bp)

_PAGE = Path(__file__).parent / "static" / "page" / "index.html"
# The page runs only its own files: no inline script or style, no other origin, never framed (clickjacking). The API
# calls it makes are same-origin fetches that the browser sends with the basic-auth credentials it asked for.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@cache
def _html() -> bytes:
    """The page's HTML, read once per process."""
    return _PAGE.read_bytes()


@bp.get("/")
@auth.login_required
def index() -> Response:
    """The web page: models, predict, batch scoring and status (a browser asks for the user and key)."""
    return Response(_html(), mimetype="text/html", headers=_HEADERS)
