"""Bad input to ``edgeft serve``: every case the server once answered with a 500, a traceback or a wrong code.

The app runs in-process under Starlette's ASGI test client over three tiny artifacts (a llama,
a BERT classifier and the BERT encoder for embeddings) with a small ``max_tokens`` cap; the aborted-upload and busy-port
cases need real sockets, so they run uvicorn on loopback and the CLI in a subprocess.
The fuzz test posts a few hundred generated malformed bodies to every route the app
declares, mutating every field the wire parsers read (found by recording the keys they
look up), and wants a 4xx with an OpenAI-style error body and a healthy server after.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient
from runtime_artifacts import build

KEY, METRICS_KEY = "api-key-1", "metrics-key-1"
CLI = [sys.executable, "-c", "from edgeft.cli import main; main()"]


@pytest.fixture(scope="module")
def arts(tiny_llama_dir, tiny_bert_dir, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp() / "runtime-artifacts")
    return {"chat": build("llama", str(tiny_llama_dir), root), "sentiment": build("bert", str(tiny_bert_dir), root),
            "emb": build("embedding", str(tiny_bert_dir), root)}


def config(arts, **kw):
    from edgeft.runtime.serve import ServeConfig

    return ServeConfig(artifacts=(arts["chat"], arts["sentiment"], arts["emb"]), names=("chat", "sentiment", "emb"),
                       threads=1,
                       max_tokens=4, **kw)


def client_for(app) -> TestClient:
    c = TestClient(app, raise_server_exceptions=False)
    c.__enter__()
    deadline = time.time() + 60
    while c.get("/health").status_code != 200:
        assert time.time() < deadline, "models did not load"
        time.sleep(0.05)
    return c


@pytest.fixture(scope="module")
def app(arts):
    from edgeft.runtime.serve import build_app

    return build_app(config(arts))


@pytest.fixture(scope="module")
def client(app):
    c = client_for(app)
    yield c
    c.__exit__(None, None, None)


def raw_json(obj) -> bytes:
    """JSON with ASCII escapes, so lone surrogates travel as ``\\ud800`` (as any JSON client may send them)."""
    return json.dumps(obj).encode()


def assert_openai_error(r, status: int | None = None, param: str | None = "any") -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------- the reproduced cases

@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {"prompt": "abc \ud800 def"}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\udfff"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]}, "messages"),
    ("/v1/classify", {"input": "\ud800"}, "input"),
    ("/v1/classify", {"input": ["fine", "x\udc80"]}, "input"),
    ("/v1/classify", {"input": "fine", "\ud800": 1}, None),
])
def test_lone_surrogates_are_400(client, route, body, param):
    r = client.post(route, content=raw_json(body), headers={"content-type": "application/json"})
    assert assert_openai_error(r, 400, param)["code"] == "invalid_unicode"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "Shall I"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7"])
def test_bad_seeds_are_400_before_any_stream(client, route, body, stream, seed):
    r = client.post(route, json={**body, "seed": seed, "stream": stream, "max_tokens": 2})
    assert not r.headers["content-type"].startswith("text/event-stream")
    assert_openai_error(r, 400, "seed")


def test_good_seeds_still_work(client):
    for seed in (0, 2**63 - 1):
        r = client.post("/v1/completions", json={"prompt": "Shall I", "seed": seed, "temperature": 1.0,
                                                 "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text


def test_runtime_refuses_a_negative_seed_in_one_line():
    from edgeft.errors import EdgeftError
    from edgeft.runtime import SamplingParams

    with pytest.raises(EdgeftError, match="seed"):
        SamplingParams(seed=-1)


def no_models(config, metrics):
    """A loader serving nothing: the auth checks need no model (and /v1/models answers an empty list)."""
    return {}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(arts, scheme):
    from edgeft.runtime.serve import build_app

    with TestClient(build_app(config(arts, api_key=KEY), no_models)) as c:
        assert c.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
        for bad in (f"{scheme} wrong", f"Basic {KEY}", KEY, f"{scheme}", f"{scheme} {KEY}x", ""):
            r = c.get("/v1/models", headers={"Authorization": bad})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", bad


def test_metrics_are_behind_the_api_key_or_the_metrics_key(arts):
    from edgeft.runtime.serve import build_app

    def auth(key):
        return {"Authorization": f"Bearer {key}"} if key else {}

    with TestClient(build_app(config(arts, api_key=KEY), no_models)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth("nope")).status_code == 401
        assert "edgeft_requests_total" in c.get("/metrics", headers=auth(KEY)).text
        assert c.get("/health").status_code == 200  # probes need no key
    with TestClient(build_app(config(arts, api_key=KEY, metrics_key=METRICS_KEY), no_models)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth(METRICS_KEY)).status_code == 200
        assert c.get("/metrics", headers=auth(KEY)).status_code == 200
        assert c.get("/v1/models", headers=auth(METRICS_KEY)).status_code == 401  # it opens /metrics only
    with TestClient(build_app(config(arts, metrics_key=METRICS_KEY), no_models)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth(METRICS_KEY)).status_code == 200
    with TestClient(build_app(config(arts), no_models)) as c:
        assert c.get("/metrics").status_code == 200  # no key at all: open, as before


def test_metrics_key_is_in_serve_help():
    r = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "200", "PATH": ""})
    assert "--metrics-key" in r.stdout and "EDGEFT_METRICS_KEY" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_aborted_upload_is_a_quiet_client_disconnect(arts, caplog):
    import uvicorn

    from edgeft.runtime.serve import build_app

    port = _free_port()
    app = build_app(config(arts, port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", lifespan="on",
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        caplog.set_level(logging.INFO)
        for route in ("/v1/completions", "/v1/classify"):
            with socket.create_connection(("127.0.0.1", port)) as s:  # promise 10 kB, send 20 bytes, hang up
                s.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: 10000\r\n\r\n{\"prompt\": \"abcdefg".encode())
                time.sleep(0.2)
        deadline = time.time() + 10
        while time.time() < deadline:
            text = httpx.get(url + "/metrics").text
            if 'edgeft_client_disconnects_total{route="/v1/classify"} 1' in text:
                break
            time.sleep(0.05)
        assert 'edgeft_client_disconnects_total{route="/v1/completions"} 1' in text
        assert 'edgeft_client_disconnects_total{route="/v1/classify"} 1' in text
        assert 'status="500"' not in text and 'status="499"' in text
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not loud, [r.getMessage() for r in loud]
        assert not any(r.exc_info for r in caplog.records)
        assert httpx.post(url + "/v1/classify", json={"input": "fine"}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_serve_on_a_busy_port_is_one_line_and_exit_2(arts):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = subprocess.run([*CLI, "serve", str(arts["sentiment"]), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], r.stderr
    assert "listening on" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the fuzz test

class Recording(dict):
    """A dict that records every key looked up in it (and wraps nested objects the same way)."""

    def __init__(self, data: dict, seen: set[str], prefix: str = "") -> None:
        super().__init__({k: _wrap(v, seen, f"{prefix}{k}.") for k, v in data.items()})
        self.seen, self.prefix = seen, prefix

    def get(self, key, default=None):
        self.seen.add(self.prefix + str(key))
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(self.prefix + str(key))
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(self.prefix + str(key))
        return super().__contains__(key)


def _wrap(v, seen, prefix):
    if isinstance(v, dict):
        return Recording(v, seen, prefix)
    if isinstance(v, list):
        return [_wrap(x, seen, prefix) for x in v]
    return v


# One body that every POST route accepts (each reads what it needs): the fields' seed values.
BASE = {"model": None, "prompt": "Shall I compare", "messages": [{"role": "user", "content": "Hello"}],
        "input": "a fine film", "max_tokens": 2, "stream_options": {"include_usage": True},
        "query": "a fine film", "documents": ["a fine film", {"text": "a dull one"}]}


def post_routes(app) -> list[str]:
    """The POST routes a body can be sent to here (loading models needs --api-key: tests/test_trunk_serve.py)."""
    return sorted(r.path for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ())
                  and r.path not in ("/v1/models/load", "/v1/models/unload"))


def get_routes(app) -> list[str]:
    return sorted(r.path.replace("{model:path}", "chat") for r in app.routes
                  if isinstance(r, Route) and "GET" in (r.methods or ()))


def fields_read(app, client, monkeypatch, route: str) -> list[str]:
    """Every body key (dotted for nested objects) the route's parser looks up on a valid body."""
    from edgeft.runtime.serve import middleware as server

    seen: set[str] = set()
    real = server.read_json

    async def recording(request, limit):
        return Recording(await real(request, limit), seen)

    monkeypatch.setattr(server, "read_json", recording)
    try:
        r = client.post(route, json={k: v for k, v in BASE.items() if v is not None})
    finally:
        monkeypatch.setattr(server, "read_json", real)
    # /v1/rerank reads the whole body, then refuses the served text classifier (no pair classifier here)
    refused = route == "/v1/rerank" and r.status_code == 400 and r.json()["error"]["code"] == "not_a_reranker"
    assert r.status_code == 200 or refused, (route, r.text)
    return sorted(seen)


