"""One base, many tuned decoders: a split decoder artifact (trunk + top) and the shared trunk at load.

The tiny llama (4 blocks, tied embeddings) is exported whole and with ``--trunk-blocks``: the
split artifact must give the unsplit one's logits (prompt, cache steps) and greedy tokens. Two
tiny tune runs from the same base (top 2 blocks trained, different data and seeds) exported
with ``--trunk-blocks 2`` carry byte-identical trunks that load as one onnxruntime session, and
a changed trunk byte is refused. gpt2's torch.onnx graph is refused in one line. Their engines
(``batch_trunk``) share one trunk call per decode step, each sequence getting what it gets alone,
also while a model joins or leaves mid-sequence (the group's thread is held at a chosen step by a
hook, so "mid-sequence" is a state, never a race). The group's trunk KV pool is one ``parallel`` of
rows whatever the number of models: more requests than rows wait their turn, oldest first, and a
member holds only its top's caches.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import EdgeftError

PROMPT = "Shall I compare thee to a summer's day"
VERSES = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n",
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n"]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> list[Path]:
    """Two runs from the same base: the top 2 of 4 blocks trained, on different text with different seeds."""
    from edgeft.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("decoder-trunk-runs")
    out = []
    for i, verse in enumerate(VERSES):
        data = root / f"verse{i}.txt"
        data.write_text(verse * 30)
        out.append(Path(tune(TuneConfig(model=str(tiny_llama_dir), data=data, out=root / f"run{i}", max_length=32,
                                        batch_size=8, max_steps=4, lr=3e-3, warmup=0, progress=False, threads=1,
                                        trainable_layers=2, seed=i))))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(source, quantize, trunk_blocks=None)``: the artifact folder, exported once."""
    from edgeft.export import ExportConfig, export

    root, done = tmp_path_factory.mktemp("decoder-trunk-arts"), {}

    def get(source: Path, quantize: str, blocks: int | None = None) -> Path:
        key = (str(source), quantize, blocks)
        if key not in done:
            out = root / f"a{len(done)}-{quantize}-{blocks}"
            done[key] = Path(export(ExportConfig(source=str(source), out=out, quantize=quantize, trunk_blocks=blocks,
                                                 allow_degraded=True, gate_texts=8, gate_new_tokens=8, threads=1),
                                    log=None))
        return done[key]

    return get


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _open(folder: Path):
    from edgeft.runtime import Generator

    return Generator.open(folder, threads=1)


def _steps(gen, ids: list[int], tokens: list[int]) -> np.ndarray:
    """The logits after the prompt, then after each of ``tokens`` fed one by one through the cache."""
    state = gen.engine.start(len(ids) + len(tokens) + 1)
    rows = [state.prefill(ids)]
    rows += [state.step(t) for t in tokens]
    return np.stack(rows)


@pytest.mark.parametrize("blocks", [1, 4])
def test_split_base_equals_unsplit(tiny_llama_dir, exported, blocks):
    """fp32: the split artifact gives the unsplit one's logits (within 1e-4) and greedy tokens, token for token."""
    from edgeft.runtime import SamplingParams

    whole, split = exported(tiny_llama_dir, "none"), exported(tiny_llama_dir, "none", blocks)
    m = _manifest(split)
    trunk = m["trunk"]
    # the tiny llama ties its head: the base's head is a shared file of its own (format 3, tests/test_decoder_head.py)
    assert m["graph"]["file"] == "top.onnx" and m["graph"]["genai_config"] is None and m["format_version"] == 3
    assert trunk["blocks"] == blocks and trunk["file"] == f"trunk-{trunk['sha256'][:16]}.onnx"
    assert trunk["file"] in m["files"] and not (split / "model.onnx").exists()
    assert not (split / "genai_config.json").exists() and m["gate"]["passed"]
    assert "trunk" not in _manifest(whole) or _manifest(whole)["trunk"] is None  # the default: one graph
    assert (whole / "model.onnx").exists()

    a, b = _open(whole), _open(split)
    assert b.engine.trunk is not None and b.engine.trunk.blocks == blocks
    ids = a.encode(PROMPT)
    np.testing.assert_allclose(b.score(ids), a.score(ids), atol=1e-4, rtol=0)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    want = a.generate(ids, greedy).token_ids
    assert b.generate(ids, greedy).token_ids == want
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    assert b.generate(ids, sampled).token_ids == a.generate(ids, sampled).token_ids
    fed = [3, 17, 42, 5, 99, 8]  # varied tokens: every step's cache read in both parts, not one repeated token
    np.testing.assert_allclose(_steps(b, ids, fed), _steps(a, ids, fed), atol=1e-4, rtol=0)


