"""TLS: gunicorn serves HTTPS with TLS_CERT_FILE and TLS_KEY_FILE (a bad pair stops startup with one line), plain
HTTP to its port fails without harming it, and the shipped nginx tls.conf terminates TLS in front of a replica."""

import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
import requests
from conftest import IRIS_ROWS, LiveServer, basic_auth, iris_settings

from tests.support.nginx import Nginx
from tests.support.servers import refused_start

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str, cwd: Path) -> None:
    """Run the openssl CLI in cwd; fail the test with its output if it fails."""
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 (P-256 keys, valid for a day): the paths of
    ca.crt, server.crt and server.key."""
    d = tmp_path_factory.mktemp("pki")
    ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl(
        "req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=Sibyl test CA",
        *ca_ext, cwd=d,
    )  # fmt: skip
    openssl("req", *EC_KEY, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "server.ext", cwd=d,
    )  # fmt: skip
    return {name: d / name for name in ("ca.crt", "server.crt", "server.key")}


@pytest.fixture
def tls_server(tmp_path, iris_path, pki, monkeypatch):
    """Sibyl under gunicorn.conf.py with TLS_CERT_FILE and TLS_KEY_FILE set, its url https://; stopped after."""
    env = {**iris_settings(iris_path), "TLS_CERT_FILE": str(pki["server.crt"]), "TLS_KEY_FILE": str(pki["server.key"])}
    server = LiveServer(tmp_path, env, workers=2)
    server.url = f"https://127.0.0.1:{server.port}"
    # The harness's readiness poll uses requests' default verification: trust the test CA for it alone.
    with monkeypatch.context() as m:
        m.setenv("REQUESTS_CA_BUNDLE", str(pki["ca.crt"]))
        server.start()
    yield server
    server.stop()


def test_https_with_the_ca_pinned_serves_predictions(tls_server, pki):
    """A predict over HTTPS, verified against the test CA alone, answers as over HTTP; the certificate is not
    trusted without the pin, and gunicorn says it listens on https://."""
    r = tls_server.predict({"features": IRIS_ROWS}, verify=str(pki["ca.crt"]))
    assert (r.status_code, r.json()["predictions"]) == (200, ["setosa", "virginica"])
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_server.url + "/health", timeout=10, verify=True)
    assert f"Listening at: https://127.0.0.1:{tls_server.port}" in tls_server.stderr.read_text()


def test_plain_http_to_the_tls_port_fails_cleanly(tls_server, pki):
    """Plain HTTP to the HTTPS port gets no HTTP answer (the connection just ends), logs no traceback, and the
    server goes on serving HTTPS."""
    plain = tls_server.url.replace("https://", "http://")
    for _ in range(3):  # more than one worker's worth
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(plain + "/health", timeout=10)
    # Nothing but TLS records: a plain HTTP request line is answered with no HTTP status line.
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(65536).startswith(b"HTTP/")
    r = tls_server.predict({"features": IRIS_ROWS}, verify=str(pki["ca.crt"]))
    assert r.status_code == 200
    assert tls_server.proc.poll() is None and "Traceback" not in tls_server.stderr.read_text()


def test_tls_offers_only_tls_1_2_and_up(tls_server, pki):
    """A client that speaks at most TLS 1.1 is refused in the handshake; TLS 1.3 is what a modern client gets."""
    modern = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    with (
        socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw,
        modern.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
    old = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    with warnings.catch_warnings():  # deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")  # let the client at least offer it
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({"TLS_CERT_FILE": "server.crt"}, "TLS_KEY_FILE must be set too: TLS_CERT_FILE alone serves no TLS"),
        ({"TLS_KEY_FILE": "server.key"}, "TLS_CERT_FILE must be set too: TLS_KEY_FILE alone serves no TLS"),
        (
            {"TLS_CERT_FILE": "missing.crt", "TLS_KEY_FILE": "server.key"},
            "TLS_CERT_FILE='{d}/missing.crt' must be empty or a readable file",
        ),
        (
            {"TLS_CERT_FILE": "server.crt", "TLS_KEY_FILE": "missing.key"},
            "TLS_KEY_FILE='{d}/missing.key' must be empty or a readable file",
        ),
        (
            {"TLS_CERT_FILE": "server.key", "TLS_KEY_FILE": "server.crt"},
            "TLS_CERT_FILE and TLS_KEY_FILE must hold a PEM certificate and its unencrypted key",
        ),
        (
            {"TLS_CERT_FILE": "ca.crt", "TLS_KEY_FILE": "server.key"},  # a certificate, but not this key's
            "TLS_CERT_FILE and TLS_KEY_FILE must hold a PEM certificate and its unencrypted key",
        ),
    ],
)
def test_bad_tls_setting_stops_with_one_line(tmp_path, pki, settings, line):
    """Only one of the pair, a file that is not there, or files that are no matching PEM pair stop `python
    serve.py` with one line naming the setting, no traceback."""
    d = pki["ca.crt"].parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **{k: str(d / v) for k, v in settings.items()}}
    assert refused_start(env) == [f"sibyl: cannot start: {line.format(d=d)}"]


def test_nginx_terminates_tls_in_front_of_a_replica(live_server, tmp_path, pki):
    """The shipped nginx.conf with tls.conf included: HTTPS with the CA pinned reaches a plain-HTTP replica through
    the same locations, with HSTS and no version in the Server header; port 80's plain HTTP still answers too."""
    replica = live_server()
    proxy = Nginx(tmp_path, [f"127.0.0.1:{replica.port}"], tls=(pki["server.crt"], pki["server.key"])).start()
    try:
        r = requests.post(
            proxy.https_url + "/predict",
            json={"features": IRIS_ROWS},
            headers={**basic_auth(), "X-Request-ID": "over-tls"},
            timeout=10,
            verify=str(pki["ca.crt"]),
        )
        assert (r.status_code, r.json()["predictions"]) == (200, ["setosa", "virginica"])
        assert r.headers["X-Request-ID"] == "over-tls" and r.headers["Server"] == "nginx"
        assert r.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert [x["request_id"] for x in replica.request_lines() if x["path"] == "/predict"] == ["over-tls"]
        (logged,) = proxy.logged({"over-tls"})
        assert (logged["scheme"], logged["status"]) == ("https", 200)
        assert requests.get(proxy.url + "/health", timeout=10).status_code == 200
    finally:
        proxy.stop()
