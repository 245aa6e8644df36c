"""``edgeft serve`` end to end: the real server on loopback over real tiny artifacts.

Two artifacts are exported once (a 4-block llama with a ChatML template, a 4-block BERT
classifier). The main server runs as a subprocess of the real CLI (settings from EDGEFT_*
variables, a bearer key) and is talked to with the official ``openai`` client and with raw
HTTP (httpx); a second server runs in-process with small limits (queue, body size, max
tokens) to provoke 413 and 429; a third is SIGTERMed with requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
PROMPTS = ["Shall I compare thee", "From fairest creatures", "When forty winters", "Look in thy glass",
           "Unthrifty loveliness", "Those hours that", "Then let not winter", "Lo in the orient"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama_dir, tiny_bert_dir) -> dict[str, Path]:
    from edgeft.export import ExportConfig, export

    out = tmp_path_factory.mktemp("serve-artifacts")
    chat = export(ExportConfig(source=str(tiny_llama_dir), out=out / "chat", task="causal-lm",
                               allow_degraded=True, gate_texts=8, gate_prompts=2, gate_new_tokens=8))
    sentiment = export(ExportConfig(source=str(tiny_bert_dir), out=out / "sentiment", task="classification",
                                    labels=("negative", "positive"), allow_degraded=True, gate_texts=8,
                                    eval_data=REPO / "demo" / "sst2_2k.csv"))
    return {"chat": Path(chat), "sentiment": Path(sentiment)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not healthy in time")


def start_cli_server(artifacts: list[Path], env_extra: dict[str, str],
                     args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EDGEFT_PORT": str(port), "EDGEFT_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-c", "from edgeft.cli import main; main()"]
    proc = subprocess.Popen([*cmd, "serve", *map(str, artifacts), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 30, signal_it: bool = True) -> tuple[int, str]:
    """SIGTERM (once: a second one during the last instants of shutdown would kill it) and wait."""
    if signal_it and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


@pytest.fixture(scope="module")
def server(artifacts):
    """The CLI server, configured from environment variables, with a bearer key."""
    proc, url = start_cli_server([artifacts["chat"], artifacts["sentiment"]],
                                 {"EDGEFT_API_KEY": KEY, "EDGEFT_BATCH_WAIT_MS": "30",
                                  "EDGEFT_PARALLEL": "4", "EDGEFT_QUEUE_SIZE": "16"})  # not this machine's defaults
    yield url
    rc, err = stop(proc)
    assert rc == 0, err[-2000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(artifacts):
    from edgeft.runtime import Generator

    return Generator.open(artifacts["chat"], threads=1)


@pytest.fixture(scope="module")
def classifier(artifacts):
    from edgeft.runtime import TextClassifier

    return TextClassifier.open(artifacts["sentiment"], threads=1)


def expected(engine, prompt: str, max_tokens: int):
    from edgeft.runtime import SamplingParams

    return engine.generate(prompt, SamplingParams(max_new_tokens=max_tokens))


def metric(text: str, line_prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_prefix))


# ---------------------------------------------------------------- the openai client

def test_models_health_and_auth(server, http):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server + "/v1/completions", json={"model": "chat", "prompt": "x"})
    assert r.status_code == 401
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["chat"]["task"] == "causal-lm" and models["sentiment"]["labels"] == ["negative", "positive"]
    assert http.get("/v1/models/sentiment").json()["id"] == "sentiment"


def test_completion_equals_in_process_generation(client, engine):
    want = expected(engine, PROMPTS[0], 12)
    got = client.completions.create(model="chat", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.prompt_tokens == len(engine.encode(PROMPTS[0]))
    assert got.usage.completion_tokens == want.completion_tokens
    assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_chat_and_streaming_agree(client, engine):
    messages = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Shall I compare thee?"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=10)
    want = expected(engine, engine.render_chat(messages), 10)
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == want.completion_tokens

    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == want.text and finishes == [want.finish_reason]
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_completion_stream_is_server_sent_events(http, engine):
    want = expected(engine, PROMPTS[1], 16)
    with http.stream("POST", "/v1/completions", json={"model": "chat", "prompt": PROMPTS[1], "max_tokens": 16,
                                                       "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies) == want.text
    assert bodies[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert len({b["id"] for b in bodies}) == 1


def test_n_choices_and_prompt_lists_are_decoded_as_a_batch(client, engine):
    from edgeft.runtime import SamplingParams

    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    got = client.completions.create(model="chat", prompt=PROMPTS[:2], max_tokens=10, temperature=1.0, seed=11, n=3)
    assert [c.index for c in got.choices] == list(range(6))
    wants = [engine.generate(PROMPTS[i // 3], dataclasses.replace(p, seed=11 + i % 3)) for i in range(6)]
    for c, want in zip(got.choices, wants):  # prompt i // n, choice j = i % n seeded with seed + j
        assert c.text == want.text and c.finish_reason == want.finish_reason
    assert len({c.text for c in got.choices[:3]}) > 1
    assert got.usage.prompt_tokens == sum(len(engine.encode(t)) for t in PROMPTS[:2])
    assert got.usage.completion_tokens == sum(w.completion_tokens for w in wants)
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=6, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    alone = [engine.generate(engine.render_chat([{"role": "user", "content": "Hi"}]),
                             SamplingParams(max_new_tokens=6, temperature=1.0, seed=3 + i)) for i in range(2)]
    assert [c.message.content for c in chat.choices] == [a.text for a in alone]
    assert chat.usage.completion_tokens == sum(a.completion_tokens for a in alone)


def test_logprobs_echo_penalties_and_bias(http, engine):
    import numpy as np

    from edgeft.runtime.processors import log_softmax

    from edgeft.runtime import SamplingParams

    ids = engine.encode(PROMPTS[2])
    body = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPTS[2], "max_tokens": 5,
                                              "logprobs": 2, "ignore_eos": True}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    out = engine.generate(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))
    rows = engine.score(ids + out.token_ids)[len(ids) - 1:]
    for row, tok, got in zip(rows, out.token_ids, lp["token_logprobs"]):
        assert abs(got - float(log_softmax(row)[tok])) < 1e-4
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    chat = http.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
        "top_logprobs": 3}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6
                           for c in content)
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
            "stream": True}) as resp:
        events = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: {")]
    streamed = [c for e in events for ch in e["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert np.allclose([c["logprob"] for c in streamed], [c["logprob"] for c in content], atol=1e-5)
    echo = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPTS[2], "max_tokens": 3,
                                              "echo": True}).json()["choices"][0]["text"]
    assert echo.startswith(engine.decode(ids)) and len(echo) > len(engine.decode(ids))
    banned = out.token_ids[0]
    biased = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPTS[2], "max_tokens": 5,
                                                "logit_bias": {str(banned): -100}, "logprobs": 0,
                                                "ignore_eos": True}).json()
    want = engine.generate(ids, SamplingParams(max_new_tokens=5, ignore_eos=True, logit_bias={banned: -100}))
    assert biased["choices"][0]["text"] == want.text and banned != want.token_ids[0]
    pen = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPTS[2], "max_tokens": 24,
                                             "frequency_penalty": 2.0, "presence_penalty": 2.0, "min_p": 0.05,
                                             "ignore_eos": True})
    assert pen.status_code == 200 and pen.json()["usage"]["completion_tokens"] == 24


def test_classify_single_and_batch(http, classifier):
    texts = ["a gorgeous, witty film", "dull and far too long", "fine"]
    want = classifier.classify(texts)
    one = http.post("/v1/classify", json={"model": "sentiment", "input": texts[0]}).json()
    assert len(one["data"]) == 1 and one["data"][0]["label"] == want[0]["label"]
    many = http.post("/v1/classify", json={"input": texts}).json()  # the only classifier: model may be left out
    for got, exp in zip(many["data"], want):
        assert got["label"] == exp["label"]
        assert set(got["scores"]) == {"negative", "positive"}
        assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        for label, p in exp["scores"].items():
            assert got["scores"][label] == pytest.approx(float(p), abs=1e-5)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "temperature": NaN}', None),
    ("/v1/completions", {"model": "chat", "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"model": "chat", "prompt": ["a", "b"], "n": 16}, "n"),  # more than slots + line
    ("/v1/completions", {"model": "chat", "prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "speculate": "maybe"}, "speculate"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
     "tool_choice"),
    ("/v1/completions", {"model": "chat", "prompt": [999999]}, "prompt"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, "model"),
    ("/v1/completions", {"model": "chat", "prompt": ""}, "prompt"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": "hi"}, "messages"),
    ("/v1/classify", {"model": "sentiment", "input": [1, 2]}, "input"),
    ("/v1/classify", {"model": "sentiment", "input": []}, "input"),
    ("/v1/classify", {"model": "chat", "input": "x"}, "model"),
    ("/v1/completions", {"model": "sentiment", "prompt": "x"}, "model"),
])
def test_bad_requests_are_400_with_an_openai_error_body(http, route, body, param):
    r = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_context_and_model_errors(client, http, engine):
    import openai

    ctx = engine.context_length
    long_prompt = " ".join(["thee"] * (ctx + 20))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    n = len(engine.encode(PROMPTS[0]))
    r = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPTS[0], "max_tokens": ctx - n + 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    r = http.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------- concurrency

def test_concurrent_completions_do_not_mix(server, engine):
    want = {p: expected(engine, p, 20).text for p in PROMPTS}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            return await asyncio.gather(*[
                c.post("/v1/completions", json={"model": "chat", "prompt": p, "max_tokens": 20, "stream": i % 2 == 1})
                for i, p in enumerate(PROMPTS)])

    responses = asyncio.run(run())
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        assert r.status_code == 200
        if i % 2:
            events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events)
        else:
            text = r.json()["choices"][0]["text"]
        assert text == want[p], f"prompt {i} got another request's output"


def test_concurrent_classify_requests_are_batched(server, http, classifier):
    texts = [f"{w} film number {i}" for i, w in enumerate(["great", "awful", "tender", "boring"] * 4)]
    want = classifier.classify(texts)
    before = http.get("/metrics").text

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"model": "sentiment", "input": t})
                                          for t in texts])

    responses = asyncio.run(run())
    after = http.get("/metrics").text
    for r, exp in zip(responses, want):
        assert r.status_code == 200 and r.json()["data"][0]["label"] == exp["label"]
        assert r.json()["data"][0]["score"] == pytest.approx(float(exp["scores"][exp["label"]]), abs=1e-5)
    runs = metric(after, 'edgeft_classify_batch_size_count{model="sentiment"}') - \
        metric(before, 'edgeft_classify_batch_size_count{model="sentiment"}')
    batched = metric(after, 'edgeft_classify_batch_size_sum{model="sentiment"}') - \
        metric(before, 'edgeft_classify_batch_size_sum{model="sentiment"}')
    assert batched == len(texts)
    assert 1 <= runs < len(texts), f"{len(texts)} concurrent requests took {runs} classifier runs"


def test_mixed_load_never_errors_500(server, http):
    bodies = [
        ("/v1/completions", {"model": "chat", "prompt": "Shall I", "max_tokens": 12, "stream": True}),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
        ("/v1/classify", {"model": "sentiment", "input": ["good", "bad", "so-so"]}),
        ("/v1/completions", {"model": "chat", "prompt": ["not", 1]}),
        ("/v1/classify", {"model": "sentiment", "input": {"text": "x"}}),
    ]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            return await asyncio.gather(*[c.post(route, json=body) for route, body in bodies * 8])

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 400, 429}, codes
    assert codes[3::5] == [400] * 8 and codes[4::5] == [400] * 8
    assert http.get("/health").json()["status"] == "ok"
    idle = ('edgeft_queue_depth{model="chat"} 0', 'edgeft_inference_in_flight{model="chat"} 0')
    deadline = time.time() + 10  # a stream's worker lets go an instant after its last event
    while not all(s in http.get("/metrics").text for s in idle) and time.time() < deadline:
        time.sleep(0.05)
    assert all(s in http.get("/metrics").text for s in idle)


def test_metrics_count_routes_tokens_and_latency(http):
    http.post("/v1/completions", json={"model": "chat", "prompt": "Hello", "max_tokens": 3})
    http.post("/v1/completions", content=b"{")
    text = http.get("/metrics").text
    assert metric(text, 'edgeft_requests_total{route="/v1/completions",method="POST",status="200"}') >= 1
    assert metric(text, 'edgeft_requests_total{route="/v1/completions",method="POST",status="400"}') >= 1
    assert metric(text, 'edgeft_generated_tokens_total{model="chat"}') >= 3
    assert metric(text, 'edgeft_request_duration_seconds_count{route="/v1/completions"}') >= 2
    assert 'edgeft_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}' in text
    assert 'edgeft_queue_depth{model="chat"} 0' in text
    assert "# TYPE edgeft_time_to_first_token_seconds histogram" in text


def test_speculative_requests_answer_the_same_and_count_drafts(http, engine):
    from edgeft.runtime import SamplingParams

    prompt = "shall i compare thee to a summer's day? shall i compare thee to a summer's day? shall i"
    want = engine.generate(prompt, SamplingParams(max_new_tokens=30, speculate="off"))
    before = http.get("/metrics").text
    for mode in ("on", True, "auto"):
        r = http.post("/v1/completions", json={"model": "chat", "prompt": prompt, "max_tokens": 30, "speculate": mode})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
    after = http.get("/metrics").text
    name = 'edgeft_speculative_{}_tokens_total{{model="chat"}}'
    drafted = metric(after, name.format("drafted")) - metric(before, name.format("drafted"))
    accepted = metric(after, name.format("accepted")) - metric(before, name.format("accepted"))
    assert drafted > 0 and 0 < accepted <= drafted
    assert "# TYPE edgeft_speculative_accepted_tokens_total counter" in after


# ---------------------------------------------------------------- limits (in-process server, small limits)

class InProcessServer:
    """The real app under uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, config, loader=None) -> None:
        import uvicorn

        from edgeft.runtime.serve import build_app

        self.app = build_app(config) if loader is None else build_app(config, loader)
        self.url = f"http://127.0.0.1:{config.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_limits_413_429_and_max_tokens_cap(artifacts):
    from edgeft.runtime.serve import ServeConfig

    cfg = ServeConfig(artifacts=(artifacts["chat"],), port=free_port(), threads=1, parallel=4,
                      queue_size=0, max_body_bytes=4096, max_tokens=200)
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000
        r = httpx.post(s.url + "/v1/completions", content=chunked())
        assert r.status_code == 413

        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 201})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "prompt": p, "max_tokens": 200, "temperature": 1.0, "seed": i}) for i, p in enumerate(PROMPTS)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.json()["error"]["code"] == "queue_full" and rejected.headers["retry-after"]
        # once the burst is over the server answers again
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_batched_slots_serve_concurrent_requests_without_mixing(artifacts, engine):
    from edgeft.runtime.serve import ServeConfig

    want = {p: expected(engine, p, 24).text for p in PROMPTS[:6]}
    # drafts off: a sequence verifying drafts alone makes tokens outside the batched decode rows counted here
    cfg = ServeConfig(artifacts=(artifacts["chat"],), port=free_port(), threads=2, parallel=4, speculate="off")
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={"prompt": p, "max_tokens": 24})
                                              for p in want])

        got = [r.json()["choices"][0]["text"] for r in asyncio.run(run())]
        metrics = httpx.get(s.url + "/metrics").text
    assert got == list(want.values())
    assert 'edgeft_inference_in_flight{model="chat"} 0' in metrics
    assert 'edgeft_kv_slots{model="chat"} 4' in metrics
    assert metric(metrics, 'edgeft_queue_wait_seconds_count{model="chat"}') == len(want)  # one per sequence
    steps = metric(metrics, 'edgeft_decode_batch_size_count{model="chat"}')
    rows = metric(metrics, 'edgeft_decode_batch_size_sum{model="chat"}')
    assert 0 < steps <= rows == len(want) * 23  # every token after the first is one row of a decode step
    assert 'edgeft_generated_tokens_per_second{model="chat"}' in metrics