def test_split_reuses_a_conversation_cache(tiny_llama_dir, exported):
    """A PromptCache over a split model (rewound and grown in both parts) gives the unsplit model's tokens."""
    from edgeft.runtime import SamplingParams
    from edgeft.runtime.generate import PromptCache, collect

    a, b = _open(exported(tiny_llama_dir, "none")), _open(exported(tiny_llama_dir, "none", 1))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    turns = [PROMPT, PROMPT + " thou art more lovely", PROMPT + " and more temperate, rough winds do shake"]
    got = {}
    for gen in (a, b):
        cache = PromptCache()
        got[gen] = [collect(gen.stream(t, params, cache=cache), 0, params).token_ids for t in turns]
        assert cache.reused > 0
    assert got[b] == got[a]


def test_split_run_equals_unsplit_int8(runs, exported):
    """A tuned run, int8, cut at its freeze boundary: the same logits and greedy tokens as its unsplit artifact."""
    from edgeft.runtime import SamplingParams

    whole, split = exported(runs[0], "int8"), exported(runs[0], "int8", 2)
    assert _manifest(whole)["trunk"] is None and (whole / "model.onnx").exists()  # a decoder splits only when asked
    a, b = _open(whole), _open(split)
    ids = a.encode(PROMPT)
    np.testing.assert_allclose(b.score(ids), a.score(ids), atol=1e-4, rtol=0)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert b.generate(ids, greedy).token_ids == a.generate(ids, greedy).token_ids


def test_two_runs_share_one_trunk_session(runs, exported):
    """Two runs from one base: byte-identical trunks, one onnxruntime session, their own tops."""
    from edgeft.runtime import trunks

    first, second = exported(runs[0], "none", 2), exported(runs[1], "none", 2)
    t1, t2 = _manifest(first)["trunk"], _manifest(second)["trunk"]
    assert t1["sha256"] == t2["sha256"]
    assert _manifest(first)["files"]["top.onnx"]["sha256"] != _manifest(second)["files"]["top.onnx"]["sha256"]
    a, b = _open(first), _open(second)
    assert a.engine.parts[0].session is b.engine.parts[0].session
    assert a.engine.session is not b.engine.session
    assert trunks.loaded()[t1["sha256"]] is a.engine.trunk
    ids = a.encode(PROMPT)
    assert np.abs(a.score(ids) - b.score(ids)).max() > 1e-3  # the tops differ: each model answers as itself
    whole = _open(exported(runs[1], "none"))
    np.testing.assert_allclose(b.score(ids), whole.score(ids), atol=1e-4, rtol=0)


