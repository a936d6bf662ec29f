"""nginx (Debian's package) running the shipped deploy/nginx config on loopback: the same file, with only its
upstreams, listen addresses and file paths rewritten so it runs in a private folder, always stopped."""

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.servers import ROOT, HarnessError, children, free_port, spawn, stop

SHIPPED = ROOT / "deploy" / "nginx"


def nginx_binary() -> str:
    """The system nginx (Debian's package, which `make test` installs)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not found:
        raise HarnessError("nginx is not on PATH: `make test` installs it (apt package nginx)")
    return found


def rewrite(text: str, old: str, new: str, pattern: bool = False) -> str:
    """text with the one occurrence of old (a regex when pattern) replaced: the shipped file changing shape fails
    the harness loudly rather than testing something else."""
    found = len(re.findall(old if pattern else re.escape(old), text, flags=re.M))
    if found != 1:
        raise HarnessError(f"deploy/nginx: expected one {old!r}, found {found}")
    return re.sub(old if pattern else re.escape(old), lambda _: new, text, flags=re.M)


class Nginx:
    """The shipped nginx.conf in front of `upstreams` (host:port), listening on a free loopback port; with `tls`
    (certificate, key), tls.conf is included too, on a second free port. With `upstream_keepalive` (the bench's
    variant for gthread workers, not the shipped file), each nginx worker keeps up to that many idle connections to
    the upstreams, as the upstream block's comment says to add."""

    def __init__(
        self, workdir: Path, upstreams: list[str], tls: tuple[Path, Path] | None = None, upstream_keepalive: int = 0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_port = free_port() if tls else None
        self.https_url = f"https://127.0.0.1:{self.tls_port}" if tls else None
        self.dir = workdir / f"nginx-{self.port}"
        self.upstreams = upstreams
        self.tls = tls
        self.upstream_keepalive = upstream_keepalive
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        """nginx.conf for this run: the shipped text with loopback upstreams and listeners, and files in self.dir."""
        text = (SHIPPED / "nginx.conf").read_text()
        d = self.dir
        # As root the master switches its workers to this user; Debian has no `nginx` user (the image does).
        me = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        text = rewrite(text, "user nginx;", me)
        text = rewrite(text, "pid /var/run/nginx.pid;", f"pid {d}/nginx.pid;")
        text = rewrite(text, "error_log /var/log/nginx/error.log", f"error_log {d}/error.log")
        text = rewrite(text, "access_log /var/log/nginx/access.log", f"access_log {d}/access.log")
        # The package's temp folders (/var/lib/nginx) belong to root.
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temps = "".join(f"    {kind}_temp_path {d}/{kind};\n" for kind in kinds)
        text = rewrite(text, r"^http \{\n", "http {\n" + temps, pattern=True)
        server = re.search(r"^\s*server app:8000 (.*);$", text, flags=re.M)
        if not server:
            raise HarnessError("deploy/nginx/nginx.conf: no `server app:8000 ...;` line in its upstream")
        lines = "".join(f"        server {address} {server.group(1)};\n" for address in self.upstreams)
        text = rewrite(text, r"^\s*server app:8000 .*;\n", lines, pattern=True)
        text = rewrite(text, "listen 80 default_server;", f"listen 127.0.0.1:{self.port} default_server;")
        if self.tls:
            text = rewrite(text, "# include tls.conf;", "include tls.conf;")
        if self.upstream_keepalive:
            # gunicorn closes a keep-alive connection idle for its `keepalive` (2 s): nginx lets go of it first.
            pool = f"keepalive {self.upstream_keepalive};\n        keepalive_timeout 1s;"
            text = rewrite(text, "zone sibyl 64k;", f"zone sibyl 64k;\n        {pool}")
            # HTTP/1.1 without `Connection: close` towards the upstream, or nothing would stay open.
            forward = "proxy_set_header X-Forwarded-Proto $scheme;"
            text = rewrite(
                text, forward, f'{forward}\n        proxy_http_version 1.1;\n        proxy_set_header Connection "";'
            )
        return text

    def tls_config(self) -> str:
        """tls.conf for this run: the shipped text listening on loopback with the test's certificate and key."""
        cert, key = self.tls
        text = (SHIPPED / "tls.conf").read_text()
        text = rewrite(text, "listen 443 ssl;", f"listen 127.0.0.1:{self.tls_port} ssl;")
        text = rewrite(text, "ssl_certificate /etc/nginx/tls/sibyl.crt;", f"ssl_certificate {cert};")
        return rewrite(text, "ssl_certificate_key /etc/nginx/tls/sibyl.key;", f"ssl_certificate_key {key};")

    def start(self, timeout: float = 20) -> "Nginx":
        """Write the config, check it with `nginx -t`, start in the foreground and wait until every port listens."""
        self.dir.mkdir(parents=True)
        (self.dir / "nginx.conf").write_text(self.config())
        if self.tls:
            (self.dir / "tls.conf").write_text(self.tls_config())
        args = [nginx_binary(), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g", "daemon off;"]
        checked = subprocess.run([*args[:-2], "-t"], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise HarnessError(f"nginx -t refused the config:\n{checked.stderr}")
        out = self.dir / "nginx.out"
        self.proc = spawn(args, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port) if p]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"nginx exited with status {self.proc.returncode}:\n{self.tail()}")
            if all(listening(port) for port in ports):
                return self
            time.sleep(0.05)
        raise HarnessError(f"nginx did not listen on {ports} within {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        """The end of nginx's output and error log, for error messages."""
        files = (self.dir / "nginx.out", self.dir / "error.log")
        return "\n".join(f.read_text(errors="replace")[-2000:] for f in files if f.exists())

    def access_lines(self) -> list[dict]:
        """nginx's JSON access-log lines so far (the shipped `sibyl` format), one per request."""
        path = self.dir / "access.log"
        if not path.exists():
            return []
        # A last line without its newline is still being written.
        return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.startswith("{")]

    def logged(self, request_ids: set[str], timeout: float = 5) -> list[dict]:
        """The access-log lines of these requests, one each (nginx writes a line just after the answer's last byte,
        so they are awaited)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [x for x in self.access_lines() if x["request_id"] in request_ids]
            if len(found) >= len(request_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def processes(self) -> list[int]:
        """PIDs of the master and its workers, from /proc (the bench counts their CPU)."""
        return sorted([self.proc.pid, *children(self.proc.pid)])

    def stop(self) -> None:
        """SIGINT: nginx's fast shutdown; SIGKILL for the group if it lingers."""
        if self.proc:
            stop(self.proc, signal.SIGINT)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on this loopback port."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False
