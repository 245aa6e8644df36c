"""The native-peers plumbing: llama.cpp build keys and flags, the tools' output parsers, the one
perplexity count every system shares, CPU instruction sets, and the peers' goals.

Nothing here builds llama.cpp or installs a peer; these check the arithmetic and parsing on
small inputs (the real tools' output formats, copied from their sources).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import llamacpp  # noqa: E402
from benchmarks.headline import goals, peer_goals, qualifying  # noqa: E402
from benchmarks.peer_workers import chunk_nll, parse_llama_bench, parse_llama_perplexity  # noqa: E402
from benchmarks.schema import Environment, Measurement, SuiteResult  # noqa: E402
from edgeft.bench import Stat, bandwidth_share, cpu_isa, isa_summary  # noqa: E402

AVX2 = ["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "hypervisor"]
AVX512 = AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni"]


def test_cpu_isa_keeps_instruction_sets_only_and_summary_names_the_widest():
    assert cpu_isa(AVX2) == sorted(["sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"])
    assert "hypervisor" not in cpu_isa(AVX512) and "fpu" not in cpu_isa(AVX512)
    assert isa_summary(cpu_isa(AVX2)) == "AVX2"
    assert isa_summary(cpu_isa(AVX512)) == "AVX-512 (VNNI, BF16)"
    assert isa_summary(cpu_isa(AVX512 + ["amx_tile"])) == "AVX-512 (VNNI, BF16, AMX)"
    assert isa_summary([]) == "unknown"


def test_cache_key_separates_cpus_versions_and_flavours_but_not_flag_order():
    k = llamacpp.cache_key(AVX2)
    assert k == llamacpp.cache_key(list(reversed(AVX2)))
    assert k == llamacpp.cache_key(AVX2 + ["hypervisor", "ht"])  # flags that pick no kernel
    assert k != llamacpp.cache_key(AVX512)
    assert k != llamacpp.cache_key(AVX2, version="0.0.1")
    assert k != llamacpp.cache_key(AVX2, flavour="fallback")
    assert len(k) == 12


def test_build_flags_native_and_the_documented_fallbacks():
    native = llamacpp.build_flags("native", AVX512)
    assert "-DGGML_NATIVE=ON" in native and "-DCMAKE_BUILD_TYPE=Release" in native
    fb = llamacpp.build_flags("fallback", AVX512)
    assert "-DGGML_NATIVE=OFF" in fb and {"-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"} <= set(fb)
    assert "-DGGML_AMX_TILE=OFF" in fb and "-DGGML_AVX512=ON" in fb and "-DGGML_AVX512_VNNI=ON" in fb
    assert "-DGGML_AVX512=ON" not in llamacpp.build_flags("fallback", AVX2)  # only what the CPU reports
    assert "-DGGML_AVX512=ON" not in llamacpp.build_flags("avx2", AVX512)
    with pytest.raises(ValueError):
        llamacpp.build_flags("fastest", AVX2)


def test_amx_is_turned_off_before_native_is_given_up(monkeypatch, tmp_path):
    """A native build that dies (AMX's SIGILL) is followed by native-noamx reconfigured in the native
    tree, and the result says which build runs and why native was passed over."""
    amx = AVX512 + ["amx_tile", "amx_int8"]
    assert llamacpp.flavours_to_try(AVX512) == ("native", "fallback")
    assert llamacpp.flavours_to_try(amx) == ("native", "native-noamx", "fallback")
    noamx = llamacpp.build_flags("native-noamx", amx)
    assert "-DGGML_NATIVE=ON" in noamx and "-DGGML_AMX_INT8=OFF" in noamx and "-DGGML_AMX_TILE=OFF" in noamx

    monkeypatch.setattr(llamacpp, "CACHE", tmp_path)
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: amx)
    monkeypatch.setattr(llamacpp, "source_dir", lambda: tmp_path / "src")
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: "/usr/bin/" + name)
    configured: list[tuple[str, list[str]]] = []

    def run(cmd, log, what, cwd=None):
        if what == "cmake configure":
            tree = Path(cmd[cmd.index("-B") + 1])
            configured.append((str(tree), [c for c in cmd if c.startswith("-DGGML")]))
            (tree / "bin").mkdir(parents=True, exist_ok=True)
            for t in llamacpp.TOOLS:
                (tree / "bin" / t).write_text("native" if "-DGGML_AMX_INT8=OFF" not in cmd else "noamx")

    def smoke(folder, gguf):
        if (folder / "llama-bench").read_text() == "native":
            return False, "llama-bench died with signal 4 (SIGILL=4: an instruction this CPU cannot run)"
        return True, "llama-bench -p 8 -n 4: exit 0"

    monkeypatch.setattr(llamacpp, "_run", run)
    monkeypatch.setattr(llamacpp, "smoke_test", smoke)
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "v1", "stderr": ""})())
    folder = llamacpp.ensure_binaries(gguf=None)
    assert folder == llamacpp.bin_dir("native-noamx")
    assert len(configured) == 2 and configured[0][0] == configured[1][0]  # the native tree, reconfigured
    assert "-DGGML_AMX_INT8=OFF" in configured[1][1]
    note = llamacpp.build_note(folder)
    assert "'native-noamx'" in note and "passed over: native" in note and "SIGILL" in note
    assert llamacpp.current() == folder


def test_seed_copies_the_tools_and_refuses_an_incomplete_build(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "CACHE", tmp_path / "cache")
    built = tmp_path / "tree" / "build" / "bin"
    built.mkdir(parents=True)
    for t in llamacpp.TOOLS[:-1]:
        (built / t).write_text("#!/bin/sh\nexit 0\n")
        (built / t).chmod(0o755)
    with pytest.raises(llamacpp.BuildFailed, match="llama-perplexity"):
        llamacpp.seed(tmp_path / "tree")
    (built / "llama-perplexity").write_text("#!/bin/sh\nexit 0\n")
    (built / "llama-perplexity").chmod(0o755)
    out = llamacpp.seed(tmp_path / "tree")  # smoke test: llama-bench --help (no model given) exits 0
    assert sorted(p.name for p in out.iterdir()) == sorted(llamacpp.TOOLS)
    assert llamacpp.cached() == out
    info = (out.parent / "build.json").read_text()
    assert "copied from" in info and "GGML_NATIVE=ON" in info


def test_a_build_that_dies_of_sigill_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "CACHE", tmp_path / "cache")
    built = tmp_path / "bin"
    built.mkdir()
    for t in llamacpp.TOOLS:
        (built / t).write_text("#!/bin/sh\nkill -ILL $$\n")
        (built / t).chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(llamacpp.BuildFailed, match="signal 4"):
        llamacpp.seed(built, model)
    assert llamacpp.cached() is None


def test_llama_bench_rows_become_decode_and_prefill_stats():
    rows = [{"n_prompt": 512, "n_gen": 0, "samples_ts": [900.0, 1000.0, 1100.0], "n_threads": 2,
             "build_commit": "abc", "build_number": 1, "cpu_info": "EPYC"},
            {"n_prompt": 32, "n_gen": 0, "samples_ts": [640.0, 600.0], "n_threads": 2},
            {"n_prompt": 0, "n_gen": 128, "samples_ts": [60.0, 70.0, 65.0], "n_threads": 2}]
    out = parse_llama_bench(rows)
    assert out["decode_tps"]["median"] == 65.0 and out["new_tokens"] == 128
    assert out["prefill_tps"]["512"]["median"] == 1000.0 and out["prefill_tps"]["32"]["n"] == 2
    assert out["n_threads"] == 2


def test_llama_perplexity_output_is_parsed():
    text = ("perplexity: tokenizing the input ..\nperplexity: calculating perplexity over 12 chunks, n_ctx=256, "
            "batch_size=256, n_seq=1\n[1]10.1,[2]11.2\nFinal estimate: PPL = 11.4321 +/- 0.51234\n")
    out = parse_llama_perplexity(text)
    assert out["perplexity"] == pytest.approx(11.4321) and out["chunks"] == 12 and out["tokens"] == 12 * 127
    with pytest.raises(RuntimeError):
        parse_llama_perplexity("error: failed to load model")


def test_chunk_nll_scores_the_second_half_of_whole_chunks_from_logits_or_logprobs():
    rng = np.random.default_rng(0)
    vocab, n_ctx = 11, 8
    ids = list(rng.integers(0, vocab, size=3 * n_ctx + 5))  # 3 whole chunks; the tail is dropped
    table = rng.normal(size=(vocab, vocab))

    def logits(chunk):  # a bigram model: the next token's logits depend on this token
        return table[np.asarray(chunk)]

    def logprobs(chunk):
        x = logits(chunk)
        lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        return [lp[j, chunk[j + 1]] for j in range(len(chunk) - 1)]

    total, count = chunk_nll(ids, n_ctx, logits)
    assert count == 3 * (n_ctx - 1 - n_ctx // 2)
    expect = 0.0
    for c in range(3):
        ch = ids[c * n_ctx:(c + 1) * n_ctx]
        for j in range(n_ctx // 2, n_ctx - 1):
            x = table[ch[j]]
            expect -= x[ch[j + 1]] - math.log(np.exp(x).sum())
    assert total == pytest.approx(expect)
    assert chunk_nll(ids, n_ctx, logprobs) == pytest.approx((total, count))
    assert chunk_nll(ids, n_ctx, logits, chunks=2)[1] == 2 * (n_ctx - 1 - n_ctx // 2)
    # a BOS replaces each chunk's first id (scored positions start at n_ctx/2, so a bigram model can't tell)
    seen = []
    chunk_nll(ids, n_ctx, lambda ch: seen.append(ch[0]) or logits(ch), bos=7)
    assert seen == [7, 7, 7]


def test_bandwidth_share_is_decode_over_the_limit():
    r = bandwidth_share(10.0, 2**20, threads=1, mib=8, repeats=1)
    assert r["read_gbps"] > 0
    assert r["limit_tps"] == pytest.approx(r["read_gbps"] * 1e9 / 2**20)
    assert r["bandwidth_share"] == pytest.approx(10.0 / r["limit_tps"])


def _peers_result() -> SuiteResult:
    env = Environment(date="d", host="h", cpu="c", cores=2, threads=2, memory_gib=1, python="3", versions={},
                      isa=cpu_isa(AVX512))
    res = SuiteResult(env)

    def add(system, metric, v, **p):
        res.add(Measurement("peers", system, metric, Stat(v, v, v, v, v, 3), "x", p))

    for system, dec, pre, ppl in [("edgeft int8", 80, 900, 0.5), ("edgeft int4", 120, 800, 9.0),
                                  ("llama.cpp Q4_1", 70, 1000, 0.0), ("llama.cpp Q8_0", 60, 1200, 0.3),
                                  ("OpenVINO GenAI int4", 150, 2000, 12.0)]:
        add(system, "decode_tps", dec)
        add(system, "prefill_tps", pre, prompt_tokens=512)
        add(system, "ppl_vs_fp32", ppl)
    add("edgeft int8, EDGEFT_SPIN=1", "decode_tps", 91)  # a lever row: the quality of "edgeft int8"
    add("edgeft int8", "bandwidth_share", 0.5)
    add("edgeft int8, EDGEFT_SPIN=1", "bandwidth_share", 0.57)
    add("edgeft int8 (classifier)", "throughput", 600, batch=32)
    add("OpenVINO int8 (classifier)", "throughput", 400, batch=32)
    return res


def test_peer_goals_compare_only_configurations_within_the_quality_budget():
    res = _peers_result()
    assert qualifying(res, True) == [("edgeft int8, EDGEFT_SPIN=1", 91), ("edgeft int8", 80)]
    assert qualifying(res, False) == [("llama.cpp Q4_1", 70), ("llama.cpp Q8_0", 60)]  # OpenVINO int4: +12%
    g = {x.name.split(" (")[0]: x for x in peer_goals(res)}
    speed = g["peers: fastest passing edgeft decode vs fastest qualifying peer"]
    assert "(edgeft int8, EDGEFT_SPIN=1 / llama.cpp Q4_1)" in peer_goals(res)[0].name
    assert speed.value == pytest.approx(91 / 70) and speed.met is True
    assert g["peers: edgeft int8 decode share of the bandwidth limit"].verdict == "missed by 23%"
    assert g["peers: fastest passing edgeft's share of its own limit"].value == pytest.approx(0.57)
    pre = g["peers: prefill at 512, fastest passing edgeft vs fastest qualifying peer"]
    assert pre.value == pytest.approx(900 / 1200) and pre.met is False
    assert g["peers: classification int8 at batch 32 vs fastest peer"].value == pytest.approx(1.5)
    assert peer_goals(SuiteResult(res.env)) == [] and len(goals(res)) > len(peer_goals(res))


def test_edgeft_bench_report_shows_the_cpu_and_the_share_of_the_limit():
    from edgeft.bench import format_report

    d = Stat(50.0, 48.0, 52.0, 45.0, 55.0, 5).to_dict()
    r = {"artifact": "a", "task": "causal-lm", "quantization": "int8", "threads": 2, "load_s": 0.5, "repeats": 5,
         "cpu": "AMD EPYC", "isa_summary": "AVX-512 (VNNI, BF16)", "peak_rss_mib": 300.0,
         "generation": {"decode_tps": d, "ttft_s": Stat(0.1, 0.1, 0.1, 0.1, 0.1, 5).to_dict(), "prefill_tps": {},
                        "new_tokens": 64, "prompt_tokens": 32},
         "weight_mib_per_token": 146.0, "read_gbps": 30.6, "limit_tps": 200.0, "bandwidth_share": 0.25,
         "spin": False, "spin_reason": "0.4 of 2 usable cores idle, 2 needed (2 threads)"}
    text = format_report(r)
    assert "AMD EPYC (AVX-512 (VNNI, BF16))" in text
    assert "threads  sleep when idle (0.4 of 2 usable cores idle, 2 needed (2 threads))" in text
    assert "read bandwidth 30.6 GB/s -> limit 200 tok/s; decode reaches 0.25 of it" in text