def test_changed_trunk_byte_is_refused(runs, exported, tmp_path):
    """A trunk with one byte changed is refused, even while a session for its digest is loaded."""
    good = exported(runs[0], "none", 2)
    loaded = _open(good)  # holds the trunk's session in this process
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    name = _manifest(bad)["trunk"]["file"]
    raw = bytearray((bad / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (bad / name).write_bytes(bytes(raw))
    with pytest.raises(EdgeftError, match="trunk-"):
        _open(bad)
    assert loaded.engine.trunk is not None


def test_trunk_above_the_frozen_blocks_is_refused(runs, exported):
    with pytest.raises(EdgeftError, match="above the run's 2 frozen blocks"):
        exported(runs[0], "none", 3)


def test_batching_engine_runs_split(runs, exported):
    """The batching engine (slots, prefix reuse, speculation) over a split artifact: each prompt gets what the
    unsplit artifact's engine gives it, and what the split one gives it alone."""
    from edgeft.runtime import SamplingParams

    whole, split = _open(exported(runs[0], "none")), _open(exported(runs[0], "none", 2))
    prompts = [PROMPT, "Rough winds do shake", PROMPT + " thou art", "summer"]
    params = [SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_new_tokens=7, temperature=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, speculate="on"),
              SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)]
    got = [c.token_ids for c in split.generate_batch(prompts, params, parallel=3)]
    assert got == [c.token_ids for c in whole.generate_batch(prompts, params, parallel=3)]
    assert got == [split.generate(p, q).token_ids for p, q in zip(prompts, params)]


def test_gpt2_graph_is_refused(tiny_gpt2_dir, exported):
    """gpt2 exports through torch.onnx (no builder block names): --trunk-blocks says so in one line."""
    with pytest.raises(EdgeftError, match="onnxruntime-genai builder"):
        exported(tiny_gpt2_dir, "none", 1)


