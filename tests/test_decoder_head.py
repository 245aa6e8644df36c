"""One base, many tuned decoders, one head: a split decoder whose LM head is the base's holds it as a third file.

The tiny llama ties its head to its embeddings, and tuning keeps a tied head frozen, so a split
export cuts the top again where the head begins: the three-part artifact (trunk, top, head) must
give what the unsplit one and the two-part one (the head left in the top) give, token for token;
two runs from one base carry byte-identical heads that load as one onnxruntime session, and one
head call over both models' stacked rows gives each model's logits. A changed head byte is
refused for every model that carries it, a manifest from before heads still loads, and the
manifest refuses a head section where it does not belong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_decoder_trunk import PROMPT, exported, runs  # noqa: F401 - fixtures, used by name
from test_integrity import one_line_refusal, run

from edgeft import artifact
from edgeft.errors import EdgeftError


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _open(folder: Path):
    from edgeft.runtime import Generator

    return Generator.open(folder, threads=1)


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


@pytest.fixture(scope="module")
def two_part(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny llama split at 2 with the head left in the top (the cut of ``edgeft.export.head`` turned off)."""
    from edgeft.export import ExportConfig, export

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("edgeft.export.head.detach", lambda model, cut, log: (cut, None))
        return Path(export(ExportConfig(source=str(tiny_llama_dir), out=tmp_path_factory.mktemp("two-part") / "a",
                                        quantize="none", trunk_blocks=2, allow_degraded=True, gate_texts=8,
                                        gate_new_tokens=8, threads=1), log=None))


def _steps(gen, ids: list[int], tokens: list[int]) -> np.ndarray:
    state = gen.engine.start(len(ids) + len(tokens) + 1)
    return np.stack([state.prefill(ids)] + [state.step(t) for t in tokens])


def test_three_parts_equal_the_unsplit_and_the_two_part_artifact(tiny_llama_dir, exported, two_part):  # noqa: F811
    """fp32: the trunk, top and head give the unsplit graph's logits and the two-part split's (1e-5), prompt and
    cache steps, and their greedy and sampled tokens; the batching engine too."""
    from edgeft.runtime import SamplingParams

    whole, three = exported(tiny_llama_dir, "none"), exported(tiny_llama_dir, "none", 2)
    m, head = _manifest(three), _manifest(three)["head"]
    assert m["format_version"] == 3 and head["file"] == f"head-{head['sha256'][:16]}.onnx"
    assert m["files"][head["file"]]["sha256"] == head["sha256"] and not (three / (head["file"] + ".data")).exists()
    assert _manifest(two_part)["head"] is None and _manifest(two_part)["format_version"] == 2
    g = _graph(three / head["file"])  # self-contained: the head's input -> logits, the head's matrix inside
    assert [i.name for i in g.input] == [head["input"]] and [o.name for o in g.output] == ["logits"]
    assert all(not t.external_data for t in g.initializer) and any(t.name.startswith("lm_head.") for t in g.initializer)
    top = _graph(three / "top.onnx")
    assert head["input"] in [o.name for o in top.output] and "logits" not in [o.name for o in top.output]
    assert not any(t.name.startswith("lm_head.") for t in top.initializer)

    gens = [_open(f) for f in (whole, two_part, three)]
    assert [len(g.engine.parts) for g in gens] == [1, 2, 3] and gens[2].engine.head.sha256 == head["sha256"]
    ids = gens[0].encode(PROMPT)
    fed = [3, 17, 42, 5, 99, 8]
    for other in gens[:2]:
        np.testing.assert_allclose(gens[2].score(ids), other.score(ids), atol=1e-5, rtol=0)
        np.testing.assert_allclose(_steps(gens[2], ids, fed), _steps(other, ids, fed), atol=1e-5, rtol=0)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    for params in (greedy, sampled):
        assert len({tuple(g.generate(ids, params).token_ids) for g in gens}) == 1
    prompts = [PROMPT, "Rough winds do shake", "summer"]
    batch = [[c.token_ids for c in g.generate_batch(prompts, greedy, parallel=2)] for g in (gens[0], gens[2])]
    assert batch[0] == batch[1]


def _top_hidden(gen, ids: list[int]) -> np.ndarray:
    """The head's input for the last prompt position, made by the trunk, then the top alone through
    ``KVDecoder.top_hidden`` (as ``edgeft.runtime.trunk_group`` binds a top call)."""
    from edgeft.runtime.trunk_group import _bind_cache

    eng, d = gen.engine, gen.engine.decoder
    trunk, top = eng.parts[0], eng.parts[1]
    cache = [np.zeros((1, d.num_kv_heads, 64, d.head_dim), dtype=eng.kv_dtype) for _ in range(2 * d.num_layers)]
    feeds = {"input_ids": np.array([ids], dtype=eng.ids_dtype),
             "attention_mask": np.ones((1, len(ids)), dtype=eng.mask_dtype)}
    io = trunk.session.io_binding()
    for name in set(feeds) & trunk.inputs:
        io.bind_cpu_input(name, feeds[name])
    _bind_cache(io, trunk.layers, cache[:2 * len(trunk.layers)], 1)
    for name in trunk.sends:
        io.bind_output(name, "cpu")
    trunk.session.run_with_iobinding(io)
    sends = dict(zip(trunk.sends, io.get_outputs()[-len(trunk.sends):]))
    io = top.session.io_binding()
    for name, value in sends.items():
        io.bind_ortvalue_input(name, value)
    for name in set(feeds) & top.inputs:
        io.bind_cpu_input(name, feeds[name])
    eng.bind_keep(io, last_only=True)
    _bind_cache(io, top.layers, cache[2 * len(trunk.layers):], 1)
    return eng.top_hidden(io).numpy()


