"""Tool calls: functions rendered into the prompt (the template's own way, else the default
format), calls parsed from the answer, and a required call constrained to schema-valid arguments."""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np
import pytest

from test_constrain import NESTED

from edgeft.runtime.tools import (Tool, ToolChoice, call_constraint, default_messages, parse_calls, render_tools,
                                  template_knows_tools)

WEATHER = Tool("get_weather", "The weather in a city", {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}}})
TIME = Tool("get_time", "The time in a zone", {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "maxLength": 6}}})
TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]


@pytest.fixture(scope="module")
def gen(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with a 1,024-token context (rotary positions: the weights do not change), as
    the default tool prompt takes a few hundred of its small vocabulary's tokens."""
    import shutil

    from runtime_artifacts import build

    from edgeft.runtime import Generator

    src = tmp_path_factory.mktemp("tools") / "llama-1k"
    shutil.copytree(tiny_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    return Generator.open(build("llama", str(src), str(src.parent / "art")), threads=1)


def test_templates_that_know_tools_get_them():
    from conftest import CHATML

    assert not template_knows_tools(CHATML)
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}")
    assert not template_knows_tools(None)


def test_default_format_renders_tools_calls_and_results(gen):
    text = render_tools(gen, TURNS, [WEATHER, TIME], ToolChoice("auto"))
    assert text.startswith("<|im_start|>system\nYou can call functions.")
    assert json.dumps(WEATHER.spec()) in text and json.dumps(TIME.spec()) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>21 C, sunny</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "get_time" not in render_tools(gen, TURNS, [WEATHER, TIME], ToolChoice("function", "get_weather"))
    assert "You can call" not in render_tools(gen, TURNS, [WEATHER, TIME], ToolChoice("none"))
    own = default_messages([{"role": "system", "content": "Be brief."}, *TURNS], [TIME])
    assert own[0]["content"].startswith("Be brief.\n\nYou can call functions.") and len(own) == 4


def test_parse_calls_into_openai_shape():
    text = ('Sure.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>not json</tool_call>')
    content, calls = parse_calls(text, [WEATHER, TIME])
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert content.startswith("Sure.")
    assert parse_calls("just words", [TIME]) == ("just words", [])
    assert parse_calls('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', [TIME])[0] is None


@pytest.mark.parametrize("parallel", [False, True])
def test_a_required_call_is_constrained_to_valid_arguments(gen, parallel):
    from edgeft.runtime import compile_for
    from edgeft.runtime.sampling import sample

    grammar = compile_for(gen, call_constraint([WEATHER, TIME], ToolChoice("required"), parallel))
    rng, done = np.random.default_rng(1), 0
    for _ in range(8):
        mask, out = grammar.mask(), []
        for _ in range(300):
            token = sample(mask(rng.normal(size=gen.decoder.vocab_size).astype(np.float32) * 3), 1.0, 0, 1.0, rng)
            if token in gen.eos_ids:
                break
            mask.accept(token)
            out.append(token)
        else:
            continue
        done += 1
        content, calls = parse_calls(gen.decode(out), [WEATHER, TIME])
        assert content is None and calls and (parallel or len(calls) == 1)
        for c in calls:
            tool = {t.name: t for t in (WEATHER, TIME)}[c["function"]["name"]]
            jsonschema.validate(json.loads(c["function"]["arguments"]), tool.parameters)
    assert done >= (3 if parallel else 6)  # parallel: random logits may keep adding calls
    named = compile_for(gen, call_constraint([WEATHER, TIME], ToolChoice("function", "get_time"), False))
    mask = named.mask()
    for t in gen.tokenizer.encode('<tool_call>{"name": "get_', add_special_tokens=False).ids:
        mask.accept(t)
    allowed = [gen.decode([t]) for t in np.flatnonzero(mask.allowed())]
    assert allowed and all("time".startswith(a) or a.startswith("time") for a in allowed), allowed


# ---------------------------------------------------------------- the server: response_format and a tool loop

@pytest.fixture(scope="module")
def api(gen):
    """The app in-process (Starlette's test client is an httpx client: the openai client runs over it)."""
    from starlette.testclient import TestClient

    from edgeft.runtime.serve import ServeConfig, build_app

    client = TestClient(build_app(ServeConfig(artifacts=(gen.folder,), names=("chat",), threads=1)),
                        raise_server_exceptions=False)
    with client:
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline, "models did not load"
            time.sleep(0.05)
        yield client


def test_response_format_json_schema_and_json_object(api):
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": NESTED, "strict": True}}
    stops = 0
    for seed in range(6):
        r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "A pet?"}],
                                           response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            stops += 1
            jsonschema.validate(json.loads(choice.message.content), NESTED)
        else:
            assert choice.finish_reason == "length"
    assert stops >= 4
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_object"}, temperature=1.0, seed=0)
    assert r.choices[0].message.content.startswith("{") and r.choices[0].finish_reason == "length"
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
    resp = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "response_format": bad})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"
    assert "wat" in resp.json()["error"]["message"]
    resp = api.post("/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"


# Small enough for the tiny llama's 256-token context once rendered in the default format.
CITY = Tool("city", "", {"type": "object", "additionalProperties": False, "required": ["c"],
                         "properties": {"c": {"type": "string", "maxLength": 6}}})
NOW = Tool("now", "", {"type": "object", "additionalProperties": False, "properties": {}})


def test_a_two_turn_tool_loop_with_the_openai_client(api):
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in (CITY, NOW)]
    messages = [{"role": "user", "content": "Weather?"}]
    first = client.chat.completions.create(model="chat", messages=messages, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    tool = {t.name: t for t in (CITY, NOW)}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool.parameters)
    # turn two, exactly as the client sends it: the assistant's calls (content null), then the tool's answer
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    assert messages[1]["tool_calls"][0]["id"] == call.id and messages[1].get("content") is None
    second = client.chat.completions.create(model="chat", messages=messages, tools=tools, tool_choice="none",
                                            max_tokens=8)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")
    named = client.chat.completions.create(model="chat", messages=messages[:1], tools=tools, temperature=1.0, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "now"}},
                                           max_tokens=120)
    assert [c.function.name for c in named.choices[0].message.tool_calls][:1] == ["now"]
    stream = client.chat.completions.create(model="chat", messages=messages[:1], tools=tools, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=120,
                                            stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name == call.function.name
    assert deltas[0][0].function.arguments == call.function.arguments  # same seed, same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for body, param in [({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
                        ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        r = api.post("/v1/chat/completions", json={"messages": messages[:1], **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