def _initializers(path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_head_copies(tiny_llama_dir, exported, tmp_path):
    """Tied (the base): the trunk's embedding and the shared head file read their own copy of the one matrix, the
    top none. Untied and trained (--untie-head): the trunk holds the embedding alone, the top the trained head
    alone, and there is no head file."""
    from edgeft.tune import TuneConfig, tune

    tied = exported(tiny_llama_dir, "int8", 2)
    trunk_file = tied / _manifest(tied)["trunk"]["file"]
    assert any(n.startswith("lm_head.") for n in _initializers(trunk_file))  # the builder's embedding reads it
    assert any(n.startswith("lm_head.") for n in _initializers(tied / _manifest(tied)["head"]["file"]))
    assert not any(n.startswith("lm_head.") for n in _initializers(tied / "top.onnx"))

    data = tmp_path / "verse.txt"
    data.write_text(VERSES[0] * 30)
    run = tune(TuneConfig(model=str(tiny_llama_dir), data=data, out=tmp_path / "run", max_length=32, batch_size=8,
                          max_steps=4, lr=3e-3, warmup=0, progress=False, threads=1, trainable_layers=2,
                          untie_head=True))
    whole, split = exported(run, "int8"), exported(run, "int8", 2)
    m = _manifest(split)
    assert m["head"] is None and m["format_version"] == 2 and not list(split.glob("head-*"))  # the top keeps it
    below = _initializers(split / m["trunk"]["file"])
    assert not any(n.startswith("lm_head.") for n in below) and any("embed_tokens" in n for n in below)
    assert not any("embed_tokens" in n for n in _initializers(split / "top.onnx"))
    a, b = _open(whole), _open(split)
    assert b.engine.head is None and len(b.engine.parts) == 2
    ids = a.encode(PROMPT)
    np.testing.assert_allclose(b.score(ids), a.score(ids), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- one trunk step for several models


NEW = 8  # tokens each sequence of the group tests generates


def _group_engine(gen, parallel: int = 2):
    from edgeft.runtime.engine import Engine

    return Engine(gen, parallel=parallel, ctx_size=parallel * 96, batch_trunk=True)


@contextlib.contextmanager
def _between_steps(group):
    """The group's thread waits between two iterations while the block runs (so what it submits is
    admitted in one iteration)."""
    inside, go = threading.Event(), threading.Event()
    t = threading.Thread(target=group._change, args=(lambda: (inside.set(), go.wait(60)),), daemon=True)
    t.start()
    assert inside.wait(60)
    try:
        yield
    finally:
        go.set()
        t.join(60)


def _count_runs(session, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = session.run_with_iobinding
    monkeypatch.setattr(session, "run_with_iobinding", lambda io, *a: calls.append(1) or real(io, *a))
    return calls


def _until(condition) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_one_trunk_call_per_step_for_two_models_each_row_as_alone(runs, exported, monkeypatch):
    """Two models on one trunk in one group: every decode step runs the trunk once for both models'
    rows; each sequence's logits are its model's alone (1e-4) and its greedy tokens too."""
    from test_engine import Run, _check_alone, _wait

    from edgeft.runtime import SamplingParams

    a, b = _open(exported(runs[0], "none", 2)), _open(exported(runs[1], "none", 2))
    ea, eb = _group_engine(a, parallel=4), _group_engine(b, parallel=4)
    try:
        group = ea.group
        assert group is not None and eb.group is group and group.members == [ea, eb]
        assert group.pool[0].shape[0] == 4  # one pool of trunk rows for both: one parallel of them
        calls = _count_runs(a.engine.trunk.session, monkeypatch)
        assert a.engine.head is not None and b.engine.head is a.engine.head  # the base's head: one session
        heads = _count_runs(a.engine.head.session, monkeypatch)
        greedy = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, speculate="off")
        sampled = SamplingParams(max_new_tokens=NEW, temperature=0.9, seed=5, ignore_eos=True, speculate="off")
        lent: list[list[int]] = []
        with _between_steps(group):  # all four admitted and prefilled in one iteration
            jobs = [Run(ea, a.encode(PROMPT), greedy, after={2: lambda r: lent.append(
                        sorted([*ea.kv.rows.values(), *eb.kv.rows.values()]))}).submit(),
                    Run(eb, b.encode(PROMPT), greedy).submit(),
                    Run(eb, b.encode("Rough winds do shake"), sampled).submit(),
                    Run(ea, a.encode("summer"), greedy).submit()]
        _wait(jobs)
        assert len(calls) == 4 + (NEW - 1)  # a prefill each, then one trunk call per step for every row
        assert len(heads) == 4 + (NEW - 1)  # and one head call per step for both models' rows
        assert lent == [[0, 1, 2, 3]]  # the rows in use are packed whichever model holds them: one call spans 4
        assert group.steps == NEW - 1 and ea.stats.steps == eb.stats.steps == NEW - 1
        for job, gen in zip(jobs, (a, b, b, a)):
            assert len(job.tokens) == NEW
            _check_alone(gen, job)
        assert jobs[2].tokens == b.generate(jobs[2].ids, sampled).token_ids  # a seeded sampler draws the same
        # one prompt, two models: a grouped step's rows went each through its own model's top
        assert np.abs(jobs[0].tap.rows[1] - jobs[1].tap.rows[1]).max() > 1e-3
    finally:
        ea.close()
        eb.close()
    assert group.members == [] and group.pool == []


def test_a_model_alone_in_its_group_runs_its_own_steps(runs, exported, monkeypatch):
    """A group of one engine: its own decode call each step (no group call), the tokens it gets alone;
    prefix reuse and speculation still work beside another model."""
    from test_engine import Run, _check_alone, _wait

    from edgeft.runtime import SamplingParams

    a, b = _open(exported(runs[0], "none", 2)), _open(exported(runs[1], "none", 2))
    ea = _group_engine(a)
    try:
        calls, together = _count_runs(a.engine.trunk.session, monkeypatch), ea.group.steps
        greedy = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, speculate="off")
        job = Run(ea, a.encode(PROMPT), greedy).submit()
        _wait([job])
        assert ea.group.members == [ea] and ea.kv.rows is None  # its trunk caches in its own slots
        assert ea.group.steps == together and len(calls) == 1 + (NEW - 1) and ea.stats.steps == NEW - 1
        _check_alone(a, job)
        eb = _group_engine(b)
        try:
            head = b.encode(PROMPT + " thou art more lovely and more temperate")
            spec = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, speculate="on")
            first = Run(eb, head, greedy).submit()
            _wait([first])
            jobs = [Run(ea, a.encode(PROMPT), spec).submit(), Run(eb, head + b.encode(" rough winds"), spec).submit()]
            _wait(jobs)
            assert eb.stats.reused > 0  # the second prompt of b started from the first's cached keys
            for job, gen in zip([first, *jobs], (b, a, b)):
                _check_alone(gen, job)
                assert job.tokens == gen.generate(job.ids, job.params).token_ids
        finally:
            eb.close()
    finally:
        ea.close()


