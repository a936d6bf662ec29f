"""One structured line per request on stdout, and the request id that ties it to errors."""

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from time import perf_counter, time

import orjson
from flask import Flask, Response, g, request

log = logging.getLogger(__name__)

# A caller's X-Request-ID is echoed into logs and headers, so only a safe token is accepted.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Text-format values written bare; anything else (a newline, space, quote, "=") is JSON-quoted, so a value from
# the request (its path) can never end the line or pass for another field.
_BARE = re.compile(r"[A-Za-z0-9._:/@+,-]+")


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is now (so pytest's capture sees it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def write(self, line: str) -> None:
        """Write one finished line, as emit() would after formatting."""
        with self.lock:
            self.stream.write(line + "\n")
            self.flush()


def json_line(created: float, level: str, logger: str, message: str, fields: dict) -> str:
    """One log line as JSON: time, level, logger, message, then the fields at the top level."""
    line = {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    line.update(fields)
    return orjson.dumps(line, default=str).decode()


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object; request lines merge their fields in at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single line of JSON."""
        fields = getattr(record, "fields", {})
        if record.exc_info:
            fields = {**fields, "exception": self.formatException(record.exc_info)}
        return json_line(record.created, record.levelname, record.name, record.getMessage(), fields)


def _text_value(value: object) -> str:
    """A field value for a text line: bare when it is a plain token, else a JSON string (ASCII, escaped)."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """Human-readable lines: the message, then key=value fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its fields appended."""
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in getattr(record, "fields", {}).items())
        return f"{super().format(record)} {fields}".rstrip()


def configure_logging(level: str, fmt: str) -> None:
    """Send the app's loggers to stdout in the configured format; gunicorn keeps stderr for its own."""
    handler = _Stdout()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("app")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def write(logger: logging.Logger, level: int, message: str, fields: dict) -> None:
    """One line with these fields on the app's stdout handler, in the configured format, whatever LOG_LEVEL says."""
    # Found by type: pytest adds its capture handlers to the logger while a test runs.
    handler = next(h for h in logging.getLogger("app").handlers if isinstance(h, _Stdout))
    if isinstance(handler.formatter, JsonFormatter):
        handler.write(json_line(time(), logging.getLevelName(level), logger.name, message, fields))
    else:  # handed to the handler itself, so the logger's level can't drop it
        handler.handle(logger.makeRecord(logger.name, level, "", 0, message, (), None, extra={"fields": fields}))


def init_app(app: Flask) -> None:
    """Give each request an id, and log it once it has its response."""
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    debug = log.isEnabledFor(logging.DEBUG)
    enabled = log.isEnabledFor(logging.INFO)
    (handler,) = logging.getLogger("app").handlers
    # JSON request lines skip the LogRecord (caller lookup, thread and process names, handler dispatch):
    # the same line for a third of the cost, on every request. Text lines are for people; they take the long way.
    direct = isinstance(handler.formatter, JsonFormatter)
    # Created by metrics.init_app later in create_app; looked up per request, as the app is built after this.
    extensions = app.extensions

    @app.before_request
    def _start() -> None:
        g.start = perf_counter()
        sent = request.headers.get("X-Request-ID", "")
        g.request_id = sent if REQUEST_ID.fullmatch(sent) else os.urandom(16).hex()
        g.log = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.request_id
        now = perf_counter()
        duration = now - g.start  # the one timing: the log line, the latency histogram and Server-Timing share it
        # The server's own time, apart from the network's: browsers show it (the web page does), as do curl -i users.
        response.headers.add("Server-Timing", f"app;dur={duration * 1000:.3f}")  # add: no scan for an old one
        extensions["sibyl.metrics"].request_done(response.status_code, duration, now, extensions["sibyl.cache"])
        if not enabled:  # LOG_LEVEL=WARNING: don't build a line nobody will write
            return response
        fields = {
            "request_id": g.request_id,
            "pid": os.getpid(),  # which gunicorn worker answered
            "remote_addr": request.remote_addr,
            "user": None,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(duration * 1000, 3),
            **g.log,
        }
        if debug and "timings" in g:
            fields["steps_ms"] = {k: round(v * 1000, 3) for k, v in g.timings.items()}
        if direct:
            handler.write(json_line(time(), "INFO", log.name, "request", fields))
        else:
            log.info("request", extra={"fields": fields})
        return response
