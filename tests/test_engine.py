"""The continuous-batching engine on both graph families (GQA slots, left-padded GPT-2) and the
one-at-a-time fallback: every sequence of a batch sees the logits it would see alone, with
mixed prompt lengths, staggered arrival, chunked prefill, a shared prefix and a cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from runtime_artifacts import build

from edgeft.errors import EdgeftError
from edgeft.runtime import Generator, SamplingParams
from edgeft.runtime.engine import Engine, EngineEvent, Overloaded
from edgeft.runtime.generate import ContextLengthError
from edgeft.runtime.processors import log_softmax

TOL = 1e-4
TEXTS = ["shall i compare thee", "thou art more lovely and more temperate: rough winds do shake the darling buds",
         "so long as men can breathe or eyes can see, so long lives this, and this gives life to thee. "
         "when in disgrace with fortune and men's eyes", "o"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    src = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    art = build(request.param, str(src), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))
    return request.param, Generator.open(art)


class Tap:
    """A processor that keeps a copy of every row of logits its sequence is given."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def __call__(self, logits):
        self.rows.append(logits.copy())
        return logits

    def accept(self, token):
        pass


class Run:
    """One submitted sequence's chunks, its tap and a 'finished' event."""

    def __init__(self, engine: Engine, ids: list[int], params: SamplingParams, after: dict | None = None):
        self.engine, self.ids, self.params, self.tap = engine, ids, params, Tap()
        self.chunks, self.done, self.after, self.seq = [], threading.Event(), after or {}, None

    def submit(self) -> "Run":
        self.seq = self.engine.submit(self.ids, self.params, self.on_chunk, [self.tap])
        return self

    def on_chunk(self, chunk) -> None:
        self.chunks.append(chunk)
        n = sum(c.token_id is not None for c in self.chunks)
        action = self.after.pop(n, None)
        if action is not None:
            action(self)
        if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [c.token_id for c in self.chunks if c.token_id is not None]


def _check_alone(gen: Generator, run: Run) -> None:
    """The tapped rows equal one-pass logits of the same tokens; greedy tokens equal generate() alone."""
    toks = run.tokens
    full = gen.score(run.ids + toks)[len(run.ids) - 1:]
    assert len(run.tap.rows) >= len(toks)
    for i, row in enumerate(run.tap.rows[:len(toks) + 1][:full.shape[0]]):
        np.testing.assert_allclose(row, full[i], atol=TOL, rtol=TOL)
    if run.params.greedy:
        alone = gen.generate(run.ids, run.params).token_ids
        for i, (a, b) in enumerate(zip(toks, alone)):
            top2 = np.sort(full[i])[-2:]
            if top2[1] - top2[0] <= TOL:
                break  # a near tie: either token is right
            assert a == b, f"token {i} differs"


def _wait(runs: list[Run]) -> None:
    for r in runs:
        assert r.done.wait(60), "a sequence never finished"


def test_manifest_says_how_each_family_batches(case):
    kind, gen = case
    expected = "slots" if kind == "llama" else "padded"
    assert gen.decoder.batching == expected
    engine = Engine(gen, parallel=2, ctx_size=256)
    try:
        assert engine.kind == expected
    finally:
        engine.close()


@pytest.mark.parametrize("batching", [None, "none"])
def test_batched_sequences_see_their_own_logits(case, batching):
    kind, gen = case
    engine = Engine(gen, parallel=3, ctx_size=3 * 96, prefill_budget=16, batching=batching)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=4, ignore_eos=True)
    try:
        ids = [gen.encode(t) for t in TEXTS]
        late = Run(engine, ids[3], greedy)
        later = Run(engine, ids[1], sampled)
        cancelled = Run(engine, ids[2], greedy, after={3: lambda r: r.seq.cancel()})
        # the first starts alone; the others join while it decodes; a fourth waits for a free slot
        first = Run(engine, ids[0], greedy, after={2: lambda r: (cancelled.submit(), later.submit()),
                                                   4: lambda r: late.submit()})
        first.submit()
        _wait([first, later, late])
        assert cancelled.seq.done and len(cancelled.tokens) == 3 and cancelled.chunks[-1].finish_reason is None
        for r in (first, later, late):
            assert len(r.tokens) == r.params.max_new_tokens and r.chunks[-1].finish_reason == "length"
            _check_alone(gen, r)
        _check_alone(gen, cancelled)
        assert engine.stats.steps < sum(len(r.tokens) for r in (first, later, late, cancelled))  # really batched
        alone = gen.generate(ids[1], sampled)
        assert later.tokens == alone.token_ids  # a seeded sampler draws the same tokens in a batch
        assert engine.slots_in_use == 0
    finally:
        engine.close()