def test_models_join_and_leave_the_group_mid_sequence_and_lose_nothing(runs, exported):
    """``b`` joins while a sequence of ``a`` is at its 3rd token and leaves at its 20th: the pool is laid out
    afresh each time, and every sequence gets what it gets alone."""
    from test_engine import Run, _check_alone, _wait

    from edgeft.runtime import SamplingParams

    a, b = _open(exported(runs[0], "none", 2)), _open(exported(runs[1], "none", 2))
    ea = _group_engine(a, parallel=3)
    group, gates = ea.group, {n: (threading.Event(), threading.Event()) for n in (3, 4, 20)}

    def gate(n):
        def wait(run):
            gates[n][0].set()
            assert gates[n][1].wait(60)
        return wait

    long = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, speculate="off")
    job = Run(ea, a.encode(PROMPT), long, after={n: gate(n) for n in gates}).submit()
    try:
        assert gates[3][0].wait(60)  # a's sequence holds the group's thread at its 3rd token
        made: dict = {}
        joining = threading.Thread(target=lambda: made.setdefault("eb", _group_engine(b)), daemon=True)
        joining.start()
        _until(lambda: len(group._changes) == 1)  # b waits to join between two iterations
        gates[3][1].set()
        assert gates[4][0].wait(60)  # the next iteration: b has joined
        joining.join(60)
        eb = made["eb"]
        assert group.members == [ea, eb] and group.pool[0].shape[0] == 3  # one parallel of rows: the larger member's
        short = Run(eb, b.encode("Rough winds do shake"), SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                           ignore_eos=True)).submit()
        gates[4][1].set()
        _wait([short])  # done long before a's 20th token
        assert gates[20][0].wait(60)
        leaving = threading.Thread(target=eb.close, daemon=True)
        leaving.start()
        _until(lambda: len(group._changes) == 1)
        gates[20][1].set()
        leaving.join(60)
        _wait([job])
        assert group.members == [ea] and group.pool == [] and ea.kv.rows is None and group.steps > 0  # alone again
        assert len(job.tokens) == 30 and job.chunks[-1].finish_reason == "length"
        _check_alone(a, job)
        _check_alone(b, short)
    finally:
        for g in gates.values():
            g[1].set()
        ea.close()


def _trunk_row_bytes(gen, slot_len: int) -> int:
    """Bytes of one pool row: a key and a value per trunk layer, each ``[kv_heads, slot_len, head_dim]``."""
    d = gen.decoder
    return 2 * gen.engine.trunk.blocks * d.num_kv_heads * slot_len * d.head_dim * np.dtype(gen.engine.kv_dtype).itemsize


