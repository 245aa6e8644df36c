"""The scale_speed case's pure parts: which shapes run, how llama-bench rows are read, the ratios."""

import pytest

from benchmarks import cases, scale_speed
from benchmarks.prepare import Unavailable


def test_shapes_come_from_the_argument_or_the_environment_and_are_checked(monkeypatch):
    monkeypatch.delenv("BENCH_SCALE_SHAPES", raising=False)
    assert scale_speed.shapes() == ["qwen2.5-0.5b", "llama-3.2-1b"]  # the lead's default: no 3B
    monkeypatch.setenv("BENCH_SCALE_SHAPES", "llama-3.2-1b, llama-3.2-3b,")
    assert scale_speed.shapes() == ["llama-3.2-1b", "llama-3.2-3b"]
    assert scale_speed.shapes("tiny-llama") == ["tiny-llama"]
    with pytest.raises(Unavailable, match="unknown shape llama-3-8b"):
        scale_speed.shapes("llama-3-8b")
    with pytest.raises(Unavailable, match=r"\(none given\)"):
        scale_speed.shapes(" , ")


def test_the_smoke_shape_is_a_consistent_llama_and_the_systems_share_grids():
    tiny = scale_speed.TINY["tiny-llama"]
    assert tiny["num_attention_heads"] * tiny["head_dim"] == tiny["hidden_size"] == 256
    assert tiny["num_hidden_layers"] == 2 and tiny["max_position_embeddings"] >= scale_speed.DEPTH + 64
    assert scale_speed.CONTEXT >= scale_speed.DEPTH * 2
    for args in scale_speed.EDGEFT_SYSTEMS.values():  # weight-only blocks of 32, as Q8_0 / Q4_0 have
        if "dynamic" in args:  # the integer-GEMM path: per-channel int8, compared with edgeft int8 too
            assert args[args.index("-q") + 1] == "int8"
            continue
        assert args[args.index("--block-size") + 1] == "32"
    peers = {p for _, ps in scale_speed.PAIRS for p in ps}
    assert peers == {f"llama.cpp {t}" for t in scale_speed.GGUF_TYPES} | set(scale_speed.LLAMA_VARIANTS)
    assert {t for t, _ in scale_speed.LLAMA_VARIANTS.values()} <= set(scale_speed.GGUF_TYPES)


def test_systems_are_all_but_the_opt_in_ones_unless_named(monkeypatch):
    every = [*scale_speed.EDGEFT_SYSTEMS, *(f"llama.cpp {t}" for t in scale_speed.GGUF_TYPES),
             *scale_speed.LLAMA_VARIANTS]
    monkeypatch.delenv("BENCH_SCALE_SYSTEMS", raising=False)
    assert [s for s in every if scale_speed.wanted(s)] == [s for s in every if s not in scale_speed.OPT_IN]
    assert "edgeft int8 kv8" in scale_speed.OPT_IN and "llama.cpp Q8_0 kv8" in scale_speed.OPT_IN
    monkeypatch.setenv("BENCH_SCALE_SYSTEMS", "edgeft int8, llama.cpp Q8_0 kv8,")
    assert [s for s in every if scale_speed.wanted(s)] == ["edgeft int8", "llama.cpp Q8_0 kv8"]


def test_llama_bench_rows_give_decode_at_both_depths_and_prefill():
    rows = [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "samples_ts": [90.0, 100.0, 110.0]},
            {"n_prompt": 0, "n_gen": 64, "n_depth": 0, "samples_ts": [20.0, 21.0, 19.0]},
            {"n_prompt": 512, "n_gen": 0, "n_depth": 4096, "samples_ts": [50.0]},  # prefill at depth: not used
            {"n_prompt": 0, "n_gen": 64, "n_depth": 4096, "samples_ts": [12.0, 14.0]}]
    assert scale_speed.llama_rows(rows) == {"prefill_tps": 100.0, "decode_tps": 20.0, "decode_deep_tps": 13.0}


def test_ratios_are_against_the_faster_peer_at_the_same_bits_and_skip_missing_sides():
    got = scale_speed.ratios({"edgeft int8": 16.0, "llama.cpp Q8_0": 12.8, "edgeft int4": 24.0,
                              "llama.cpp Q4_0": 16.0, "llama.cpp Q4_K_M": 20.0})
    assert got["edgeft int8"] == pytest.approx((1.25, "llama.cpp Q8_0"))
    assert got["edgeft int4"] == pytest.approx((1.2, "llama.cpp Q4_K_M"))
    assert scale_speed.ratios({"edgeft int8": 16.0, "edgeft int4": 24.0, "llama.cpp Q4_0": 0.0}) == {}
    assert scale_speed.ratios({"edgeft int4": 24.0, "llama.cpp Q4_0": 12.0}) == {"edgeft int4": (2.0, "llama.cpp Q4_0")}


def test_the_case_is_registered_by_name_and_not_in_the_default_run():
    assert "scale_speed" in cases.CASES and "scale_speed" not in cases.DEFAULT_CASES
    assert scale_speed.CASE == "scale_speed" and callable(scale_speed.case) and not hasattr(scale_speed, "main")


def test_no_llama_cpp_system_wanted_converts_nothing(monkeypatch, tmp_path):
    """Only edgeft systems named: no fp32 GGUF is converted (it would be left behind, as large as the model)."""
    monkeypatch.setenv("BENCH_SCALE_SYSTEMS", "edgeft int4-sym")
    made: list = []
    facts = {"seconds": 1.0, "bytes": 1, "export_peak_rss_mib": 1.0}
    monkeypatch.setattr(scale_speed, "_made", lambda *a, **k: made.append(a) or facts)
    monkeypatch.setattr(scale_speed, "_export_rows", lambda *a, **k: None)
    assert scale_speed._gguf_systems(None, "tiny-llama", tmp_path, tmp_path, tmp_path, tmp_path) == []
    assert made == []
    monkeypatch.setenv("BENCH_SCALE_SYSTEMS", "edgeft int4-sym,llama.cpp Q4_0")
    scale_speed._gguf_systems(None, "tiny-llama", tmp_path, tmp_path, tmp_path, tmp_path)
    assert [a[2] for a in made][:1] == ["llama.cpp F32"]
