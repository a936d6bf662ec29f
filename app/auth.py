"""(1) Who is calling: basic auth or bearer token, checked against SHA-256 digests in constant time; roles, 401/403."""

import hashlib
import hmac
import logging
import re
import secrets
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from flask import Flask, current_app, g, request
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth, MultiAuth

from app.audit import LoginFailures, audit
from app.errors import ApiError, StartupError, error_response

log = logging.getLogger(__name__)


class _BearerAuth(HTTPTokenAuth):
    """RFC 7235: auth schemes are case-insensitive. flask-httpauth 4.8's MultiAuth picks a scheme by exact match
    (`scheme == self.scheme`), so `bearer KEY` fell through to basic auth and got 401. Basic needs no fix: it is
    the fallback, and its parser ignores the scheme's spelling."""

    def is_compatible_auth(self, headers) -> bool:
        """Whether the Authorization header names this scheme, in any case."""
        parts = headers.get("Authorization", "").split(None, 1)
        return len(parts) == 2 and parts[0].lower() == self.scheme.lower()


basic = HTTPBasicAuth(realm="sibyl")
bearer = _BearerAuth(scheme="Bearer")
auth = MultiAuth(basic, bearer)

# Files written by `make run` carry this marker; production refuses them.
DEV_MARKER = "# sibyl development credentials"
# Compared against when the user is unknown, so unknown user and wrong key take the same time.
_DUMMY = hashlib.sha256(b"sibyl-no-such-user").digest()
# Every user may predict; admin adds registry operations and user listing; metrics, reading GET /metrics (a
# Prometheus scrape key that cannot manage models).
ROLES = ("predict", "admin", "metrics")
# What a 403 says each route needs; routes not listed need admin.
# The routes that serve the metrics (GET /metrics, and GET /status's reading of them): admin or metrics role.
METRICS_ENDPOINTS = frozenset({"metrics.metrics", "status.status"})
_NEEDS = dict.fromkeys(METRICS_ENDPOINTS, ("the admin or metrics role", ":admin or :metrics", "metrics"))
_NEEDS_ADMIN = ("the admin role", ":admin", "admin")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class User(NamedTuple):
    """A configured user: the SHA-256 digest of their API key, and their roles."""

    digest: bytes
    roles: tuple[str, ...]  # a tuple: flask-httpauth reads any other collection as a single role


def new_api_key() -> tuple[str, str]:
    """A random 256-bit API key and the digest to store for it."""
    key = secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def parse_users(text: str, source: str) -> dict[str, User]:
    """Read "name:sha256:hex[:role+role]" entries (comma- or line-separated, # comments) into name -> User."""
    users = {}
    for entry in text.replace(",", "\n").splitlines():
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        parts = entry.split(":")
        name, scheme, digest = [*parts, "", ""][:3]
        if len(parts) > 4 or not name or scheme != "sha256" or not _HEX64.fullmatch(digest):
            # Never echo the entry: it may be a password pasted in by mistake.
            raise StartupError(
                f"{source}: user entries must look like name:sha256:<64 hex digits>[:admin|:metrics] (run `make user`)"
            )
        named = parts[3].split("+") if len(parts) == 4 else []
        for role in named:
            if role not in ROLES:
                raise StartupError(f"{source}: unknown role {role!r} for user {name}; roles are {', '.join(ROLES)}")
        roles = tuple(r for r in ROLES if r == "predict" or r in named)  # every user may predict
        users[name] = User(bytes.fromhex(digest), roles)
    return users


def load_users(app: Flask) -> dict[str, User]:
    """Users from SIBYL_USERS and SIBYL_USERS_FILE; production refuses none or dev-generated ones."""
    users = parse_users(app.config["SIBYL_USERS"], "SIBYL_USERS")
    production = app.config["SIBYL_ENV"] == "production"
    if path := app.config["SIBYL_USERS_FILE"]:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise StartupError(f"users file {path} is unreadable: {e.strerror}") from None
        if production and DEV_MARKER in text:
            raise StartupError(f"users file {path} holds development credentials; SIBYL_ENV=production refuses them")
        users.update(parse_users(text, path))
    if not users:
        if production:
            raise StartupError("no users configured (SIBYL_USERS or SIBYL_USERS_FILE); SIBYL_ENV=production needs some")
        log.warning("no users configured: every authenticated request will get 401 (run `make user`)")
    return users