def test_more_requests_than_pool_rows_wait_in_order_and_each_gets_its_own_text(runs, exported, monkeypatch):
    """Three models of parallel 2 share a pool of 2 rows: seven requests submitted together (the group's thread
    held) are admitted oldest first, two at a time, the rest waiting in their engines' lines; each finishes
    with the tokens its model gives it alone."""
    from test_engine import Run, _check_alone, _wait

    from edgeft.runtime import SamplingParams

    gens = [_open(exported(runs[0], "none", 2)), _open(exported(runs[1], "none", 2)),
            _open(exported(runs[0], "none", 2))]  # a third model: the first's top, a session of its own
    engines = [_group_engine(g) for g in gens]
    group = engines[0].group
    try:
        assert group.members == engines and len(group.pool[0]) == 2
        seen: list[tuple[set, int]] = []  # per decode step: the sequences holding rows, how many wait
        real = group._decode_step

        def step(members):
            seen.append(({s for m in members for s in m._active.values()}, sum(len(m._waiting) for m in members)))
            real(members)

        monkeypatch.setattr(group, "_decode_step", step)
        greedy = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, speculate="off")
        sampled = SamplingParams(max_new_tokens=NEW, temperature=0.9, seed=11, ignore_eos=True, speculate="off")
        asks = [(2, PROMPT, greedy), (1, "Rough winds do shake", sampled), (0, "summer", greedy),
                (1, PROMPT, greedy), (0, PROMPT + " thou art", sampled), (2, "Rough winds", greedy),
                (0, "Shall I", greedy)]
        with _between_steps(group):  # all seven wait before the group's next iteration
            jobs = [Run(engines[i], gens[i].encode(text), p).submit() for i, text, p in asks]
        _wait(jobs)
        assert seen[0] == ({jobs[0].seq, jobs[1].seq}, 5)  # the two oldest took the two rows; five waited
        assert all(len(held) == 2 for held, waiting in seen if waiting)  # a freed row is taken at once
        assert max(len(held) for held, _ in seen) == 2 and seen[-1][1] == 0
        for job, (i, _, p) in zip(jobs, asks):
            assert len(job.tokens) == NEW and job.chunks[-1].finish_reason == "length"
            assert job.tokens == gens[i].generate(job.ids, p).token_ids
            _check_alone(gens[i], job)
        assert sorted(group.free) == [0, 1] and all(e.kv.rows == {} for e in engines)  # every row given back
    finally:
        for e in engines:
            e.close()


def test_the_pool_is_one_parallel_of_rows_and_a_member_holds_only_its_top(runs, exported):
    """The pool's buffers are 2 rows (parallel 2) however many members; a member's trunk caches are the pool's
    buffers, its own only its top's; one more member keeps the pool as it is; down to one member, it runs alone
    again in trunk slots of its own, and gets what it gets alone."""
    from test_engine import Run, _check_alone, _wait

    from edgeft.runtime import SamplingParams

    a, b = _open(exported(runs[0], "none", 2)), _open(exported(runs[1], "none", 2))
    ea = _group_engine(a)
    group, slot_len = ea.group, ea.slot_len
    row, entries = _trunk_row_bytes(a, slot_len), 2 * a.engine.trunk.blocks
    top = 2 * (a.decoder.num_layers - a.engine.trunk.blocks) * row // entries  # a top slot's bytes
    assert ea.kv.rows is None and sum(buf.nbytes for buf in ea.kv.cache[:entries]) == 2 * row  # alone: its own
    others = [_group_engine(b), _group_engine(_open(exported(runs[0], "none", 2)))]
    try:
        pool = group.pool
        assert sum(buf.nbytes for buf in pool) == 2 * row and len(pool) == entries
        for e in (ea, *others):
            assert all(own is shared for own, shared in zip(e.kv.cache[:entries], pool))  # no trunk slot of its own
            assert sum(buf.nbytes for buf in e.kv.cache[entries:]) == e.parallel * top
        more = _group_engine(b)
        assert group.pool is pool and len(group.members) == 4  # one more model: its top's caches only
        more.close()
        for e in others:
            e.close()
        assert group.members == [ea] and group.pool == [] and ea.kv.rows is None  # one member: alone again
        assert sum(buf.nbytes for buf in ea.kv.cache[:entries]) == 2 * row
        assert not any(own is shared for own in ea.kv.cache[:entries] for shared in pool)
        steps = group.steps
        greedy = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, speculate="off")
        job = Run(ea, a.encode(PROMPT), greedy).submit()
        _wait([job])
        assert group.steps == steps and ea.stats.steps == NEW - 1  # its own decode calls, none of the group's
        _check_alone(a, job)
    finally:
        for e in (ea, *others):
            e.close()


def _gated(engine, monkeypatch, at: int):
    """Hold the group's thread after ``engine``'s ``at``-th decode step until the returned event is set;
    the first returned event says it is held."""
    held, go, count = threading.Event(), threading.Event(), [0]
    real = engine._advance

    def advance(*args):
        real(*args)
        count[0] += 1
        if count[0] == at:
            held.set()
            assert go.wait(120)

    monkeypatch.setattr(engine, "_advance", advance)
    return held, go


