"""Auth: basic and bearer against SHA-256 digests; unknown user and wrong key look the same."""

import hashlib

import pytest
from click.testing import CliRunner
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, KEY, USER, USERS, basic_auth

from app.auth import DEV_MARKER, parse_users
from app.cli import create_user
from app.errors import StartupError

BODY = {"features": IRIS_ROWS}


@pytest.mark.parametrize(
    "headers",
    [{}, basic_auth(USER, "wrong-key"), basic_auth("mallory", KEY), {"Authorization": "Bearer wrong-key"},
     {"Authorization": "Digest abc"}, {"Authorization": "Basic !!!not-base64"}],
    ids=["none", "wrong-key", "unknown-user", "wrong-bearer", "other-scheme", "garbled"],
)  # fmt: skip
def test_bad_credentials_get_the_same_401(client, headers):
    """Every failure is the same JSON 401, whatever was wrong, so callers can't probe for user names."""
    r = client.post("/predict", json=BODY, headers=headers)
    assert r.status_code == 401
    assert r.json["error"]["code"] == "unauthorized"
    assert r.json["error"]["message"].startswith("Send valid credentials")
    assert "WWW-Authenticate" in r.headers


def test_basic_challenge_lets_browsers_prompt(client):
    """Without credentials the challenge is Basic, which makes a browser show its login box."""
    assert client.get("/models").headers["WWW-Authenticate"].startswith("Basic")


