"""One structured line per request on stdout, and the request id that ties it to errors."""

import contextlib
import json
import logging
import os
import re
import select
import stat
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from time import perf_counter, time

import orjson
from flask import Flask, Response, g, request

from app import process

log = logging.getLogger(__name__)

# A caller's X-Request-ID is echoed into logs and headers, so only a safe token is accepted.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Text-format values written bare; anything else (a newline, space, quote, "=") is JSON-quoted, so a value from
# the request (its path) can never end the line or pass for another field.
_BARE = re.compile(r"[A-Za-z0-9._:/@+,-]+")


# A line that stdout (a pipe) could take only in parts gets this long for the rest before it is dropped.
_PART_SECONDS = 1.0
# The process's stdout reopened without blocking, when it is a pipe: (fd 1's device and inode, the new fd), or None.
_pipe: tuple[tuple[int, int], int | None] | None = None


def _stdout_pipe() -> int | None:
    """A non-blocking descriptor of the pipe this process's stdout is, or None when stdout is anything else.

    A log pipe whose reader stopped reading must not block a request: a blocked sync worker misses its heartbeat
    and is killed, and so is the next. Reopened, not fd 1 made non-blocking: O_NONBLOCK belongs to the open file,
    which the shell or supervisor that started gunicorn shares. Inherited by workers: the master opens it first."""
    global _pipe
    try:
        st = os.fstat(1)
    except OSError:
        return None
    if _pipe is None or _pipe[0] != (st.st_dev, st.st_ino):
        fd = None
        if stat.S_ISFIFO(st.st_mode):
            with contextlib.suppress(OSError):  # no /proc: write as before
                fd = os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK)
        _pipe = ((st.st_dev, st.st_ino), fd)
    return _pipe[1]


def _write_to(fd: int, data: bytes) -> None:
    """Write data to a non-blocking pipe: at once or not at all (BlockingIOError) up to PIPE_BUF bytes, which the
    kernel writes whole; a longer line's rest gets _PART_SECONDS."""
    done = os.write(fd, data)
    deadline = perf_counter() + _PART_SECONDS
    while done < len(data):
        if not select.select([], [fd], [], max(0.0, deadline - perf_counter()))[1]:
            raise BlockingIOError("stdout took only part of a line")
        done += os.write(fd, data[done:])


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is now (so pytest's capture sees it), and never blocks or fails
    a request for it: a line stdout can't take now (a pipe no one reads, or one whose reader left) is dropped and
    counted (sibyl_log_lines_dropped_total)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: Callable[[], None] = lambda: None  # set by init_app once the metrics exist

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def write(self, line: str) -> None:
        """Write one finished line, as emit() would after formatting; or drop it."""
        with self.lock:
            try:
                pipe = _stdout_pipe() if sys.stdout is sys.__stdout__ else None
                if pipe is None:
                    self.stream.write(line + "\n")
                    self.flush()
                else:
                    _write_to(pipe, (line + "\n").encode(errors="backslashreplace"))
            except OSError:  # BlockingIOError: the pipe is full; BrokenPipeError: its reader is gone
                self.dropped()

    def emit(self, record: logging.LogRecord) -> None:
        """Format the record and write it through write(), which never blocks or raises."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001  (logging's contract: a bad record is reported on stderr, never raised)
            self.handleError(record)
            return
        self.write(line)


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


def request_id(sent: str) -> str:
    """The request's id: the caller's X-Request-ID when it is a safe token, else a new random one."""
    return sent if REQUEST_ID.fullmatch(sent) else os.urandom(16).hex()


def server_timing(duration: float) -> str:
    """The Server-Timing header's value: the server's own time, apart from the network's (browsers show it, as the
    web page does, and so does curl -i)."""
    return f"app;dur={duration * 1000:.3f}"


class RequestLines:
    """Writes each request's one line: the fields every line has, then what the request's steps logged."""

    def __init__(self, extensions: dict) -> None:
        # The app's: the metrics and the cache, made later in create_app, are looked up per request.
        self.extensions = extensions
        (self.handler,) = logging.getLogger("app").handlers
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.enabled = log.isEnabledFor(logging.INFO)
        # JSON request lines skip the LogRecord (caller lookup, thread and process names, handler dispatch):
        # the same line for a third of the cost, on every request. Text lines are for people; they take the long way.
        self.direct = isinstance(self.handler.formatter, JsonFormatter)

    def done(
        self,
        request_id: str,
        remote_addr: str | None,
        method: str,
        path: str,
        endpoint: str | None,
        protocol: str | None,
        status: int,
        start: float,
        logged: dict,
        timings: dict | None,
    ) -> float:
        """A request answered since start (perf_counter): count it in the metrics (endpoint and protocol None when
        routing failed) and write its line. Returns its duration, the one timing the line, the latency histogram and
        Server-Timing share."""
        now = perf_counter()
        duration = now - start
        ext = self.extensions
        ext["sibyl.metrics"].request_done(endpoint, protocol, method, status, logged, duration, now, ext["sibyl.cache"])
        self.write(request_id, remote_addr, method, path, status, duration, logged, timings)
        return duration

    def write(
        self,
        request_id: str,
        remote_addr: str | None,
        method: str,
        path: str,
        status: int,
        duration: float,
        logged: dict,
        timings: dict | None,
    ) -> None:
        """One request's line; logged holds what its steps found (user, model, rows, cache), timings the pipeline's
        steps (written at DEBUG)."""
        if not self.enabled:  # LOG_LEVEL=WARNING: don't build a line nobody will write
            return
        fields = {
            "request_id": request_id,
            "pid": process.pid(),  # which gunicorn worker answered
            "remote_addr": remote_addr,
            "user": None,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            **logged,
        }
        if self.debug and timings is not None:
            fields["steps_ms"] = {k: round(v * 1000, 3) for k, v in timings.items()}
        if self.direct:
            self.handler.write(json_line(time(), "INFO", log.name, "request", fields))
        else:
            log.info("request", extra={"fields": fields})


def init_app(app: Flask) -> None:
    """Give each request an id, and log it once it has its response."""
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    extensions = app.extensions
    lines = extensions["sibyl.request_log"] = RequestLines(extensions)

    def _dropped() -> None:
        if "sibyl.metrics" in extensions:  # a line dropped before the metrics exist goes uncounted
            extensions["sibyl.metrics"].log_lines_dropped.inc()

    lines.handler.dropped = _dropped

    @app.before_request
    def _start() -> None:
        g.start = perf_counter()
        g.request_id = request_id(request.headers.get("X-Request-ID", ""))
        g.log = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        rule = request.url_rule  # None when routing failed
        endpoint = rule and rule.endpoint
        duration = lines.done(
            g.request_id,
            request.remote_addr,
            request.method,
            request.path,
            endpoint,
            request.blueprint,
            response.status_code,
            g.start,
            g.log,
            g.get("timings"),
        )
        response.headers["X-Request-ID"] = g.request_id
        response.headers.add("Server-Timing", server_timing(duration))  # add: no scan for an old one
        return response