def test_serve_loads_and_unloads_a_model_on_the_trunk_under_load(runs, exported, monkeypatch):
    """Through the server: ``b`` is loaded while a request of ``a`` is mid-sequence, and unloaded while
    requests of both run; every request gets what its model gives it alone, and none is lost."""
    from starlette.testclient import TestClient

    from edgeft.runtime import SamplingParams
    from edgeft.runtime.serve import ServeConfig, build_app

    fa, fb = exported(runs[0], "none", 2), exported(runs[1], "none", 2)
    alone = {m: _open(f) for m, f in (("a", fa), ("b", fb))}
    key = {"Authorization": "Bearer k"}
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    def complete(c, model):
        return c.post("/v1/completions", json={**body, "model": model}, headers=key)

    def want(model):
        return alone[model].generate(PROMPT, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)).text

    def in_thread(fn, *args):
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
        t.start()
        return t, out

    config = ServeConfig(artifacts=(fa,), names=("a",), threads=1, parallel=2, api_key="k", model_dirs=(fa.parent,))
    with TestClient(build_app(config), raise_server_exceptions=False) as c:
        _until(lambda: c.get("/health").status_code == 200)
        state = c.app.state.edgeft
        group = state.models["a"].engine.group
        assert group is not None and group.members == [state.models["a"].engine]
        held, go = _gated(state.models["a"].engine, monkeypatch, 3)
        first, got_first = in_thread(complete, c, "a")
        assert held.wait(120)  # a's request is mid-sequence, the group's thread held after its 3rd step
        loading, loaded = in_thread(lambda: c.post("/v1/models/load", json={"model": "b", "path": fb.name},
                                                   headers=key))
        _until(lambda: len(group._changes) == 1)  # b's engine waits to join between two iterations
        go.set()
        for t in (first, loading):
            t.join(120)
        assert loaded["r"].status_code == 200, loaded["r"].text
        assert got_first["r"].status_code == 200 and got_first["r"].json()["choices"][0]["text"] == want("a")
        eb = state.models["b"].engine
        assert group.members == [state.models["a"].engine, eb]
        assert len(group.pool[0]) == config.parallel  # one --parallel of trunk rows for both; b holds only its top's
        assert all(own is shared for own, shared in zip(eb.kv.cache[:eb.kv.entries], group.pool))
        both = [in_thread(complete, c, m) for m in ("a", "b", "a", "b")]
        for t, _ in both:
            t.join(120)
        for (_, out), m in zip(both, "abab"):
            assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["text"] == want(m)
        held, go = _gated(eb, monkeypatch, 2)
        running = [in_thread(complete, c, m) for m in ("b", "a")]
        assert held.wait(120)
        unloading, unloaded = in_thread(lambda: c.post("/v1/models/unload", json={"model": "b"}, headers=key))
        _until(lambda: "b" not in state.models)  # new requests no longer reach b; b's request still runs
        go.set()
        for t in (*[t for t, _ in running], unloading):
            t.join(120)
        assert unloaded["r"].status_code == 200
        for (_, out), m in zip(running, "ba"):
            assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["text"] == want(m)
        assert group.members == [state.models["a"].engine] and complete(c, "a").json()["choices"][0]["text"] == want("a")


def test_trunk_bytes_leave_out_the_builders_local_version_stamp():
    """The genai builder stamps producer_version with the git HEAD of whatever repository holds the venv:
    two exports of one base made at different commits must still write byte-identical trunks."""
    from onnx import TensorProto, helper

    from edgeft.export.trunk import _subgraph

    def built(stamp: str):
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
        return helper.make_model(graph, producer_name="onnxruntime-genai", producer_version=stamp)

    a, b = (_subgraph(built(s), [0], ["x"], ["y"], {}, "trunk") for s in ("0.18.0+3ceb79c", "0.18.0+e1b1a34"))
    assert a.SerializeToString() == b.SerializeToString() and a.producer_version == "0.18.0"