def test_basic_and_bearer_both_work(client):
    """The same API key works as a basic-auth password and as a bearer token."""
    assert client.post("/predict", json=BODY, headers=basic_auth()).status_code == 200
    assert client.post("/predict", json=BODY, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR", "basic", "BASIC", "Basic"])
def test_auth_scheme_is_case_insensitive(client, scheme):
    """RFC 7235: `bearer KEY` and `basic ...` are the same schemes as `Bearer` and `Basic`."""
    credentials = KEY if scheme.lower() == "bearer" else basic_auth()["Authorization"].split()[1]
    r = client.post("/predict", json=BODY, headers={"Authorization": f"{scheme} {credentials}"})
    assert r.status_code == 200
    wrong = client.post("/predict", json=BODY, headers={"Authorization": f"{scheme} wrong-{credentials}"})
    assert wrong.status_code == 401


@pytest.mark.parametrize("path", ["/models", "/predict"])
def test_model_routes_require_auth(client, path):
    """Model routes answer 401 without credentials."""
    assert client.open(path, method="GET" if path == "/models" else "POST", json=BODY).status_code == 401


def test_users_file_and_env_are_merged(make_app, tmp_path):
    """Users come from SIBYL_USERS and SIBYL_USERS_FILE together."""
    other = f"bob:sha256:{hashlib.sha256(b'bob-key').hexdigest()}"
    users_file = tmp_path / "users"
    users_file.write_text(f"# comment\n{other}\n")
    client = make_app(SIBYL_USERS_FILE=str(users_file)).test_client()
    assert client.post("/predict", json=BODY, headers=basic_auth("bob", "bob-key")).status_code == 200
    assert client.post("/predict", json=BODY, headers=basic_auth()).status_code == 200


@pytest.mark.parametrize("entry", ["alice:plaintext-password", "alice:sha256:abc", "alice:md5:" + "0" * 64])
def test_malformed_user_entry_stops_startup_without_echo(make_app, entry):
    """A bad entry stops startup; the message never repeats the entry (it may be a pasted password)."""
    with pytest.raises(StartupError) as e:
        make_app(SIBYL_USERS=entry)
    assert entry.split(":", 1)[1] not in str(e.value)


def test_production_refuses_no_users(make_app):
    """SIBYL_ENV=production will not start with nobody able to log in."""
    with pytest.raises(StartupError, match="no users configured"):
        make_app(SIBYL_ENV="production", SIBYL_USERS="")


def test_production_refuses_dev_credentials(make_app, tmp_path):
    """The credentials `make run` generates are refused in production."""
    users_file = tmp_path / "users"
    users_file.write_text(f"{DEV_MARKER}\n{USERS}\n")
    with pytest.raises(StartupError, match="development credentials"):
        make_app(SIBYL_ENV="production", SIBYL_USERS="", SIBYL_USERS_FILE=str(users_file))
    assert make_app(SIBYL_ENV="production").extensions["sibyl.users"]  # real users are fine


def test_development_without_users_rejects_everyone(make_app):
    """With no users in development the app starts, and every model route is 401."""
    client = make_app(SIBYL_USERS="").test_client()
    assert client.post("/predict", json=BODY, headers=basic_auth()).status_code == 401


def test_create_user_command_issues_a_working_key(make_app, tmp_path):
    """`create-user` prints a key once and writes only its digest; the key then authenticates."""
    users_file = tmp_path / "users"
    out = CliRunner().invoke(create_user, ["carol", "--file", str(users_file)]).output
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key:"))
    assert key not in users_file.read_text()
    assert users_file.stat().st_mode & 0o077 == 0
    client = make_app(SIBYL_USERS="", SIBYL_USERS_FILE=str(users_file)).test_client()
    assert client.post("/predict", json=BODY, headers=basic_auth("carol", key)).status_code == 200
    assert client.post("/predict", json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_create_user_refuses_separator_in_name():
    """Names can't contain the entry separators."""
    assert CliRunner().invoke(create_user, ["a:b"]).exit_code != 0


DIGEST = "ab" * 32
SHAPE = "must look like name:sha256:<64 hex digits>[:admin|:metrics]"


@pytest.mark.parametrize(
    "entry, roles",
    [(f"bob:sha256:{DIGEST}", ("predict",)), (f"bob:sha256:{DIGEST}:predict", ("predict",)),
     (f"bob:sha256:{DIGEST}:admin", ("predict", "admin")), (f"bob:sha256:{DIGEST}:admin+predict", ("predict", "admin")),
     (f"bob:sha256:{DIGEST.upper()}:admin", ("predict", "admin")),
     (f"bob:sha256:{DIGEST}:metrics", ("predict", "metrics")),
     (f"bob:sha256:{DIGEST}:metrics+admin", ("predict", "admin", "metrics"))],
)  # fmt: skip
def test_user_entry_roles(entry, roles):
    """Every user may predict; `:admin` adds admin and `:metrics` adds metrics, in any combination."""
    (user,) = parse_users(entry, "SIBYL_USERS").values()
    assert user.roles == roles and user.digest == bytes.fromhex(DIGEST)


@pytest.mark.parametrize(
    "entry, says",
    [(f"bob:sha256:{DIGEST}:root", "unknown role 'root' for user bob"),
     (f"bob:sha256:{DIGEST}:admin+Admin", "unknown role 'Admin'"), (f"bob:sha256:{DIGEST}:", "unknown role ''"),
     (f"bob:sha256:{DIGEST}:admin:predict", SHAPE), (f"bob:sha256:{'zz' * 32}", SHAPE),
     (f"bob:sha256:{DIGEST}0:admin", SHAPE), ("bob:admin", SHAPE)],
)  # fmt: skip
def test_bad_role_entry_stops_startup_naming_source_and_role(make_app, entry, says):
    """An unknown role or a misplaced one stops startup with one line naming the source, never the digest."""
    with pytest.raises(StartupError) as e:
        make_app(SIBYL_USERS=entry)
    message = str(e.value)
    assert message.startswith("SIBYL_USERS: ") and says in message and "\n" not in message
    assert DIGEST not in message.lower()


@pytest.mark.parametrize("headers", [basic_auth(), {"Authorization": f"Bearer {KEY}"}], ids=["basic", "bearer"])
def test_predict_only_user_gets_403_on_admin_route(client, headers):
    """A predict-only user is authenticated but refused an admin route, in the one JSON error shape."""
    r = client.get("/admin/users", headers=headers)
    assert r.status_code == 403
    assert r.json["error"]["code"] == "forbidden"
    assert "needs the admin role" in r.json["error"]["message"]
    assert r.json["error"]["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.parametrize("headers", [{}, basic_auth(ADMIN, "wrong-key"), {"Authorization": "Bearer wrong"}])
def test_admin_route_without_valid_credentials_is_401(client, headers):
    """No or bad credentials are still 401 on an admin route, not 403."""
    r = client.get("/admin/users", headers=headers)
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("headers", [basic_auth(ADMIN, ADMIN_KEY), {"Authorization": f"Bearer {ADMIN_KEY}"}])
def test_admin_lists_users_and_roles_without_digests(client, headers):
    """GET /admin/users gives an admin every user's name and roles, and nothing about their keys."""
    r = client.get("/admin/users", headers=headers)
    assert r.status_code == 200
    assert r.json == {"users": [{"name": USER, "roles": ["predict"]}, {"name": ADMIN, "roles": ["predict", "admin"]}]}
    assert client.post("/predict", json=BODY, headers=headers).status_code == 200  # admin implies predict


def test_create_user_role_admin_writes_a_working_admin_entry(make_app, tmp_path):
    """`create-user --role admin` prints and writes an `:admin` entry whose key opens admin routes."""
    users_file = tmp_path / "users"
    result = CliRunner().invoke(create_user, ["dana", "--role", "admin", "--file", str(users_file)])
    assert result.exit_code == 0
    key = next(line.split()[1] for line in result.output.splitlines() if line.startswith("key:"))
    (entry,) = users_file.read_text().splitlines()
    assert entry.startswith("dana:sha256:") and entry.endswith(":admin") and entry in result.output
    client = make_app(SIBYL_USERS="", SIBYL_USERS_FILE=str(users_file)).test_client()
    assert client.get("/admin/users", headers=basic_auth("dana", key)).status_code == 200


def test_create_user_role_predict_is_the_default_and_others_are_refused(tmp_path):
    """`--role predict` (the default) writes an entry without a role suffix; an unknown role is refused."""
    users_file = tmp_path / "users"
    for args in (["erin"], ["fay", "--role", "predict"]):
        assert CliRunner().invoke(create_user, [*args, "--file", str(users_file)]).exit_code == 0
    assert [line.count(":") for line in users_file.read_text().splitlines()] == [2, 2]
    refused = CliRunner().invoke(create_user, ["gus", "--role", "root"])
    assert refused.exit_code != 0 and "'predict', 'admin'" in refused.output