def test_a_client_that_leaves_stops_its_generation(artifacts):
    from edgeft.runtime.serve import ServeConfig

    cfg = ServeConfig(artifacts=(artifacts["chat"],), port=free_port(), threads=1)
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)
        cancelled = 0.0
        for _ in range(3):  # the worker must notice before it would have finished 240 tokens anyway
            with httpx.stream("POST", s.url + "/v1/completions", json={
                    "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 1.0, "seed": 1, "stream": True}) as r:
                next(ln for ln in r.iter_lines() if ln.startswith("data: {"))
            deadline = time.time() + 5
            while time.time() < deadline and 'edgeft_inference_in_flight{model="chat"} 0' not in \
                    (text := httpx.get(s.url + "/metrics").text):
                time.sleep(0.02)
            cancelled = metric(text, 'edgeft_stream_cancelled_total{model="chat"}')
            if cancelled:
                break
        assert cancelled >= 1
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_health_is_503_until_loaded(artifacts):
    from edgeft.runtime.serve import ServeConfig, load_models

    gate = threading.Event()

    def slow_loader(config, metrics):  # the real loader, held back until the test has looked
        gate.wait(30)
        return load_models(config, metrics)

    cfg = ServeConfig(artifacts=(artifacts["sentiment"],), port=free_port(), threads=1)
    with InProcessServer(cfg, slow_loader) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/classify", json={"input": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.set()
        wait_healthy(s.url, timeout=30)
        assert httpx.post(s.url + "/v1/classify", json={"input": "x"}).status_code == 200


# ---------------------------------------------------------------- SIGTERM, JSON logs, no torch

def held_request(url: str, path: str, body: dict) -> tuple[socket.socket, bytes]:
    """A request the server has begun but cannot finish: headers sent, body held back.

    ``Expect: 100-continue`` makes the server say when the app is reading the body, so the
    request is in flight for certain, however fast or slow the machine (no race with the decoder)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
              f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
    seen = b""
    while b"\r\n\r\n" not in seen:
        chunk = s.recv(1024)
        assert chunk, f"the server closed instead of asking for the body: {seen!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 100 "), seen
    return s, payload


def test_sigterm_drains_in_flight_requests_then_exits_0(artifacts):
    port = free_port()
    env = {**os.environ, "EDGEFT_PORT": str(port), "EDGEFT_THREADS": "1", "EDGEFT_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-c", "from edgeft.cli import main; main()", "serve",
                             str(artifacts["chat"]), "--name", "poet", "--parallel", "1", "--header-timeout", "600"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ln.decode() for ln in proc.stderr), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        held = [held_request(url, "/v1/completions", {"model": "poet", "prompt": PROMPTS[i], "max_tokens": 40,
                                                      "n": 2, "stream": i == 0}) for i in range(2)]
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while not any("received SIGTERM" in ln for ln in list(lines)):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.05)
        answers = []
        for s, payload in held:  # the server is draining: the requests it began must still be answered
            with s:
                s.sendall(payload)
                answers.append(b"".join(iter(functools.partial(s.recv, 65536), b"")))
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(30)
    err = "".join(lines)
    assert rc == 0, f"exit status {rc}: {err[-3000:]}"
    for a in answers:
        assert a.startswith(b"HTTP/1.1 200 "), a[:500]
    assert b"data: [DONE]" in answers[0] and b'"completion_tokens"' in answers[1]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    records = [json.loads(ln) for ln in err.splitlines() if ln.strip()]  # every line is one JSON object
    assert any(r["message"].startswith("received SIGTERM") for r in records)
    assert sum(1 for r in records if r["logger"] == "edgeft.access" and r["status"] == 200) >= 2


def test_a_request_cut_off_at_the_drain_timeout_is_a_shutdown_not_a_500(caplog):
    from starlette.responses import Response
    from starlette.routing import Route

    from edgeft.runtime.serve import ServeConfig, build_app
    from edgeft.runtime.serve.process import make_server

    entered = threading.Event()

    async def hang(request):
        entered.set()
        await asyncio.Event().wait()  # never set: still running when the drain timeout comes
        return Response()

    cfg = ServeConfig(artifacts=("unused",), port=free_port(), drain_timeout=0.5)
    app = build_app(cfg, lambda config, metrics: {})  # no model is needed to hold a request
    app.router.routes.append(Route("/v1/hang", hang, methods=["POST"]))
    server = make_server(cfg, app)
    url = f"http://127.0.0.1:{cfg.port}"
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    wait_healthy(url, timeout=30)
    answers: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answers.append(httpx.post(url + "/v1/hang", json={}, timeout=60)))
    client.start()
    assert entered.wait(30)
    server.handle_exit(signal.SIGTERM, None)  # what the signal does; uvicorn cancels the request after 0.5 s
    thread.join(60)
    client.join(60)
    assert not thread.is_alive() and len(answers) == 1
    r = answers[0]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    metrics = app.state.edgeft.metrics.render()
    assert 'method="POST",status="shutdown"} 1' in metrics and 'status="500"' not in metrics, metrics
    assert not any(rec.exc_info for rec in caplog.records), [rec.getMessage() for rec in caplog.records]
    access = [rec for rec in caplog.records if rec.name == "edgeft.access"]
    assert [rec.fields["status"] for rec in access] == ["shutdown"]
    assert "POST /v1/hang shutdown " in access[0].getMessage()


def test_bad_artifact_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from edgeft.cli import main; main()", "serve",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bogus").mkdir()
    r = subprocess.run([sys.executable, "-c", "from edgeft.cli import main; main()", "serve", str(tmp_path / "bogus"),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not an edgeft artifact" in r.stderr and "Traceback" not in r.stderr


def test_serving_never_imports_torch(artifacts):
    code = (
        "import sys\n"
        "from edgeft.cli import app\n"
        "from edgeft.runtime.serve import ServeConfig, load_models\n"
        "from edgeft.runtime.serve.metrics import Registry\n"
        f"models = load_models(ServeConfig(artifacts=({str(artifacts['chat'])!r}, {str(artifacts['sentiment'])!r})),"
        " Registry())\n"
        "assert len(models) == 2\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_config_validation():
    from edgeft.errors import EdgeftError
    from edgeft.runtime.serve import ServeConfig

    assert ServeConfig(artifacts=("a/chat", "b/x.edgeft")).model_names() == ["chat", "x"]
    assert ServeConfig(artifacts=("a/chat",)).host == "127.0.0.1"
    for kw in ({"artifacts": ()}, {"artifacts": ("a/m", "b/m")}, {"artifacts": ("a",), "names": ("x", "y")},
               {"artifacts": ("a",), "port": 70000}, {"artifacts": ("a",), "parallel": 0},
               {"artifacts": ("a",), "api_key": " "}, {"artifacts": ("a",), "queue_size": -1},
               {"artifacts": ("a",), "header_timeout": 0}, {"artifacts": ("a",), "header_timeout": float("nan")},
               {"artifacts": ("a",), "header_timeout": float("inf")},
               {"artifacts": ("a",), "max_connections_per_client": -1}):
        with pytest.raises(EdgeftError):
            ServeConfig(**kw)


def test_serve_slots_and_waiting_line_default_from_the_machine():
    from edgeft.runtime.serve import ServeConfig
    from edgeft.serve_config import _machine, machine_slots

    assert machine_slots(2, 8 << 30) == (8, 64)  # the serving benchmark's machine: 8 slots on 2 cores
    assert machine_slots(4, 2 << 30) == (2, 16)  # memory bounds the slots
    assert machine_slots(64, 512 << 30) == (32, 256)  # and 32 at most
    assert machine_slots(0, 0) == (1, 8)
    cfg = ServeConfig(artifacts=("a",))
    assert (cfg.parallel, cfg.queue_size) == machine_slots(*_machine())
    assert ServeConfig(artifacts=("a",), parallel=3, queue_size=0).parallel == 3  # given values win
