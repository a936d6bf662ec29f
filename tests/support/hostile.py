"""The hostile-input corpus (tests/hostile/): cases read from data, expanded per protocol, sent raw, answers checked.

tests/hostile/protocols.json names each protocol's predict routes, how it wraps rows in a body, and its error shape.
tests/hostile/corpus.jsonl holds one case per line:

- name, group: unique id and what kind of hostility it is; why: an optional note.
- protocols: where it is sent (default: every protocol that has the case's route).
- method (POST), route ("default", "model" or "version", filled with model and version sent as they are, percent-
  encoding and all), or path (sent as is, for every protocol); query (appended after "?").
- content_type ("application/json"; null: none sent), headers (added as they are), auth (true: the test user's;
  false: none; a string: that Authorization value).
- Any string above or below may be written {"repeat": str, "times": n, "before": str, "after": str} (each part a
  string or such a spec again), so a 5,000-digit number or a 9 KB header stays one short line.
- body, one of: {"text": str} (UTF-8), {"base64": str}, {"rows": str} (JSON text put into the protocol's rows
  wrapper as is, so NaN or 1e400 survive; "shape" fills V2's), {"repeat": ...} (as above), {"gzip": body,
  "copies": n} (the body gzipped, the member repeated), {"deflate": body}, {"zeros": n}; "prefix"/"suffix"
  (base64) wrap the result; none: an empty body.
- send: "length" (default: Content-Length), "chunked", "none" (no length and no chunking: the body is not a body),
  {"length": n} (a Content-Length that lies; the client then half-closes), {"chunks": base64} (raw chunked framing,
  then a half-close), or {"raw": body} (the whole request as bytes, "{path}" and "{auth}" replaced).
- expect: the status, or {"protocol": status, "*": status}; code: Sibyl's error code where the shape carries one
  (same form); shape: "sibyl" or "gunicorn" (Sibyl's shape, request_id null: gunicorn answered) where a protocol's
  own shape does not apply (same form).
- live_only: the case needs a real socket (lying lengths, chunked framing, raw request lines).
"""

import base64
import functools
import gzip
import json
import socket
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "hostile"
PROTOCOLS = json.loads((CORPUS / "protocols.json").read_text())
# MLflow's error_code for each status Sibyl answers (app/protocols/mlflow.py), ENDPOINT_NOT_FOUND for unknown routes.
MLFLOW_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 404: "RESOURCE_DOES_NOT_EXIST", 422: "BAD_REQUEST"}


@dataclass
class Request:
    """One corpus case as sent to one protocol's endpoint, and what must come back."""

    case: str
    protocol: str
    method: str
    path: str
    headers: dict
    body: bytes
    send: object
    status: int
    shape: str
    code: str | None
    live_only: bool
    raw: bytes | None = None
    answered: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The pytest id: case and protocol."""
        return f"{self.case}[{self.protocol}]"


def cases() -> list[dict]:
    """Every case in the corpus, in file order."""
    lines = (CORPUS / "corpus.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def text(value: object) -> str:
    """A string field of a case: as it is, or built from {"repeat", "times", "before", "after"}."""
    if isinstance(value, str):
        return value
    return text(value.get("before", "")) + text(value["repeat"]) * value["times"] + text(value.get("after", ""))


def per_protocol(value: object, protocol: str, default: object = None) -> object:
    """A case field that may differ by protocol: {"native": x, "*": y}, or one value for all."""
    if isinstance(value, dict):
        return value.get(protocol, value.get("*", default))
    return default if value is None else value


def requests_for(auth_header: str) -> list[Request]:
    """Every (case, protocol) request of the corpus, with the test user's Authorization header where asked."""
    out = []
    for case in cases():
        for protocol in case.get("protocols", PROTOCOLS):
            spec = PROTOCOLS[protocol]
            route = case.get("route", "default")
            if "path" not in case and route not in spec["routes"]:
                continue  # KServe V1 has no version routes
            path = case.get("path") or spec["routes"][route].format(
                model=text(case.get("model", "iris")), version=text(case.get("version", "1"))
            )
            if "query" in case:
                path += "?" + text(case["query"])
            headers = {}
            content_type = case.get("content_type", "application/json")
            if content_type is not None:
                headers["Content-Type"] = text(content_type)
            auth = case.get("auth", True)
            if auth is True:
                headers["Authorization"] = auth_header
            elif auth is not False:
                headers["Authorization"] = text(auth)
            headers.update({name: text(value) for name, value in case.get("headers", {}).items()})
            send = case.get("send", "length")
            raw = None
            if isinstance(send, dict) and "raw" in send:
                raw = body_bytes(json.dumps(send["raw"]), protocol)
                raw = raw.replace(b"{path}", path.encode()).replace(b"{auth}", auth_header.encode())
            shape = per_protocol(case.get("shape"), protocol, spec["shape"])
            out.append(
                Request(
                    case=case["name"],
                    protocol=protocol,
                    method=case.get("method", "POST"),
                    path=path,
                    headers=headers,
                    body=body_bytes(json.dumps(case.get("body")), protocol),
                    send=send,
                    status=per_protocol(case["expect"], protocol),
                    shape=shape,
                    code=per_protocol(case.get("code"), protocol),
                    live_only=bool(case.get("live_only")) or raw is not None or send not in ("length", "chunked"),
                    raw=raw,
                )
            )
    return out