def test_two_runs_share_one_head_session_and_one_call_serves_both(runs, exported):  # noqa: F811
    """Two runs from one base: byte-identical heads, one onnxruntime session; their tops' outputs stacked go
    through one head call, each row giving its own model's logits."""
    from edgeft.runtime import trunks

    first, second = exported(runs[0], "none", 2), exported(runs[1], "none", 2)
    h1, h2 = _manifest(first)["head"], _manifest(second)["head"]
    assert h1 == h2 and (first / h1["file"]).read_bytes() == (second / h2["file"]).read_bytes()
    assert _manifest(first)["files"]["top.onnx"]["sha256"] != _manifest(second)["files"]["top.onnx"]["sha256"]
    a, b = _open(first), _open(second)
    assert a.engine.head is b.engine.head and a.engine.parts[2].session is b.engine.parts[2].session
    assert trunks.loaded_heads()[h1["sha256"]] is a.engine.head and h1["sha256"] not in trunks.loaded()
    assert a.engine.session is not b.engine.session
    assert a.tokenizer is b.tokenizer  # one tokenizer file, by its sha256: loaded once
    ids_a, ids_b = a.encode(PROMPT), b.encode("Rough winds do shake the darling buds")
    hidden = np.concatenate([_top_hidden(a, ids_a), _top_hidden(b, ids_b)])
    logits = a.engine.head.run(hidden)
    assert logits.shape == (2, 1, a.decoder.vocab_size)
    np.testing.assert_allclose(logits[0, 0], a.score(ids_a)[-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1, 0], b.score(ids_b)[-1], atol=1e-5, rtol=0)
    assert np.abs(logits[0, 0] - b.score(ids_a)[-1]).max() > 1e-3  # each row went through its own model's top


def test_changed_head_byte_is_refused_for_every_model(runs, exported, tmp_path):  # noqa: F811
    """A head with one byte changed is refused (open and verify) in each model that carries it, even while a
    session for its digest is loaded."""
    loaded = _open(exported(runs[0], "none", 2))  # holds the head's session in this process
    for i, good in enumerate((exported(runs[0], "none", 2), exported(runs[1], "none", 2))):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        name = _manifest(bad)["head"]["file"]
        raw = bytearray((bad / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (bad / name).write_bytes(bytes(raw))
        with pytest.raises(EdgeftError, match="head-"):
            _open(bad)
        one_line_refusal(run("verify", bad), "head-")
    assert loaded.engine.head is not None


def test_a_manifest_from_before_heads_still_loads(two_part, tmp_path):
    """A split manifest written before the head section existed (no "head" key, format 2) verifies and runs."""
    old = Path(shutil.copytree(two_part, tmp_path / "old"))
    d = json.loads((old / "manifest.json").read_text())
    del d["head"]
    (old / "manifest.json").write_bytes(artifact.manifest_file_bytes(artifact.sealed(d)))
    assert artifact.verify(old).head is None
    a, b = _open(old), _open(two_part)
    assert a.engine.head is None and len(a.engine.parts) == 2
    ids = a.encode(PROMPT)
    np.testing.assert_allclose(a.score(ids), b.score(ids), atol=0, rtol=0)


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(format_version=2), "head section belongs"),
    (lambda d: d.update(trunk=None), "head section belongs"),
    (lambda d: d["head"].update(sha256="0" * 64), "not among its files"),
    (lambda d: d["head"].update(file="head-elsewhere.onnx"), "not among its files"),
], ids=["format-2", "no-trunk", "other-digest", "unlisted-file"])
def test_a_head_section_where_it_does_not_belong_is_refused(tiny_llama_dir, exported, change, needle):  # noqa: F811
    d = _manifest(exported(tiny_llama_dir, "none", 2))
    change(d)
    with pytest.raises(EdgeftError, match=needle):
        artifact.parse_manifest("x", artifact.manifest_file_bytes(artifact.sealed(d)))


def test_verify_shows_the_head(tiny_llama_dir, exported):  # noqa: F811
    folder = exported(tiny_llama_dir, "none", 2)
    head = _manifest(folder)["head"]
    res = run("verify", folder)
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[1]
    assert f"head {head['sha256']} ({head['file']}, " in line and "top top.onnx" in line