def test_a_shared_prefix_is_reused_and_changes_nothing(case):
    kind, gen = case
    engine = Engine(gen, parallel=2, ctx_size=2 * 128)
    try:
        head = gen.encode(TEXTS[2])
        a = Run(engine, head + gen.encode(" and summer's lease"), SamplingParams(max_new_tokens=6)).submit()
        _wait([a])
        b = Run(engine, head + gen.encode(" hath all too short a date"), SamplingParams(max_new_tokens=6)).submit()
        _wait([b])
        shared = next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)
        assert shared >= len(head) - 1
        assert engine.stats.reused == (shared if kind == "llama" else 0)  # GQA slots keep prefixes
        _check_alone(gen, b)
    finally:
        engine.close()


def test_generate_batch_equals_one_by_one(case):
    _, gen = case
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=5, temperature=0.8, seed=1),
              SamplingParams(max_new_tokens=8, stop=("e",)), SamplingParams(max_new_tokens=3, logprobs=2)]
    done = []
    outs = gen.generate_batch(TEXTS, params, parallel=3, on_done=done.append)
    assert sorted(done) == [0, 1, 2, 3]
    for text, p, out in zip(TEXTS, params, outs):
        alone = gen.generate(text, p)
        assert out.token_ids == alone.token_ids and out.text == alone.text
        assert out.finish_reason == alone.finish_reason
    lp = outs[3].logprobs
    ids = gen.encode(TEXTS[3])
    rows = gen.score(ids + outs[3].token_ids)[len(ids) - 1:]
    for row, entry in zip(rows, lp):
        assert abs(entry.logprob - log_softmax(row)[entry.token]) < TOL


def test_admission_limits(case):
    _, gen = case
    engine = Engine(gen, parallel=1, ctx_size=64, queue_size=1)
    try:
        with pytest.raises(ContextLengthError, match="slot of 64 tokens"):
            engine.submit(list(range(1, 40)), SamplingParams(max_new_tokens=30), lambda c: None)
        with pytest.raises(EdgeftError):
            engine.submit([], SamplingParams(), lambda c: None)
        gate = threading.Event()
        runs = [Run(engine, [5, 6, 7], SamplingParams(max_new_tokens=40, ignore_eos=True),
                    after={1: lambda r: gate.wait(30)}) for _ in range(2)]
        for r in runs:
            r.submit()
        with pytest.raises(Overloaded):  # one running, one waiting: the line is full
            engine.submit([5, 6], SamplingParams(max_new_tokens=4), lambda c: None)
        gate.set()
        _wait(runs)
    finally:
        engine.close()


def test_engine_events_are_typed_and_each_feeds_its_metric(case):
    from edgeft.runtime.serve.metrics import Registry, engine_observer

    _, gen = case
    metrics, seen = Registry(), []
    feed = engine_observer(metrics, "m")

    def observe(event, value):
        seen.append(event)
        feed(event, value)

    engine = Engine(gen, parallel=2, ctx_size=128, queue_size=2, observe=observe)
    try:
        runs = [Run(engine, [5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True)).submit() for _ in range(2)]
        _wait(runs)
    finally:
        engine.close()
    assert all(isinstance(e, EngineEvent) for e in seen)
    assert {EngineEvent.waiting, EngineEvent.slots, EngineEvent.queue_wait, EngineEvent.batch} <= set(seen)
    assert metrics.queue_wait.count(model="m") == 2 and metrics.decode_batch.count(model="m") >= 1
    for event in EngineEvent:  # every event has its metric
        feed(event, 1.0)