@functools.cache
def body_bytes(spec_json: str, protocol: str) -> bytes:
    """A body spec's bytes for a protocol (cached: some bodies are megabytes)."""
    return _build(json.loads(spec_json), protocol)


def _build(spec: dict | None, protocol: str) -> bytes:
    """Bytes from a body spec (see the module docstring)."""
    if spec is None:
        return b""
    if "text" in spec:
        data = spec["text"].encode()
    elif "base64" in spec:
        data = base64.b64decode(spec["base64"])
    elif "rows" in spec:
        template = PROTOCOLS[protocol]["rows"].replace("{shape}", json.dumps(spec.get("shape", [1, 4])))
        data = template.replace("{rows}", text(spec["rows"])).encode()
    elif "repeat" in spec:
        data = text(spec).encode()
    elif "gzip" in spec:
        data = gzip.compress(_build(spec["gzip"], protocol), compresslevel=9, mtime=0) * spec.get("copies", 1)
    elif "deflate" in spec:
        data = zlib.compress(_build(spec["deflate"], protocol), 9) * spec.get("copies", 1)
    elif "zeros" in spec:
        data = bytes(spec["zeros"])
    else:
        raise ValueError(f"unknown body spec {sorted(spec)}")
    return base64.b64decode(spec.get("prefix", "")) + data + base64.b64decode(spec.get("suffix", ""))


def check_answer(req: Request, status: int, headers: dict, body: bytes) -> None:
    """Assert the answer is the expected 4xx in the protocol's error shape: JSON, no trace, no HTML, no echo."""
    assert status == req.status, f"{req.id}: {status} (expected {req.status}): {body[:300]!r}"
    if req.method == "HEAD":
        return  # an answer to HEAD has no body
    content_type = headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == "application/json", f"{req.id}: {content_type!r}"
    lowered = body.lower()
    assert b"<html" not in lowered and b"traceback" not in lowered and b'file "' not in lowered, req.id
    error = json.loads(body)
    if req.shape in ("sibyl", "gunicorn"):
        assert set(error) == {"error"} and set(error["error"]) == {"code", "message", "request_id"}, req.id
        inner = error["error"]
        assert isinstance(inner["message"], str) and inner["message"], req.id
        if req.shape == "gunicorn":
            assert inner["request_id"] is None, req.id
        else:
            assert inner["request_id"] == headers.get("x-request-id"), req.id
        if req.code:
            assert inner["code"] == req.code, f"{req.id}: code {inner['code']!r} (expected {req.code!r})"
    elif req.shape == "mlflow":
        assert set(error) == {"error_code", "message"}, req.id
        expected = MLFLOW_CODES.get(status, "BAD_REQUEST")
        assert error["error_code"] in (expected, "ENDPOINT_NOT_FOUND"), f"{req.id}: {error['error_code']}"
        assert isinstance(error["message"], str) and error["message"], req.id
    else:  # KServe V1 and V2: {"error": "<message>"}
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], req.id
    if status == 405:
        assert headers.get("allow"), f"{req.id}: a 405 names the methods allowed"


# --- raw HTTP over a socket: what requests and http.client would normalise or refuse to send ---


def wire_bytes(req: Request) -> tuple[bytes, bytes]:
    """The request's head and body as they go on the wire, framed as the case says."""
    if req.raw is not None:
        return req.raw, b""
    lines = [f"{req.method} {req.path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in req.headers.items()]
    body, send = req.body, req.send
    if send == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif send == "chunked":
        lines.append("Transfer-Encoding: chunked")
        step = 65536
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif isinstance(send, dict) and "length" in send:
        lines.append(f"Content-Length: {send['length']}")
    elif isinstance(send, dict) and "chunks" in send:
        lines.append("Transfer-Encoding: chunked")
        body = base64.b64decode(send["chunks"])
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head, body


def exchange(port: int, req: Request, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send the request on a fresh connection (the body from a thread, so a server that answers early is read while
    the body still flows); return the answer's status, headers and body. A connection closed without an answer
    raises ConnectionError."""
    head, body = wire_bytes(req)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send() -> None:
        try:
            sock.sendall(head + body)
            if req.raw is not None or req.send != "length":
                sock.shutdown(socket.SHUT_WR)  # the server sees the end of what a lying client sends
        except OSError:
            pass  # the server answered and closed before taking it all: its answer is still read below

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass  # a reset after the answer arrived; an empty answer fails below
    finally:
        sender.join(timeout)
        sock.close()
    if not answer:
        raise ConnectionError(f"{req.id}: the connection closed without an answer")
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers.get("content-length", len(rest)))
    return int(status_line.split()[1]), headers, rest[:length]
