"""One audit line per admin action or refused-login burst, on the request log's stdout."""

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from flask import g, has_request_context, request

from app import process, request_log

log = logging.getLogger(__name__)

# Addresses whose refused logins are counted; past this, the one refused longest ago is forgotten, so a flood of
# addresses costs bounded memory (about 230 bytes each, measured: 2.3 MB per worker at most).
MAX_ADDRESSES = 10_000


def audit(action: str, outcome: str, reason: str | None = None, **fields) -> None:
    """One audit line: who, what, from where, outcome (ok, refused, failed), why; never secrets. Outside a request
    (the gunicorn master's rollout) there is no request id, caller or address."""
    in_request = has_request_context()
    line = {
        "event": "audit",
        "request_id": g.get("request_id") if in_request else None,
        "pid": process.pid(),
        "remote_addr": request.remote_addr if in_request else None,
        "user": g.log.get("user") if in_request and "log" in g else None,
        "action": action,
        "outcome": outcome,
        "reason": reason,
        **fields,
    }
    # Written at any LOG_LEVEL: the level trims noise, and an audit trail is not noise.
    request_log.write(log, logging.INFO if outcome == "ok" else logging.WARNING, "audit", line)


class LoginFailures:
    """Refused logins per remote address, counted in this worker only: each gunicorn worker keeps its own counts,
    so with W workers up to W x (threshold - 1) refusals from one address in a window can pass without a line."""

    def __init__(self, threshold: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.window, self.clock = threshold, window, clock
        self._counts: OrderedDict[str, list] = OrderedDict()  # address -> [window start, refusals in it]
        self._lock = threading.Lock()  # gthread workers count from several threads

    def refused(self, address: str | None) -> bool:
        """Count one refused login; True only for the threshold-th in the address's window (write one line)."""
        now = self.clock()
        with self._lock:
            counted = self._counts.pop(address, None)
            # A window opens at the first refusal after the last one closed, so a burst gives one line per window.
            if counted is None or now - counted[0] >= self.window:
                counted = [now, 0]
            counted[1] += 1
            self._counts[address] = counted  # re-inserted last: the least recently refused is dropped first
            if len(self._counts) > MAX_ADDRESSES:
                self._counts.popitem(last=False)
            return counted[1] == self.threshold
