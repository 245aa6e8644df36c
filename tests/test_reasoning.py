"""Reasoning models: the thought split from the answer (as it streams and whole), the thinking
budget and a constrained answer after the thought, on a tiny random Qwen3 with a Qwen3-style
chat template (``<think>`` and ``</think>`` added tokens, the ``enable_thinking`` switch)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeft.runtime.reasoning import Phase, Splitter, ThoughtGate, prompt_phase, split, template_thinks

# Written for these tests in the shape of Qwen3's: ChatML turns; an assistant turn keeps its thought
# only when it is the last one; the generation prompt closes an empty thought when thinking is off.
QWEN3_STYLE = """{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- set content = message.content %}
{%- set thought = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if '</think>' in content %}
{%- set thought = content.split('</think>')[0].split('<think>')[-1].strip() %}
{%- set content = content.split('</think>')[-1].lstrip() %}
{%- endif %}
{%- if loop.last and thought %}
{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- elif message.role != 'system' or not loop.first %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""

REPLIES = [
    ("<think>\nI ponder.\n</think>\n\nThe answer.", Phase.start, ("I ponder.", "The answer.")),
    ("  <think>a b</think>c", Phase.start, ("a b", "c")),
    ("hello <think>x</think>", Phase.start, (None, "hello <think>x</think>")),  # not at the start: no thought
    ("plan\n</think>\n\nok", Phase.thought, ("plan", "ok")),  # DeepSeek-R1: the prompt opened it
    ("<think>cut off in the mid", Phase.start, ("cut off in the mid", "")),
    ("<thi", Phase.start, (None, "<thi")),
    ("<think></think>", Phase.start, ("", "")),
    ("answer <think>", Phase.answer, (None, "answer <think>")),
]


# ---------------------------------------------------------------- the splitter and the phases (no model)

@pytest.mark.parametrize("text,phase,expected", REPLIES)
def test_split_whole_and_streamed_piece_by_piece_agree(text, phase, expected):
    assert split(text, phase) == expected
    for size in (1, 2, 3, 7):
        s = Splitter(phase)
        pieces = [s.feed(text[i:i + size]) for i in range(0, len(text), size)] + [s.finish()]
        thought, answer = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
        assert ((thought if s.opened else None), answer) == expected, size


def test_the_splitter_holds_back_only_what_may_be_a_tag():
    s = Splitter(Phase.thought)
    assert s.feed("step one </th") == ("step one", "")
    assert s.feed("ink>") == ("", "")
    assert s.feed("\n\nDone") == ("", "Done")
    s = Splitter(Phase.start)
    assert s.feed("<th") == ("", "")
    assert s.feed("e end") == ("", "<the end")


def test_phases_from_the_prompt_and_templates_that_think():
    assert prompt_phase("<|im_start|>assistant\n") is Phase.start
    assert prompt_phase("<|im_start|>assistant\n<think>\n") is Phase.thought  # DeepSeek-R1 distills
    assert prompt_phase("<|im_start|>assistant\n<think>\n\n</think>\n\n") is Phase.answer  # enable_thinking false
    assert prompt_phase("<think>x</think>\nold answer<|im_end|>\n<|im_start|>assistant\n") is Phase.start
    assert prompt_phase("what is <think>?<|im_end|>\n<|im_start|>assistant\n") is Phase.start  # a user's words
    assert template_thinks(QWEN3_STYLE) and not template_thinks("{{ messages }}") and not template_thinks(None)


class Forced:
    """A stand-in model: text per token id, and the logits row it gets (flat)."""

    VOCAB = ["<think>", "</think>", "a", "b", "{", "}"]

    def text(self, token: int) -> str:
        return self.VOCAB[token]


class Only:
    """An inner processor (a grammar stand-in) allowing one token; records what it accepted."""

    def __init__(self, token: int) -> None:
        self.token, self.seen = token, []

    def __call__(self, logits):
        keep = logits[self.token]
        logits[:] = -np.inf
        logits[self.token] = keep
        return logits

    def accept(self, token: int) -> None:
        self.seen.append(token)


def _run(gate: ThoughtGate, want: list[int], steps: int) -> list[int]:
    """Greedy over a row that prefers ``want[i]`` at step i (else token 2): what the gate lets through."""
    out = []
    for i in range(steps):
        row = np.zeros(len(Forced.VOCAB), dtype=np.float32)
        row[want[i] if i < len(want) else 2] = 1.0
        token = int(np.argmax(gate(row)))
        gate.accept(token)
        out.append(token)
    return out


def test_the_gate_closes_the_thought_at_the_budget_and_keeps_the_grammar_for_the_answer():
    m = Forced()
    inner = Only(4)
    gate = ThoughtGate(Phase.thought, m.text, [0], [1], budget=3, inner=[inner])
    assert _run(gate, [], 6) == [2, 2, 2, 1, 4, 4]  # three thinking tokens, "</think>" forced, then the grammar
    assert inner.seen == [4, 4]  # the grammar saw the answer only
    gate = ThoughtGate(Phase.start, m.text, [0], [1], budget=1, inner=[Only(5)], force_open=True)
    assert _run(gate, [3, 3, 3], 5) == [0, 3, 1, 5, 5]  # the thought is opened by force before the grammar
    gate = ThoughtGate(Phase.start, m.text, [0], [1], budget=None)
    assert _run(gate, [0, 3, 1, 3], 6) == [0, 3, 1, 3, 2, 2]  # no budget: the model closes it itself
    gate = ThoughtGate(Phase.answer, m.text, [0], [1], budget=0, inner=[Only(4)], force_open=True)
    assert _run(gate, [], 2) == [4, 4]  # the prompt closed the thought: the grammar from the first token


# ---------------------------------------------------------------- a tiny Qwen3 behind the server

# DeepSeek-R1's way: the generation prompt opens the thought, the model only closes it.
R1_STYLE = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


def _tiny_qwen3(root, template: str):
    """A 2-block random Qwen3 (``<think>``/``</think>`` as added tokens, as Qwen3 ships them), exported."""
    import torch
    from conftest import _bpe_tokenizer, _save
    from runtime_artifacts import build
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>", "</think>"])
    tok.bos_token, tok.eos_token, tok.pad_token = None, "<|im_end|>", "<|endoftext|>"
    tok.chat_template = template
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    src = _save(Qwen3ForCausalLM(cfg).eval(), tok, root / "hf")
    return build("qwen3", str(src), str(root / "art"))


@pytest.fixture(scope="module")
def qwen3_art(tmp_path_factory):
    """The tiny Qwen3 with the Qwen3-style template."""
    return _tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), QWEN3_STYLE)


