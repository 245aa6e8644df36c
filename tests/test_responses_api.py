"""``/v1/responses`` (OpenAI's Responses API, stateless) through the ``openai`` client's
``responses.create`` against the real server (uvicorn on a loopback port) on tiny models: text
that equals the chat route's, whole and streamed; function calls and their outputs over two
turns; a JSON-schema text format; a reasoning model's thinking as a reasoning item; what a
stateless server refuses."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from test_messages_api import llama_1k  # noqa: F401 (a fixture)
from test_reasoning import qwen3_art  # noqa: F401 (a fixture)
from test_server import InProcessServer, free_port, wait_healthy

CITY = {"type": "function", "name": "city", "description": "", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["c"],
    "properties": {"c": {"type": "string", "maxLength": 6}}}}


@pytest.fixture(scope="module")
def server(llama_1k, qwen3_art):  # noqa: F811
    from edgeft.runtime.serve import ServeConfig

    cfg = ServeConfig(artifacts=(llama_1k, qwen3_art), names=("chat", "qwen"), port=free_port(), threads=1)
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)
        yield s.url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)


def test_text_whole_and_streamed_equals_the_chat_route(client, server):
    r = client.responses.create(model="chat", instructions="Be brief.", input="Shall I compare thee",
                                max_output_tokens=12, temperature=0)
    chat = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": "chat", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shall I compare thee"}]})
    choice = chat.json()["choices"][0]
    assert r.object == "response" and r.output_text == choice["message"]["content"]
    assert [i.type for i in r.output] == ["message"] and r.store is False
    assert r.status == {"length": "incomplete", "stop": "completed"}[choice["finish_reason"]]
    assert r.usage.input_tokens == chat.json()["usage"]["prompt_tokens"]
    count = client.responses.input_tokens.count(model="chat", instructions="Be brief.", input="Shall I compare thee")
    assert count.input_tokens == r.usage.input_tokens
    events = list(client.responses.create(model="chat", instructions="Be brief.", max_output_tokens=12,
                                          temperature=0, stream=True, input=[
                                              {"role": "user", "content": [{"type": "input_text",
                                                                            "text": "Shall I compare thee"}]}]))
    names = [e.type for e in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == f"response.{r.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (done,) = [e.text for e in events if e.type == "response.output_text.done"]
    assert deltas == done == r.output_text and events[-1].response.output_text == r.output_text


def test_function_calls_over_two_turns(client):
    first = client.responses.create(model="chat", input="Weather?", tools=[CITY], tool_choice="required",
                                    parallel_tool_calls=False, temperature=1.0, max_output_tokens=120,
                                    extra_body={"seed": 2})
    (call,) = [i for i in first.output if i.type == "function_call"]
    assert call.name == "city" and first.status == "completed"
    jsonschema.validate(json.loads(call.arguments), CITY["parameters"])
    events = list(client.responses.create(model="chat", input="Weather?", tools=[CITY], parallel_tool_calls=False,
                                          tool_choice={"type": "function", "name": "city"}, temperature=1.0,
                                          max_output_tokens=120, extra_body={"seed": 2}, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments  # same seed, same call
    assert [e.type for e in events].count("response.output_item.done") == 1
    second = client.responses.create(model="chat", tools=[CITY], tool_choice="none", max_output_tokens=8, input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    assert [i.type for i in second.output] in (["message"], [])
    alone = client.responses.create(model="chat", tools=[CITY], tool_choice="none", max_output_tokens=1,
                                    input="Weather?")
    assert second.usage.input_tokens > alone.usage.input_tokens + 8  # the call and its output are in the prompt


def test_a_json_schema_text_format(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    r = client.responses.create(model="chat", input="A number?", max_output_tokens=30, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "num", "schema": schema,
                                                 "strict": True}}, extra_body={"seed": 1})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_a_reasoning_model_gives_a_reasoning_item(client):
    kw = dict(model="qwen", input="Hi?", max_output_tokens=30, temperature=0, text={"format": {"type": "json_object"}},
              extra_body={"max_reasoning_tokens": 4})
    r = client.responses.create(**kw)
    assert [i.type for i in r.output] == ["reasoning", "message"] and r.output[0].content[0].text
    assert r.output_text.startswith("{") and r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(stream=True, **kw))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == r.output[0].content[0].text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    off = client.responses.create(model="qwen", input="Hi?", max_output_tokens=4, reasoning={"effort": "none"})
    assert "reasoning" not in [i.type for i in off.output]


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools"),
    ({"input": "x", "tools": [CITY], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "wat"}}}, "text"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "reasoning": {"effort": "wat"}}, "reasoning"),
])
def test_bad_requests_are_400_with_an_openai_error_body(server, body, param):
    r = httpx.post(server + "/v1/responses", json={"model": "chat", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