def odd_values(rng: random.Random) -> list:
    deep = "x"
    for _ in range(rng.choice([50, 500, 5000])):
        deep = [deep] if rng.random() < 0.5 else {"a": deep}
    return [
        None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, -(10**30), 1e308, -1e308, 1e-320,
        0.5, -0.0, 3.7, "", "0", "1", "true", "null", "\u0000", "\ud800", "x\udfffy", "\U0001f600" * 50,
        "e\u0301\u200f\u202e", "\uffff\ufffe", "a" * 10_000, [], [None], [1, "a", {}], [[[]]], {}, {"a": 1},
        {"type": "text"}, ["\ud800"], list(range(300)), deep,
    ]


def mutate(rng: random.Random, fields: list[str], values: list) -> dict:
    body = json.loads(json.dumps({k: v for k, v in BASE.items() if v is not None}))
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = rng.choice(fields).split(".")
        target = body
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = rng.choice(values)
    if rng.random() < 0.1:  # nested messages with odd parts
        body["messages"] = [rng.choice(values), {"role": rng.choice(values), "content": rng.choice(values)}]
    return body


def whole_bodies(rng: random.Random) -> list[bytes]:
    return [b"", b"{", b"null", b"[]", b'"x"', b"1e999999", b"{\"a\": NaN}", b"\xff\xfe{}", b"[" * 100_000,
            b'{"prompt": "x", "prompt": 1}', b'{"input": "\\ud800"}', b"{" + b'"a":{' * 3000 + b"}" * 3000 + b"}",
            bytes(rng.randrange(256) for _ in range(200))]