@pytest.fixture(scope="module")
def api(qwen3_art):
    from starlette.testclient import TestClient

    from edgeft.runtime.serve import ServeConfig, build_app

    client = TestClient(build_app(ServeConfig(artifacts=(qwen3_art,), names=("qwen",), threads=1)),
                        raise_server_exceptions=False)
    with client:
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline, "models did not load"
            time.sleep(0.05)
        yield client


def _chat(api, **body):
    r = api.post("/v1/chat/completions", json={"model": "qwen", "messages": [{"role": "user", "content": "Hi?"}],
                                               "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _streamed(api, **body) -> tuple[str, str, str]:
    """(reasoning, content, finish) joined from a streamed chat's deltas (via the openai client)."""
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
    thought, content, finish = [], [], None
    for c in client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi?"}],
                                            stream=True, **{"temperature": 0, **body}):
        delta = c.choices[0].delta
        thought.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        finish = c.choices[0].finish_reason or finish
    return "".join(thought), "".join(content), finish


def test_a_budgeted_thought_then_a_json_answer(api, qwen3_art):
    from edgeft.runtime import Generator

    fmt = {"type": "json_object"}
    raw = _chat(api, max_tokens=40, max_reasoning_tokens=5, response_format=fmt, reasoning_format="none")
    text = raw["message"]["content"]
    assert text.startswith("<think>") and "</think>" in text and "reasoning_content" not in raw["message"]
    gen = Generator.open(qwen3_art, threads=1)
    thought_ids = gen.tokenizer.encode(text[len("<think>"):text.index("</think>")], add_special_tokens=False).ids
    assert len(thought_ids) <= 5  # the budget (five tokens; their text may re-encode shorter)
    answer = text.split("</think>", 1)[1]
    assert answer.startswith("{")  # the grammar starts right after the thought
    parsed = _chat(api, max_tokens=40, max_reasoning_tokens=5, response_format=fmt)
    message = parsed["message"]
    assert message["reasoning_content"] == split(text)[0] and message["content"] == answer
    assert _streamed(api, max_tokens=40, response_format=fmt, extra_body={"max_reasoning_tokens": 5}) == (
        message["reasoning_content"], message["content"], parsed["finish_reason"])
    if parsed["finish_reason"] == "stop":
        assert isinstance(json.loads(message["content"]), dict)


def test_thinking_switched_off_by_the_template_and_a_plain_reply(api):
    off = _chat(api, max_tokens=12, response_format={"type": "json_object"},
                chat_template_kwargs={"enable_thinking": False})
    assert "reasoning_content" not in off["message"] and off["message"]["content"].startswith("{")
    assert _chat(api, max_tokens=12, response_format={"type": "json_object"}, reasoning_effort="none") == off
    plain = _chat(api, max_tokens=12)  # the random model opens no thought: nothing is separated
    assert "reasoning_content" not in plain["message"] and "<think>" not in plain["message"]["content"]
    quoted = _chat(api, max_tokens=12, messages=[{"role": "user", "content": "What is <think>"}])
    assert "reasoning_content" not in quoted["message"] and quoted["message"]["content"]  # the user's tag opens nothing
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                               "reasoning_format": "wat"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format"
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                               "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                               "max_reasoning_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_reasoning_tokens"
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                               "reasoning_effort": "wat"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_a_required_tool_call_comes_after_the_thought(api):
    tool = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "additionalProperties": False, "properties": {}}}}
    choice = _chat(api, max_tokens=60, tools=[tool], tool_choice="required", parallel_tool_calls=False,
                   max_reasoning_tokens=3)
    message = choice["message"]
    assert message["reasoning_content"] is not None
    if choice["finish_reason"] == "tool_calls":
        assert message["tool_calls"][0]["function"]["name"] == "now"
    else:  # the tiny random model may pad the arguments until the budget ends; the call still began the answer
        assert choice["finish_reason"] == "length" and message["content"].startswith("<tool_call>{")


