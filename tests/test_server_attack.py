"""Attacks on the connection layer of ``edgeft serve``: idle sockets, trickled requests, one address holding many.

The real server (``make_server``: uvicorn with ``GuardedH11``) runs in a thread on loopback.
The attacker connects from 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to ``lo``),
the well-behaved client from 127.0.0.1, so the per-address cap tells them apart. The read
deadline is short (1 s) so the test waits little; every wait is a bounded loop on a state
the test can see (a closed socket, the server's connection count), with generous bounds.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from runtime_artifacts import build

ATTACKERS = ("127.0.0.2", "127.0.0.3")
PARTIAL = b"GET /health HTTP/1.1\r\nHost: x\r\n"  # headers never finished


def _loopback_aliases() -> bool:
    try:
        for addr in ATTACKERS:
            with socket.socket() as s:
                s.bind((addr, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_aliases(), reason="needs 127.0.0.2 and .3 on loopback (Linux)")


@pytest.fixture(scope="module")
def sentiment(tiny_bert_dir, tmp_path_factory):
    return build("bert", str(tiny_bert_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """``make_server`` over the real app in a thread of the test process (no signals: stopped by flag)."""

    def __init__(self, sentiment, **settings) -> None:
        from edgeft.runtime.serve import ServeConfig, build_app
        from edgeft.runtime.serve.process import make_server

        self.config = ServeConfig(artifacts=(sentiment,), names=("sentiment",), port=free_port(), threads=1,
                                  **settings)
        self.server = make_server(self.config, build_app(self.config))
        self.guard = self.server.config.http.guard
        self.url = f"http://127.0.0.1:{self.config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def connect(self, source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.config.port), timeout=30, source_address=(source, 0))

    def wait_open(self, n: int) -> None:
        """Until the server counts ``n`` open connections (it accepts them in its own time)."""
        deadline = time.time() + 30
        while self.guard.open != n:
            assert time.time() < deadline, f"the server counts {self.guard.open} open connections, not {n}"
            time.sleep(0.02)


def read_to_close(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout means it never did)."""
    data = b""
    while len(data) < 1 << 16:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"the server kept an idle connection open for 30 s (got {data[:200]!r})") from None
        if not chunk:
            break
        data += chunk
    return data


def test_idle_sockets_are_capped_per_address_and_closed_by_the_read_deadline(sentiment):
    with Running(sentiment, max_connections_per_client=4, header_timeout=1.0) as srv:
        idle = []
        for _ in range(12):
            s = srv.connect(ATTACKERS[0])
            s.sendall(PARTIAL)
            idle.append(s)
        slow_body = srv.connect(ATTACKERS[1])  # whole headers, then a tenth of the promised body
        slow_body.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"input\": ")
        # a normal client is served at once, however many sockets the other address holds
        r = httpx.get(srv.url + "/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = httpx.post(srv.url + "/v1/classify", json={"input": "a fine film"}, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["label"] in ("negative", "positive")
        # the server closes every idle socket: over the cap at once with a 429 body, the rest at the deadline
        answers = [read_to_close(s) for s in idle]
        refused = [a for a in answers if a]
        assert len(refused) >= 12 - 4 - 4, answers  # at least the 8 over the cap, unless the deadline came first
        for a in refused:
            head, _, body = a.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 ") and b"application/json" in head, a
            assert b'"code": "too_many_connections"' in body and b'"message"' in body, a
        assert read_to_close(slow_body) == b""  # the body deadline: closed, no answer
        for s in [*idle, slow_body]:
            s.close()
        srv.wait_open(0)
        assert httpx.post(srv.url + "/v1/classify", json={"input": "fine"}, timeout=30).status_code == 200
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
        assert 'edgeft_client_disconnects_total{route="/v1/classify"} 1' in metrics
        assert 'status="500"' not in metrics


def test_health_answers_past_max_connections_and_the_rest_get_an_error_body(sentiment):
    with Running(sentiment, max_connections=4, max_connections_per_client=2, header_timeout=120) as srv:
        held = [srv.connect(addr) for addr in ATTACKERS for _ in range(2)]
        for s in held:
            s.sendall(PARTIAL)
        srv.wait_open(4)  # the server holds its limit of connections, all idle
        assert srv.guard.saturated is False
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"  # the probe still passes
            assert srv.guard.saturated
            r = c.post("/v1/classify", json={"input": "a fine film"})
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["code"] == "server_busy" and "--max-connections" in r.json()["error"]["message"]
            assert c.get("/metrics").status_code == 200
        for s in held:
            s.close()
        srv.wait_open(0)
        assert httpx.post(srv.url + "/v1/classify", json={"input": "a fine film"}, timeout=30).status_code == 200


def test_guard_counts_and_refuses_per_address():
    from edgeft.runtime.serve.process import ConnectionGuard

    g = ConnectionGuard(limit=3, per_client=2, read_timeout=1.0)
    assert g.admit("a") and g.admit("a") and not g.admit("a") and g.admit("b")
    assert g.open == 3 and not g.saturated
    assert g.admit("c") and g.saturated
    g.release("a")
    assert g.admit("a") and g.by_client == {"a": 2, "b": 1, "c": 1}
    for addr in ("a", "a", "b", "c"):
        g.release(addr)
    assert g.open == 0 and not g.by_client
    unlimited = ConnectionGuard(limit=3, per_client=0, read_timeout=1.0)
    assert all(unlimited.admit("a") for _ in range(10))
    head, _, body = g.refusal().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests") and f"content-length: {len(body)}".encode() in head
