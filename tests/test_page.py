"""GET /: the web page behind the API's auth, its files, and the refusal of cross-site writes it makes necessary.
The page's behaviour in a real browser is tests/test_browser.py."""

import re

import pytest
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, basic_auth


def test_page_needs_credentials_and_browsers_are_asked_for_them(client):
    """Without a key, GET / is the API's JSON 401 with a Basic challenge (what makes a browser prompt); with one,
    the page, under a policy that runs only its own files and forbids framing."""
    r = client.get("/")
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    r = client.get("/", headers=basic_auth())
    assert r.status_code == 200 and r.mimetype == "text/html"
    policy = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_page_files_are_served_and_local(client):
    """Every script, stylesheet and icon the page names is served by Sibyl itself: no CDN, works offline."""
    html = client.get("/", headers=basic_auth()).get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css", "svg"}
    for asset in assets:
        assert asset.startswith("/static/page/"), asset
        assert client.get(asset).status_code == 200, asset
    assert "<script>" not in html and "style=" not in html  # nothing inline: the policy would block it


def test_page_is_not_an_api_operation(client):
    """The page is for browsers: it stays out of /openapi.json (and so out of Postman and schemathesis)."""
    assert "/" not in client.get("/openapi.json").json["paths"]


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}],
    ids=["cross-site", "same-site", "foreign-origin"],
)
@pytest.mark.parametrize("path", ["/admin/reload", "/predict", "/invocations"])
def test_cross_site_writes_are_refused_in_the_protocols_shape(client, headers, path):
    """A POST a browser sent from another site's page carries the credentials the page's user gave the browser;
    it is refused (403) before auth or any action, in the shape of the protocol the path belongs to."""
    r = client.post(path, json={"features": IRIS_ROWS}, headers={**basic_auth(ADMIN, ADMIN_KEY), **headers})
    assert r.status_code == 403
    if path == "/invocations":
        assert r.json["error_code"] == "PERMISSION_DENIED"
    else:
        assert r.json["error"]["code"] == "cross_site_request"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "http://localhost"}],
    ids=["no-browser", "same-origin", "typed-by-user", "own-origin"],
)
def test_own_page_and_non_browser_clients_are_served(client, headers):
    """Sibyl's own page (same origin), a request the user made directly, and clients that are not browsers (no
    Sec-Fetch-Site, no Origin: curl, Postman, services) are served as before."""
    r = client.post("/predict", json={"features": IRIS_ROWS}, headers={**basic_auth(), **headers})
    assert r.status_code == 200


def test_cross_site_reads_are_not_refused(client):
    """GETs change nothing and another site cannot read their answers (no CORS headers), so they are served."""
    r = client.get("/models", headers={**basic_auth(), "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