def test_a_streamed_thought_then_call_equals_the_whole_answer(api):
    """With tools offered, the thought streams as reasoning_content and the answer through the call
    reader: joined, the deltas are the whole answer's reasoning and calls (no markup in content)."""
    tool = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    body = {"max_tokens": 40, "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False,
            "max_reasoning_tokens": 3}
    whole = _chat(api, **body)
    r = api.post("/v1/chat/completions", json={"model": "qwen", "messages": [{"role": "user", "content": "Hi?"}],
                                               "temperature": 0, "stream": True, **body})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    thought = "".join(d.get("reasoning_content") or "" for d in deltas)
    args = "".join(t["function"].get("arguments") or "" for d in deltas for t in d.get("tool_calls") or [])
    names = [t["function"]["name"] for d in deltas for t in d.get("tool_calls") or [] if "name" in t["function"]]
    assert thought == whole["message"]["reasoning_content"] and thought
    assert not any(d.get("content") for d in deltas) and "<tool_call>" not in r.text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    if whole["finish_reason"] == "tool_calls":
        call = whole["message"]["tool_calls"][0]["function"]
        assert names == [call["name"]] and args == call["arguments"]


SEEDED = {"temperature": 1.0, "seed": 3}


def test_a_prompt_that_opens_the_thought_deepseek_r1_style(tmp_path_factory):
    """The model never writes ``<think>``: the prompt did. Without a budget the random model never
    closes the thought (all of it is reasoning); with one, ``</think>`` is forced and an answer follows."""
    from starlette.testclient import TestClient

    from edgeft.runtime.serve import ServeConfig, build_app

    art = _tiny_qwen3(tmp_path_factory.mktemp("tiny-r1"), R1_STYLE)
    with TestClient(build_app(ServeConfig(artifacts=(art,), names=("qwen",), threads=1))) as client:
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline, "models did not load"
            time.sleep(0.05)
        free = _chat(client, max_tokens=12, **SEEDED)
        assert free["message"]["reasoning_content"] and free["message"]["content"] == ""
        assert free["finish_reason"] == "length"
        raw = _chat(client, max_tokens=24, max_reasoning_tokens=6, reasoning_format="none",
                    **SEEDED)["message"]["content"]
        assert raw.count("</think>") == 1 and "<think>" not in raw[:1]  # the prompt opened it
        budgeted = _chat(client, max_tokens=24, max_reasoning_tokens=6, **SEEDED)["message"]
        assert (budgeted["reasoning_content"], budgeted["content"]) == split(raw, Phase.thought)
        assert budgeted["content"] and budgeted["reasoning_content"]
        streamed = _streamed(client, max_tokens=24, extra_body={"max_reasoning_tokens": 6}, **SEEDED)
        assert streamed[:2] == split(raw, Phase.thought)