def assert_route_error(route: str, r) -> None:
    """An OpenAI-style error body, or Anthropic's shape on its /v1/messages routes."""
    if not route.startswith("/v1/messages"):
        assert_openai_error(r)
        return
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]


def assert_answer(r) -> None:
    """A 200: a JSON object, or an event stream that ends as its protocol ends it."""
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        last = r.text.rstrip().rsplit("\n", 1)[-1]
        assert last == "data: [DONE]" or '"type": "message_stop"' in last or '"type": "response.' in last, last
    else:
        assert isinstance(r.json(), dict) and r.json()


def test_fuzz_every_route_with_malformed_bodies(app, client, monkeypatch):
    rng = random.Random(20261201)
    values = odd_values(rng)
    posts = post_routes(app)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/classify"} <= set(posts)
    fields = {route: fields_read(app, client, monkeypatch, route) for route in posts}
    assert {"prompt", "max_tokens", "temperature", "seed", "stop", "stream"} <= set(fields["/v1/completions"])
    assert {"messages", "stream_options.include_usage"} <= set(fields["/v1/chat/completions"])
    assert "input" in fields["/v1/classify"]
    answered: dict[int, int] = {}
    sent = 0
    for route in posts:
        cases = [("json", mutate(rng, fields[route], values)) for _ in range(120)]
        cases += [("raw", b) for b in whole_bodies(rng)]
        for kind, body in cases:
            content = raw_json(body) if kind == "json" else body
            r = client.post(route, content=content, headers={"content-type": "application/json"})
            sent += 1
            answered[r.status_code] = answered.get(r.status_code, 0) + 1
            assert r.status_code < 500, (route, body if kind == "raw" else json.dumps(body)[:300], r.text[:300])
            if r.status_code >= 400:
                assert_route_error(route, r)
            else:
                assert_answer(r)
    for path in get_routes(app):
        for suffix in ("", "?x=%ED%A0%80&y=%FF", "/%ED%A0%80", "?" + "a=1&" * 500, "/../x"):
            r = client.get(path + suffix)
            assert r.status_code < 500, (path, suffix, r.text[:200])
            if r.status_code >= 400:
                assert_openai_error(r)
    r = client.post("/v1/models", json={})  # a route without POST
    assert_openai_error(r, 405)
    print("fuzz:", sent, "requests, status counts", sorted(answered.items()))
    assert sent >= 300
    assert sum(n for code, n in answered.items() if 400 <= code < 500) >= 0.7 * sent, answered
    assert client.get("/health").json()["status"] == "ok"
    ok = client.post("/v1/completions", json={"prompt": "Shall I", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert client.post("/v1/classify", json={"input": "fine"}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


def test_typical_p_is_read_and_range_checked(client):
    texts = set()
    for seed in (1, 2, 3):
        r = client.post("/v1/completions", json={"model": "chat", "prompt": "Shall I", "seed": seed, "temperature": 1.0,
                                                 "typical_p": 1e-6, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1  # one candidate per step: the seed no longer matters
    for bad in (0, 1.5, "x", True):
        r = client.post("/v1/completions", json={"model": "chat", "prompt": "x", "typical_p": bad})
        assert_openai_error(r, 400, "typical_p")


@pytest.mark.parametrize("route,base", [
    ("/v1/completions", {"prompt": "Shall I"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "1" * 5000, "", " 1", "1.0", "-1", "99999999999", "100000"])
def test_logit_bias_token_ids_are_strict_and_in_the_vocabulary(client, route, base, key):
    # "²" and "٣" pass str.isdigit and fail int(); 5,000 digits pass isdigit and exceed Python's int limit;
    # 100000 is a well-formed id above the tiny model's vocabulary
    r = client.post(route, json={**base, "max_tokens": 2, "logit_bias": {key: 1}})
    assert_openai_error(r, 400, "logit_bias")


def test_prompt_token_ids_are_strict_and_in_the_vocabulary(client):
    for prompt in ([1, 2**64], [1, "2"], [1, True], [1, 10**5000 // 10**4990]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert_openai_error(r, 400, "prompt")
    r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "logit_bias": {"3": 5}})
    assert r.status_code == 200, r.text


def test_the_access_log_escapes_control_characters(client, caplog):
    from edgeft.runtime.serve.process import TEXT_FORMAT

    forged = "/x%0A2026-12-06 19:45:00,000 INFO edgeft.access: POST /v1/completions 200 1.0ms FORGED"
    caplog.set_level(logging.INFO, logger="edgeft.access")
    for path in (forged, "/y%0D%1B%5B31m%E2%80%A8%E2%80%AEz%5C"):
        assert client.get(path).status_code == 404
    fmt = logging.Formatter(TEXT_FORMAT)
    lines = [fmt.format(r) for r in caplog.records if r.name == "edgeft.access"]
    assert len(lines) == 2 and all(line.isprintable() for line in lines), lines
    assert lines[0].endswith("GET /x\\x0a2026-12-06 19:45:00,000 INFO edgeft.access: POST /v1/completions 200 "
                             "1.0ms FORGED 404 " + lines[0].rsplit(" ", 1)[1])
    assert "GET /y\\x0d\\x1b[31m\\u2028\\u202ez\\\\ 404 " in lines[1]
    assert caplog.records[-1].fields["path"].endswith("z\\")  # the JSON log keeps the path as it was (json escapes)
