"""Slow clients (slowloris headers, slow bodies) against 2 sync workers: behind the shipped nginx they cost no worker
and normal requests keep being answered; directly on gunicorn each slow connection holds a worker until the client
gives up or gunicorn's `timeout` kills that worker, so normal requests wait: the proxy is required in front of any
client you don't trust."""

import json
import select
import socket
import statistics
import threading
import time

import requests
from conftest import KEY, USER, basic_auth

from tests.support.nginx import Nginx
from tests.support.servers import record_artifact

SLOW = 4  # slow connections, twice the workers: 2 trickle their headers, 2 their body
BODY = json.dumps({"features": [[5.1, 3.5, 1.4, 0.2]]}).encode()  # 39 bytes: longer than any trickle here
ROW = {"features": [[6.7, 3.0, 5.2, 2.3]]}


class SlowClient(threading.Thread):
    """One raw connection sending a POST /predict a byte a second: its headers (slowloris) or, after whole headers,
    its body. It trickles for `trickle` seconds, then goes silent, and gives up (closes) after `limit` seconds unless
    the server closed it first; `ended` and `by` say when and who."""

    def __init__(self, port: int, kind: str, trickle: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.port, self.kind, self.trickle, self.limit = port, kind, trickle, limit
        auth = basic_auth()["Authorization"]
        head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {auth}\r\n"
        if kind == "headers":
            self.first, self.rest = head.encode(), b"X-Slow: " + b"a" * 100
        else:
            head += f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
            self.first, self.rest = head.encode(), BODY
        self.opened = self.ended = 0.0
        self.by = ""  # "server" (it closed or answered) or "client" (gave up at limit)
        self.answer = ""  # the first line the server sent, if any

    def run(self) -> None:
        """Connect, trickle, and watch for the server closing the connection."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.opened = time.monotonic()
        try:
            sock.sendall(self.first)
            for second in range(self.limit):
                if second < self.trickle:
                    sock.sendall(self.rest[second : second + 1])
                if select.select([sock], [], [], 1.0)[0]:  # the one-second pace, and the server's close or answer
                    self.answer = sock.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                    self.by = "server"
                    break
            else:
                self.by = "client"
        except OSError:  # reset, or a send after the server closed
            self.by = "server"
        finally:
            self.ended = time.monotonic()
            sock.close()


class NormalLoad(threading.Thread):
    """One-row predictions, one after another on fresh connections, until stopped: (sent, answered, status) each."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.answers: list[tuple[float, float, int]] = []

    def run(self) -> None:
        """Send until done is set; each request may wait 45 s (more than gunicorn's 30 s timeout)."""
        while not self.done.is_set():
            sent = time.monotonic()
            r = requests.post(self.url + "/predict", json=ROW, auth=(USER, KEY), timeout=45)
            self.answers.append((sent, time.monotonic(), r.status_code))
            self.done.wait(0.2)


def attack(port: int, url: str, trickle: dict[str, int], limit: int) -> tuple[list[SlowClient], list]:
    """SLOW slow clients on port (half of each kind, trickling for trickle[kind] seconds, giving up after limit),
    and normal requests to url, sent from a second after the slow ones connected until a second after they all
    ended; every thread is joined within a bounded wait."""
    slow = [SlowClient(port, kind, trickle[kind], limit) for kind in ("headers", "body") for _ in range(SLOW // 2)]
    for client in slow:
        client.start()
        time.sleep(0.05)  # in this order in the listen queue
    time.sleep(1)  # each has sent its first bytes: the ones a worker accepted now hold it
    normal = NormalLoad(url)
    normal.start()
    for client in slow:
        client.join(limit + 10)
        assert not client.is_alive(), f"a slow {client.kind} client did not end within {limit + 10} s"
    time.sleep(1)  # normal requests once the slow ones are gone, for comparison
    normal.done.set()
    normal.join(60)
    assert not normal.is_alive(), "a normal request was not answered within its 45 s timeout"
    assert normal.answers and {status for _, _, status in normal.answers} == {200}
    return slow, normal.answers


def figures(slow: list[SlowClient], answers: list, start: float) -> dict:
    """What happened, in seconds from the first slow connection: each slow client's end, and normal latencies."""
    latencies = [answered - sent for sent, answered, _ in answers]
    gone = max(c.ended for c in slow)
    after = [answered - sent for sent, answered, _ in answers if sent > gone]
    return {
        "slow_clients": [
            {"kind": c.kind, "ended_s": round(c.ended - start, 2), "closed_by": c.by, "server_sent": c.answer}
            for c in slow
        ],
        "normal_requests": {
            "count": len(answers),
            "first_sent_s": round(answers[0][0] - start, 2),
            "first_latency_s": round(latencies[0], 3),
            "median_latency_s": round(statistics.median(latencies), 3),
            "max_latency_s": round(max(latencies), 3),
            "after_slow_clients_ended": {"count": len(after), "max_latency_s": round(max(after, default=0), 3)},
        },
    }


def record(name: str, result: dict) -> None:
    """Keep a scenario's figures in test-artifacts/slow_clients.json, and print them."""
    record_artifact("slow_clients.json", name, result)
    print(name, json.dumps(result))


def test_behind_the_shipped_nginx_slow_clients_cost_no_worker(live_server, tmp_path):
    """Through nginx (the shipped config), 4 slow clients against 2 sync workers: normal requests went on being
    answered while all 4 were connected; nginx dropped the slowloris ones when
    client_header_timeout (10 s, for the whole header) ran out and the stalled bodies 10 s after their last byte
    (client_body_timeout), before the clients gave up; gunicorn never saw any of them."""
    server = live_server(workers=2)
    proxy = Nginx(tmp_path, [f"127.0.0.1:{server.port}"]).start()
    try:
        # Bodies trickle for 3 s, then stall: client_body_timeout counts from the last byte read.
        slow, answers = attack(proxy.port, proxy.url, {"headers": 20, "body": 3}, limit=20)
    finally:
        proxy.stop()
    start = min(c.opened for c in slow)
    result = figures(slow, answers, start)
    result["nginx_status_for_slow_clients"] = sorted(
        x["status"] for x in proxy.access_lines() if x["uri"] == "/predict" and x["upstream_addr"] == ""
    )
    record("through_nginx", result)

    assert {c.by for c in slow} == {"server"}  # nginx dropped every one before it gave up
    first_drop = min(c.ended for c in slow)
    header_drops = [c.ended for c in slow if c.kind == "headers"]
    body_drops = [c.ended for c in slow if c.kind == "body"]
    assert max(header_drops) < min(body_drops)  # the header deadline runs from the start, the body's from a stall
    # Answered while all 4 held their connections (sent one after another: at most one straddles the first drop).
    # Directly on gunicorn, the same attack lets none through (the next test).
    assert len([answered for _, answered, _ in answers if answered < first_drop]) >= 5
    assert len(result["nginx_status_for_slow_clients"]) == SLOW
    # gunicorn saw the normal requests alone: one request line each, none for the slow connections.
    assert len([x for x in server.request_lines() if x["path"] == "/predict"]) == len(answers)


def test_directly_on_gunicorn_slow_clients_hold_the_sync_workers(live_server):
    """Without a proxy, with the shipped gunicorn.conf.py: the 2 workers accept the first 2 slow connections and
    block reading them; the other 2 wait in the listen queue, and so does every normal request behind them. The
    first normal request is answered only once the slow clients give up (6 s here); none is killed, as 6 s is
    under gunicorn's 30 s timeout."""
    server = live_server(workers=2)
    slow, answers = attack(server.port, server.url, {"headers": 6, "body": 6}, limit=6)
    start = min(c.opened for c in slow)
    result = figures(slow, answers, start)
    result["worker_timeouts"] = server.stderr.read_text().count("WORKER TIMEOUT")
    record("direct_gunicorn", result)

    assert {c.by for c in slow} == {"client"}  # gunicorn closed none of them: each ended when its client gave up
    gave_up = min(c.ended for c in slow)
    first_sent, first_answered, _ = answers[0]
    assert first_sent < gave_up < first_answered  # sent while they held the workers, answered only after
    assert result["worker_timeouts"] == 0


def test_directly_on_gunicorn_the_worker_timeout_frees_a_worker_only_by_killing_it(live_server):
    """The same attack with gunicorn's timeout at 3 s (GUNICORN_CMD_ARGS, instead of the shipped 30 s) and slow
    clients that would go on for 20 s: each worker holding a slow connection is killed at its timeout, its
    replacement accepts the next slow connection in the queue and is killed in turn; the normal request behind
    them is answered only after 4 kills, 2 timeouts in (SLOW / workers x timeout: 60 s with the shipped 30 s)."""
    server = live_server({"GUNICORN_CMD_ARGS": "--timeout 3"}, workers=2)
    slow, answers = attack(server.port, server.url, {"headers": 20, "body": 20}, limit=20)
    start = min(c.opened for c in slow)
    result = figures(slow, answers, start)
    result["worker_timeouts"] = server.stderr.read_text().count("WORKER TIMEOUT")
    result["timeout_s"] = 3
    record("direct_gunicorn_timeout_3s", result)

    assert {c.by for c in slow} == {"server"}  # each ended when gunicorn killed the worker holding it
    first_sent, first_answered, _ = answers[0]
    assert first_sent < max(c.ended for c in slow) < first_answered
    assert result["worker_timeouts"] >= SLOW
