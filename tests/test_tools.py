"""Tool calls: functions rendered into the prompt (the template's own way, else the default
format), calls parsed from the answer, and a required call constrained to schema-valid arguments."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

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
    from runtime_artifacts import build

    from edgeft.runtime import Generator

    return Generator.open(build("llama", str(tiny_llama_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts")),
                          threads=1)


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