def check_key(users: dict[str, User], username: str, password: str) -> str | None:
    """The user when the key's digest matches theirs, in time independent of which part was wrong; None otherwise."""
    digest = hashlib.sha256(password.encode()).digest()
    user = users.get(username)
    ok = hmac.compare_digest(digest, user.digest if user else _DUMMY)
    return username if ok and user else None


@basic.verify_password
def verify_password(username: str, password: str) -> str | None:
    """Return the user when the key's digest matches (check_key), counted against the limits."""
    return _checked(check_key(current_app.extensions["sibyl.users"], username, password))


@bearer.verify_token
def verify_token(token: str) -> str | None:
    """A bearer token is a user's API key: check it against every user without stopping early."""
    digest = hashlib.sha256(token.encode()).digest()
    found = None
    for name, user in current_app.extensions["sibyl.users"].items():
        if hmac.compare_digest(digest, user.digest):
            found = name
    return _checked(found)


def _checked(name: str | None) -> str | None:
    """Record the caller for the request log, and count the attempt against the limits (app.limits), which raise a
    429 past them. Every attempt takes this path, known user or not, so both cost the same Redis round trip."""
    roles = ()
    if name is not None:
        g.log["user"] = name
        roles = current_app.extensions["sibyl.users"][name].roles
    current_app.extensions["sibyl.limits"].count(name, roles, request.remote_addr, "Authorization" in request.headers)
    return name


@basic.get_user_roles
@bearer.get_user_roles
def user_roles(name: str) -> tuple[str, ...]:
    """The roles flask-httpauth checks for `@auth.login_required(role="admin")`."""
    return current_app.extensions["sibyl.users"][name].roles


def auth_error(status: int):
    """401/403 in the one JSON error shape (flask-httpauth adds its scheme's WWW-Authenticate); both are audited."""
    if status == 403:
        # Every user has predict, so a 403 always means a route that needs admin (or, for /metrics, metrics).
        needs, suffix, role = _NEEDS.get(request.endpoint, _NEEDS_ADMIN)
        audit(request.endpoint, "refused", reason=f"needs {needs}")
        message = f"This route needs {needs} (a user entry ending in {suffix}; see create-user --role {role})."
        return error_response(403, "forbidden", message)
    # Only requests that sent credentials count: a browser's first request carries none, and its 401 is what
    # makes the browser ask for them.
    if "Authorization" in request.headers:
        logins = current_app.extensions["sibyl.login_failures"]
        if logins.refused(request.remote_addr):
            # No user names: a refused name may be a key typed into the wrong field, or a probe for real names.
            burst = {"count": logins.threshold, "window_seconds": logins.window}
            audit("login", "refused", reason="too many refused logins", **burst)
    message = "Send valid credentials: HTTP basic auth (user:key) or Authorization: Bearer <key>."
    return error_response(401, "unauthorized", message)


# Registered on each scheme separately so each adds its own WWW-Authenticate (Basic makes browsers prompt).
basic.error_handler(auth_error)
bearer.error_handler(auth_error)


# Methods that change nothing, which a page on another site may make a browser send (and cannot read the answer of).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of requests a person made on Sibyl's own pages, or typed themselves.
_OWN_SITE = frozenset({"same-origin", "none"})


def refuse_cross_site() -> None:
    """403 for a state-changing request that a browser sent from another site's page. A browser that has the web
    page's basic-auth credentials sends them with every request to this origin, whoever's page asked: a form on
    another site could POST /admin/reload. Browsers say where a request came from (Sec-Fetch-Site, else Origin);
    curl, Postman and services send neither, so they are never refused."""
    environ = request.environ
    if environ["REQUEST_METHOD"] in _SAFE_METHODS:
        return
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site is None:
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or urlsplit(origin).netloc == request.host:
            return
    elif site in _OWN_SITE:
        return
    message = (
        "A browser sent this request from another site's page; Sibyl refuses those (they would carry your "
        "credentials). Use Sibyl's own page, or call the API from a client that is not a browser."
    )
    raise ApiError(403, "cross_site_request", message)


def init_app(app: Flask) -> None:
    """Load the users once at startup, count refused logins from here on, and refuse cross-site writes."""
    app.before_request(refuse_cross_site)
    app.extensions["sibyl.users"] = load_users(app)
    app.extensions["sibyl.login_failures"] = LoginFailures(
        app.config["AUDIT_LOGIN_FAILURES"], app.config["AUDIT_WINDOW_SECONDS"]
    )
