"""The runtime engines on real tiny artifacts: a fused genai-builder llama graph (shared KV
buffers), a torch.onnx GPT-2 graph (bound presents) and a BERT classifier, checked against
PyTorch and transformers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from runtime_artifacts import LABELS, bert_classifier, build

from edgeft import artifact
from edgeft.errors import EdgeftError
from edgeft.runtime import Completion, Generator, SamplingParams, TextClassifier, load
from edgeft.runtime.chat import ChatTemplateError, render
from edgeft.runtime.detok import REPLACEMENT, IncrementalDetokenizer
from edgeft.runtime.generate import ContextLengthError
from edgeft.runtime.sampling import Sampler, apply_repetition_penalty, candidates

PROMPT = "shall i compare thee to a summer's day"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder_case(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    src = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    art = build(request.param, str(src), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))
    return request.param, src, Generator.open(art)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    return Generator.open(build("llama", str(tiny_llama_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts")))


def _hf(src):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)


# --------------------------------------------------------------------------- generation


def test_kind_of_cache_binding(decoder_case):
    kind, _, gen = decoder_case
    assert gen.engine.share_buffer is (kind == "llama")  # GQA: one buffer; torch.onnx: bound presents


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers(decoder_case, penalty):
    import torch

    kind, src, gen = decoder_case
    model, tok = _hf(src)
    ids = gen.encode(PROMPT)
    assert ids == tok(PROMPT).input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    ends = [i for i, t in enumerate(ref) if t in gen.eos_ids]
    ref = ref[:ends[0]] if ends else ref  # transformers keeps the EOS; a Completion leaves it out
    out = gen.generate(ids, SamplingParams(max_new_tokens=24, repetition_penalty=penalty))
    assert out.token_ids == ref
    assert out.finish_reason == ("stop" if ends else "length")
    assert out.prompt_tokens == len(ids) and out.completion_tokens == len(out.token_ids)


def test_kv_cache_steps_equal_full_recompute(decoder_case):
    _, _, gen = decoder_case
    ids = gen.encode(PROMPT)
    sampled = gen.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)).token_ids
    assert len(set(sampled)) > 1  # a varied continuation, so each step really differs
    full = gen.score(ids + sampled)
    state = gen.engine.start(len(ids) + len(sampled))
    step_logits = [state.prefill(ids)] + [state.step(t) for t in sampled[:-1]]
    for i, row in enumerate(step_logits):
        np.testing.assert_allclose(row, full[len(ids) - 1 + i], atol=1e-4, rtol=1e-4)


def test_score_equals_pytorch_logits(decoder_case):
    import torch

    _, src, gen = decoder_case
    model, _ = _hf(src)
    ids = gen.encode(PROMPT + " thou art more lovely")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(gen.score(ids), ref, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible(llama):
    p = SamplingParams(max_new_tokens=16, temperature=1.2, top_k=40, top_p=0.95, seed=7)
    a, b = llama.generate(PROMPT, p), llama.generate(PROMPT, p)
    assert a == b
    c = llama.generate(PROMPT, dataclasses.replace(p, seed=8))
    assert c.token_ids != a.token_ids
    assert llama.generate(PROMPT, dataclasses.replace(p, top_k=1)).token_ids == \
        llama.generate(PROMPT, SamplingParams(max_new_tokens=16)).token_ids


def test_top_k_and_top_p_restrict_candidates():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    ids, probs = candidates(logits, top_k=0, top_p=0.7)
    assert ids.tolist() == [0, 1] and np.allclose(probs, [0.625, 0.375])
    ids, probs = candidates(logits, top_k=3, top_p=1.0)
    assert ids.tolist() == [0, 1, 2] and np.isclose(probs.sum(), 1)
    big = rng.normal(size=5000).astype(np.float32) * 3  # the top-p window and the full sort agree
    for top_p in (0.3, 0.9, 0.999):
        ids, probs = candidates(big, 0, top_p)
        order = np.argsort(-big)
        full = np.exp(big[order] - big.max()) / np.exp(big - big.max()).sum()
        keep = int(np.searchsorted(np.cumsum(full), top_p)) + 1
        assert set(ids.tolist()) == set(order[:keep].tolist())
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=1), vocab_size=big.size)
    draws = [sampler(big.copy()) for _ in range(400)]
    assert set(draws) <= set(np.argsort(-big)[:5].tolist()) and len(set(draws)) > 1


def test_repetition_penalty_formula():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits.copy(), np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_stop_string_max_tokens_and_eos(llama, tmp_path):
    greedy = llama.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=5))
    assert greedy.finish_reason == "length" and greedy.completion_tokens == 20
    text = greedy.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = llama.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, stop=(stop, "\x00never")))
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert cut.completion_tokens < 20
    streamed = list(llama.stream(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, stop=(stop,))))
    assert "".join(c.text for c in streamed) == cut.text
    assert [c.finish_reason for c in streamed[:-1]] == [None] * (len(streamed) - 1)

    # An artifact whose EOS is the 4th token generated stops right there, EOS not in the output.
    eos = greedy.token_ids[3]
    first = greedy.token_ids.index(eos)
    m = llama.manifest
    eos_manifest = dataclasses.replace(m, tokenizer=dataclasses.replace(m.tokenizer, eos_token_ids=[eos]))
    out = Generator(llama.folder, eos_manifest).generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=5))
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[:first]


def test_context_bound_is_a_clear_error(llama):
    ctx = llama.context_length
    long_prompt = list(range(5, 5 + ctx - 10))
    with pytest.raises(ContextLengthError, match=f"exceeds the model's context of {ctx} tokens"):
        llama.stream(long_prompt, SamplingParams(max_new_tokens=20))
    assert isinstance(ContextLengthError("x"), EdgeftError)
    assert llama.generate(long_prompt, SamplingParams(max_new_tokens=10)).completion_tokens <= 10
    with pytest.raises(EdgeftError, match="outside the vocabulary"):
        llama.generate([10**6], SamplingParams(max_new_tokens=2))


def test_sampling_params_validate():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1},
                {"repetition_penalty": 0}, {"stop": ("",)}):
        with pytest.raises(EdgeftError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)


def test_incremental_detok_never_breaks_utf8(llama):
    text = "naïve café — 日本語のテキスト 🎉🙂 Ελληνικά, and plain words too"
    ids = llama.encode(text)
    assert len(ids) > len(text) / 2  # the tiny tokenizer splits multi-byte characters into byte tokens
    detok = IncrementalDetokenizer(llama.tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == llama.decode(ids) == text
    cut = IncrementalDetokenizer(llama.tokenizer)  # stopping inside a character drops the partial bytes
    partial = [cut.add(t) for t in llama.encode("🎉")[:-1]] + [cut.flush()]
    assert REPLACEMENT not in "".join(partial)


def test_chat_template_renders_like_transformers(llama, tiny_llama_dir):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A sonnet?"}]
    ref = AutoTokenizer.from_pretrained(tiny_llama_dir).apply_chat_template(msgs, tokenize=False,
                                                                             add_generation_prompt=True)
    assert llama.render_chat(msgs) == ref
    assert llama.render_chat(msgs).endswith("<|im_start|>assistant\n")
    guard = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        render(guard, [{"role": "assistant", "content": "x"}])
    with pytest.raises(Exception, match="unsafe|access"):  # the sandbox blocks attribute escapes
        render("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(EdgeftError, match="role"):
        llama.render_chat([{"content": "no role"}])


def test_packed_artifact_and_load_by_task(llama, bert_art, tmp_path):
    packed = artifact.pack(llama.folder, tmp_path / "llama.edgeft")
    g = load(packed)
    assert isinstance(g, Generator)
    assert g.generate(PROMPT, SamplingParams(max_new_tokens=5)) == llama.generate(PROMPT, SamplingParams(max_new_tokens=5))
    assert isinstance(load(bert_art), TextClassifier)
    with pytest.raises(EdgeftError, match="not a text generator"):
        Generator.open(bert_art)
    assert isinstance(llama.generate(PROMPT, SamplingParams(max_new_tokens=2)), Completion)


# --------------------------------------------------------------------------- classification


TEXTS = ["a gorgeous, witty, seductive movie.", "bad", "the plot is nothing but boilerplate clichés from start to "
         "finish, and the script assumes that not only would subtlety be lost on the target audience, but that it's "
         "also too stupid to realize", "", "shall i compare thee to a summer's day? thou art more lovely",
         "it 's a charming and often affecting journey ."]


def test_classifier_matches_pytorch_and_keeps_order(bert_art, tiny_bert_dir):
    import torch
    from transformers import AutoTokenizer

    clf = TextClassifier.open(bert_art)
    assert clf.labels == LABELS
    model, tok = bert_classifier(tiny_bert_dir, LABELS), AutoTokenizer.from_pretrained(tiny_bert_dir)
    ref = []
    for t in TEXTS:  # one at a time: no padding at all in the reference
        with torch.no_grad():
            ref.append(torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).numpy())
    for bs in (1, 2, 32):  # sorted, padded batches give each text its own unpadded answer, in input order
        np.testing.assert_allclose(clf.predict_proba(TEXTS, batch_size=bs), np.stack(ref), atol=1e-5)
    out = clf.classify(TEXTS, batch_size=4)
    assert [o["label"] for o in out] == [LABELS[int(r.argmax())] for r in ref]
    assert all(set(o["scores"]) == set(LABELS) and abs(sum(o["scores"].values()) - 1) < 1e-5 for o in out)
    assert clf.predict_proba([]).shape == (0, len(LABELS))


def test_classifier_token_budget_cuts_calls_and_keeps_answers(bert_art):
    clf = TextClassifier.open(bert_art, batch_tokens=24, threads=2)  # several calls, run side by side
    lengths = [7, 3, 12, 30, 5, 5, 9]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks = clf._chunks(order, lengths, batch_size=3)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:  # padded size within the budget, unless one text is longer on its own
        assert len(c) <= 3 and (len(c) * max(lengths[i] for i in c) <= 24 or len(c) == 1)
    assert [len(c) for c in chunks] == [3, 2, 1, 1]  # 3,5,5 | 7,9 | 12 | 30
    whole = TextClassifier.open(bert_art, batch_tokens=10**6)
    np.testing.assert_allclose(clf.predict_proba(TEXTS * 3), whole.predict_proba(TEXTS * 3), atol=1e-5)
    with pytest.raises(EdgeftError):
        TextClassifier.open(bert_art, batch_tokens=0)


def test_blockwise_draw_equals_one_cumulative_sum():
    from edgeft.runtime.sampling import draw

    rng = np.random.default_rng(2)
    for n in (7, 3000, 49153):
        probs = rng.random(n).astype(np.float32) ** 8
        probs /= probs.sum()
        cdf = np.cumsum(probs.astype(np.float64))
        for u in rng.random(50).tolist() + [0.0, 0.999999]:
            want = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
            assert abs(draw(probs, u) - want) <= 1 and probs[draw(probs, u)] > 0


def test_chunked_prefill_equals_one_pass(decoder_case, monkeypatch):
    from edgeft.runtime import generate

    _, _, gen = decoder_case
    ids = gen.encode(PROMPT + " thou art more lovely and more temperate")
    whole, greedy = gen.score(ids), gen.generate(ids, SamplingParams(max_new_tokens=8))
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)  # several graph calls with a growing cache
    np.testing.assert_allclose(gen.score(ids), whole, atol=1e-5, rtol=1e-5)
    assert gen.generate(ids, SamplingParams(max_new_tokens=8)) == greedy


def test_prompt_cache_reuses_a_conversation_prefix(decoder_case):
    from edgeft.runtime.generate import PromptCache

    _, _, gen = decoder_case
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    cache = PromptCache()
    first = gen.encode(PROMPT)
    a = gen.generate(first, p)
    assert "".join(c.text for c in gen.stream(first, p, cache=cache)) == a.text
    # the next turn repeats the first prompt and its reply, then adds more (the cache must grow)
    second = first + a.token_ids + gen.encode(" thou art more lovely and more temperate, rough winds")
    b_fresh = gen.generate(second, p)
    b_cached = "".join(c.text for c in gen.stream(second, p, cache=cache))
    assert b_cached == b_fresh.text and cache.reused >= len(first) + len(a.token_ids) - 1
    # a prompt that diverges early (an edited turn) rewinds the cache and still matches
    third = first[:3] + gen.encode(" summer")
    reused = cache.reused
    assert "".join(c.text for c in gen.stream(third, p, cache=cache)) == gen.generate(third, p).text
    assert cache.reused == reused + 3
