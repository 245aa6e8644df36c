"""``/v1/messages`` (Anthropic's Messages API) through the official ``anthropic`` client against the
real server (uvicorn on a loopback port) on tiny models: whole and streamed answers that equal the
chat route's, a two-turn tool use, thinking blocks from a reasoning model, stop reasons, token
counting, ``x-api-key`` auth and errors in Anthropic's shape."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import pytest

from test_reasoning import qwen3_art  # noqa: F401 (a fixture)
from test_server import InProcessServer, free_port, wait_healthy

KEY = "sk-test"
CITY = {"name": "city", "description": "", "input_schema": {
    "type": "object", "additionalProperties": False, "required": ["c"],
    "properties": {"c": {"type": "string", "maxLength": 6}}}}


@pytest.fixture(scope="module")
def llama_1k(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with a 1,024-token context (the default tool prompt takes a few hundred tokens)."""
    from runtime_artifacts import build

    src = tmp_path_factory.mktemp("messages") / "llama-1k"
    shutil.copytree(tiny_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    return build("llama", str(src), str(src.parent / "art"))


@pytest.fixture(scope="module")
def server(llama_1k, qwen3_art):  # noqa: F811
    from edgeft.runtime.serve import ServeConfig

    cfg = ServeConfig(artifacts=(llama_1k, qwen3_art), names=("chat", "qwen"), port=free_port(), threads=1,
                      api_key=KEY)
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)
        yield s.url


@pytest.fixture(scope="module")
def client(server):
    from anthropic import Anthropic

    return Anthropic(base_url=server, api_key=KEY, max_retries=0)


def _chat(server, **body) -> dict:
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "chat", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_message_whole_and_streamed_equals_the_chat_route(client, server):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Shall I compare thee"}]}]
    m = client.messages.create(model="chat", max_tokens=12, system="Be brief.", messages=msgs,
                               extra_body={"temperature": 0})
    chat = _chat(server, max_tokens=12, messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Shall I compare thee"}])
    expected = chat["choices"][0]["message"]["content"]
    assert m.type == "message" and m.role == "assistant" and m.model == "chat"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == expected
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat["choices"][0]["finish_reason"]]
    assert m.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert m.usage.output_tokens == chat["usage"]["completion_tokens"]
    with client.messages.stream(model="chat", max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
                                messages=msgs, extra_body={"temperature": 0}) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == expected and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events[1] == "content_block_start" and "content_block_stop" in events and "message_delta" in events
    count = client.messages.count_tokens(model="chat", system="Be brief.", messages=msgs)
    assert count.input_tokens == m.usage.input_tokens


def test_stop_sequences_and_sampling_fields(client, server):
    msgs = [{"role": "user", "content": "Shall I compare thee"}]
    sampled = {"temperature": 1.0, "seed": 5}
    free = client.messages.create(model="chat", max_tokens=24, messages=msgs, extra_body=sampled)
    text = free.content[0].text
    stop = text[len(text) // 2:][:2]  # a piece from the middle of the free answer
    assert stop.strip(), repr(text)
    cut = client.messages.create(model="chat", max_tokens=24, messages=msgs, stop_sequences=["zzzz", stop],
                                 extra_body=sampled)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]
    # this client version no longer sends temperature, top_p or top_k itself: they go in the body
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 3}
    a = client.messages.create(model="chat", max_tokens=8, messages=msgs, extra_body=sampled)
    b = client.messages.create(model="chat", max_tokens=8, messages=msgs, extra_body=sampled)
    assert a.content == b.content


def test_a_two_turn_tool_use(client):
    msgs = [{"role": "user", "content": "Weather?"}]
    first = client.messages.create(model="chat", max_tokens=120, messages=msgs, tools=[CITY],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   extra_body={"temperature": 1.0, "seed": 2})
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "city" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, CITY["input_schema"])
    with client.messages.stream(model="chat", max_tokens=120, messages=msgs, tools=[CITY],
                                tool_choice={"type": "tool", "name": "city", "disable_parallel_tool_use": True},
                                extra_body={"temperature": 1.0, "seed": 2}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]  # same seed, same call
    # turn two, as the client sends it: the assistant's tool_use, then the user's tool_result
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"},
                                          {"type": "text", "text": "And so?"}]}]
    second = client.messages.create(model="chat", max_tokens=8, messages=msgs, tools=[CITY],
                                    tool_choice={"type": "none"})
    assert second.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in second.content)
    assert client.messages.count_tokens(model="chat", messages=msgs, tools=[CITY]).input_tokens \
        > client.messages.count_tokens(model="chat", messages=msgs[:1]).input_tokens


def test_thinking_blocks_from_a_reasoning_model(client):
    msgs = [{"role": "user", "content": "Hi?"}]
    m = client.messages.create(model="qwen", max_tokens=30, messages=msgs, extra_body={"temperature": 0},
                               thinking={"type": "enabled", "budget_tokens": 4}, tools=[CITY],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert m.content[0].type == "thinking" and m.content[0].thinking
    with client.messages.stream(model="qwen", max_tokens=30, messages=msgs, tools=[CITY], extra_body={"temperature": 0},
                                thinking={"type": "enabled", "budget_tokens": 4},
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        deltas = {e.delta.type for e in stream if e.type == "content_block_delta"}
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and final.content[0].thinking == m.content[0].thinking
    off = client.messages.create(model="qwen", max_tokens=6, messages=msgs, extra_body={"temperature": 0},
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]
    # a thinking block sent back in an assistant turn reaches the template as its reasoning
    turns = msgs + [{"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm.", "signature": ""},
                                                      {"type": "text", "text": "Hello."}]}]
    with_thought = client.messages.count_tokens(model="qwen", messages=turns).input_tokens
    turns[1]["content"] = turns[1]["content"][1:]
    assert with_thought > client.messages.count_tokens(model="qwen", messages=turns).input_tokens


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]}]}, "image"),
    ({"max_tokens": 4, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"}, "stop_sequences"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "custom tools"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "wat"}}, "thinking"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": "a b", "input_schema": {}}]}, "tools.0.name"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tools": [CITY],
      "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
])
def test_bad_requests_are_400_in_anthropics_error_shape(server, body, needle):
    r = httpx.post(server + "/v1/messages", json={"model": "chat", **body}, headers={"x-api-key": KEY})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]


def test_the_anthropic_client_sees_its_own_errors_and_x_api_key_is_checked(server):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as e:
        anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0).messages.create(
            model="chat", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert "image" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0).messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0).messages.create(
            model="chat", max_tokens=4, messages=[{"role": "user", "content": "x"}])
