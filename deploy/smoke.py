"""Smoke-test a running ``edgeft serve``, then SIGTERM it while a request is in flight.

    python deploy/smoke.py --url http://127.0.0.1:PORT --pid PID --key KEY --chat chat --classifier sentiment

Standard library only, so it runs in the fresh runtime-only venv of ``deploy/rehearse.sh``.
Waits for ``/health``; calls ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(streamed), ``/v1/classify``, ``/metrics``; checks that a missing key gets 401 (on /metrics too); then starts four more
completions, sends SIGTERM to PID while they run and checks that they all finish (drain).
Exits non-zero with one line on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request


def call(url: str, path: str, body: dict | None = None, key: str | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"smoke: FAILED: {what}")
    print(f"smoke: ok   {what}")


def wait_healthy(url: str, pid: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("smoke: FAILED: the server exited before it was healthy")
        try:
            status, _ = call(url, "/health", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"smoke: FAILED: /health not 200 within {timeout:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--url", "--key", "--chat", "--classifier"):
        ap.add_argument(name, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()

    t0 = time.time()
    wait_healthy(a.url, a.pid, a.timeout)
    check(True, f"/health 200 after {time.time() - t0:.1f}s")

    status, _ = call(a.url, "/v1/models")
    check(status == 401, "/v1/models without the key -> 401")
    status, raw = call(a.url, "/v1/models", key=a.key)
    ids = sorted(m["id"] for m in json.loads(raw)["data"]) if status == 200 else []
    check(ids == sorted([a.chat, a.classifier]), f"/v1/models lists {ids}")

    status, raw = call(a.url, "/v1/completions", {"model": a.chat, "prompt": "Shall I compare thee", "max_tokens": 8},
                       key=a.key)
    body = json.loads(raw)
    check(status == 200 and body["usage"]["completion_tokens"] >= 1, f"/v1/completions -> {body.get('usage')}")

    status, raw = call(a.url, "/v1/chat/completions", {"model": a.chat, "stream": True, "max_tokens": 8,
                                                       "messages": [{"role": "user", "content": "Hello"}]}, key=a.key)
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    check(status == 200 and events and events[-1] == "[DONE]", f"/v1/chat/completions streamed {len(events)} events")

    status, raw = call(a.url, "/v1/classify", {"model": a.classifier, "input": ["a fine film", "dull"]}, key=a.key)
    data = json.loads(raw).get("data", [])
    check(status == 200 and len(data) == 2 and abs(sum(data[0]["scores"].values()) - 1) < 1e-3,
          f"/v1/classify -> {[d['label'] for d in data]}")

    status, raw = call(a.url, "/v1/completions", {"model": a.chat, "prompt": 5}, key=a.key)
    check(status == 400 and "error" in json.loads(raw), "a wrong type -> 400 with an error body")

    status, _ = call(a.url, "/metrics")
    check(status == 401, "/metrics without the key -> 401")
    status, raw = call(a.url, "/metrics", key=a.key)
    check(status == 200 and b"edgeft_requests_total" in raw, "/metrics exposes edgeft_requests_total")

    # Drain: completions admitted when SIGTERM arrives must still finish.
    results: list = []

    def slow() -> None:
        results.append(call(a.url, "/v1/completions", {"model": a.chat, "prompt": "From fairest creatures",
                                                       "max_tokens": 200}, key=a.key)[0])

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for th in threads:
        th.start()
    busy = re.compile(rb'edgeft_inference_in_flight\{model="' + re.escape(a.chat.encode()) + rb'"\} [1-9]')
    deadline = time.time() + 10  # until a sequence holds a slot (up to --parallel decode at once)
    while time.time() < deadline and not busy.search(call(a.url, "/metrics", key=a.key)[1]) and len(results) < 4:
        time.sleep(0.005)
    in_flight = len(threads) - len(results)
    os.kill(a.pid, signal.SIGTERM)
    for th in threads:
        th.join(60)
    check(in_flight >= 1 and results == [200] * 4,
          f"{in_flight} completions in flight at SIGTERM, all four finished: {results}")

if __name__ == "__main__":
    main()
