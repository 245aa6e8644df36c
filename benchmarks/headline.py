"""Which comparisons are the headline, and the goals from the benchmarks issue.

System names used across the suite are defined here, so the cases that measure and the
writers that report agree. Goals are computed and reported (met, or missed by how much);
nothing here asserts them.
"""

from __future__ import annotations

from benchmarks.schema import Goal, Ratio, SuiteResult

EDGEFT = {q: f"edgeft {q}" for q in ("fp32", "int8", "int4", "mixed")}
HF = "transformers fp32"
GENAI = "ort-genai int8"
LLAMA = {q: f"llama.cpp {q}" for q in ("F16", "Q8_0", "Q4_1")}
LLAMA_PY = "llama-cpp-python Q8_0 (pip build)"  # the handicapped build, an extra row only
TORCH_CLS = "pytorch fp32"
CLS = {q: f"edgeft {q}" for q in ("fp32", "int8")}

# (metric, numerator, denominator, params): the ratios that open the report.
HEADLINE: list[tuple[str, str, str, dict]] = [
    ("decode_tps", EDGEFT["int8"], HF, {}),
    ("decode_tps", EDGEFT["int8"], GENAI, {}),
    ("decode_tps", EDGEFT["int8"], LLAMA["Q8_0"], {}),
    ("decode_tps", EDGEFT["int4"], LLAMA["Q4_1"], {}),
    ("decode_tps", EDGEFT["mixed"], LLAMA["Q4_1"], {}),
    ("prefill_tps", EDGEFT["int8"], LLAMA["Q8_0"], {"prompt_tokens": 512}),
    ("prefill_tps", EDGEFT["int8"], HF, {"prompt_tokens": 512}),
    ("ttft_ms", EDGEFT["int8"], LLAMA["Q8_0"], {}),
    ("throughput", CLS["int8"], TORCH_CLS, {"batch": 1}),
    ("throughput", CLS["int8"], TORCH_CLS, {"batch": 32}),
    ("train_mib", "edgeft top-N over int8", "full fine-tuning", {}),
    ("train_mib", "edgeft top-N over int8 (SmolLM2)", "full fine-tuning (SmolLM2)", {}),
]


def headline_ratios(res: SuiteResult) -> list[Ratio]:
    out = []
    for metric, num, den, params in HEADLINE:
        r = res.ratio(metric, num, den, params)
        if r is not None:
            out.append(r)
    return out


def _ratio_value(res: SuiteResult, metric: str, num: str, den: str, params: dict | None = None) -> float | None:
    r = res.ratio(metric, num, den, params)
    return r.value if r else None


def _diff(res: SuiteResult, metric: str, a: str, b: str, params: dict | None = None) -> float | None:
    x, y = res.find(metric, a, params), res.find(metric, b, params)
    return x.median - y.median if x and y else None


def goals(res: SuiteResult) -> list[Goal]:
    """The issue's goals, evaluated on one suite result."""
    share = res.find("bandwidth_share", EDGEFT["int8"])
    q4 = [v for v in (_ratio_value(res, "decode_tps", EDGEFT[q], LLAMA["Q4_1"]) for q in ("int4", "mixed")
                      if gate_passed(res, EDGEFT[q])) if v is not None]
    return [
        Goal("int8 decode vs llama.cpp Q8_0", _ratio_value(res, "decode_tps", EDGEFT["int8"], LLAMA["Q8_0"]), 1.3,
             detail="ratio of decode tokens/s"),
        Goal("int8 decode share of the bandwidth limit", share.median if share else None, 0.60,
             detail="measured tokens/s / (bandwidth / weight bytes per token)"),
        Goal("best of int4/mixed decode vs llama.cpp Q4", max(q4) if q4 else None, 1.3,
             detail="ratio of decode tokens/s, among those whose quality gate passed"),
        Goal("prefill at 512 vs llama.cpp Q8_0", _ratio_value(res, "prefill_tps", EDGEFT["int8"], LLAMA["Q8_0"],
                                                              {"prompt_tokens": 512}), 1.0),
        Goal("int8 decode vs transformers fp32 generate", _ratio_value(res, "decode_tps", EDGEFT["int8"], HF), 10.0),
        Goal("int8 decode vs onnxruntime-genai's loop", _ratio_value(res, "decode_tps", EDGEFT["int8"], GENAI), 1.5),
        Goal("classification int8 vs PyTorch at batch 32",
             _ratio_value(res, "throughput", CLS["int8"], TORCH_CLS, {"batch": 32}), 3.0),
        Goal("classification int8 accuracy lost (points)",
             _neg(_diff(res, "accuracy", CLS["int8"], TORCH_CLS, {"dataset": "sst2-dev"})), 0.5, "<="),
        Goal("8-bit-frozen tuning peak memory vs full fine-tuning",
             _ratio_value(res, "train_mib", "edgeft top-N over int8", "full fine-tuning"), 0.40, "<=",
             detail="weights + memory growth while training (gradients, optimizer, activations)"),
        Goal("8-bit-frozen tuning peak memory vs full fine-tuning, SmolLM2-135M",
             _ratio_value(res, "train_mib", "edgeft top-N over int8 (SmolLM2)", "full fine-tuning (SmolLM2)"), 0.40,
             "<=", detail="as above, a model ten times larger (few steps: memory, not accuracy)"),
        Goal("8-bit-frozen tuning accuracy below full fine-tuning (points)",
             _neg(_diff(res, "accuracy", "edgeft top-N over int8", "full fine-tuning")), 1.0, "<="),
        *peer_goals(res),
        *case_goals(res),
    ]


PEERS = "peers"  # the case of native peers (benchmarks.peer_case)
PPL_BUDGET = 5.0  # percent over the fp32 reference: the export gate's default budget


def quality_of(res: SuiteResult, system: str) -> float | None:
    """Perplexity increase (%) over fp32 of a peers-case row; a lever row ("edgeft int8, X") has its base's."""
    m = res.find("ppl_vs_fp32", system) or res.find("ppl_vs_fp32", system.split(",")[0])
    return m.median if m else None


def qualifying(res: SuiteResult, edgeft: bool) -> list[tuple[str, float]]:
    """(system, decode tok/s) of the peers case's generation rows within the perplexity budget."""
    out = []
    for m in res.measurements:
        if m.case == PEERS and m.metric == "decode_tps" and m.system.startswith("edgeft") == edgeft:
            q = quality_of(res, m.system)
            if q is not None and q <= PPL_BUDGET:
                out.append((m.system, m.median))
    return sorted(out, key=lambda x: -x[1])


def peer_goals(res: SuiteResult) -> list[Goal]:
    """The native-peers issue's goals, from the peers case (none when it did not run)."""
    if not any(m.case == PEERS for m in res.measurements):
        return []
    mine, theirs = qualifying(res, True), qualifying(res, False)
    best = mine[0] if mine else None
    peer = theirs[0] if theirs else None
    out = [Goal(f"peers: fastest passing edgeft decode vs fastest qualifying peer ({best[0] if best else '?'} / "
                f"{peer[0] if peer else '?'})",
                best[1] / peer[1] if best and peer else None, 1.3,
                detail=f"{best[0] if best else '?'} / {peer[0] if peer else '?'}; qualifying: perplexity within "
                       f"+{PPL_BUDGET:g}% of fp32 on the same ids")]
    share = res.find("bandwidth_share", EDGEFT["int8"])
    out.append(Goal("peers: edgeft int8 decode share of the bandwidth limit", share.median if share else None, 0.65))
    bshare = res.find("bandwidth_share", best[0]) if best else None
    out.append(Goal(f"peers: fastest passing edgeft's share of its own limit ({best[0] if best else '?'})",
                    bshare.median if bshare else None, 0.7,
                    detail=best[0] if best else ""))
    pre = lambda edge: [m for m in res.measurements if m.case == PEERS and m.metric == "prefill_tps"  # noqa: E731
                        and m.system.startswith("edgeft") == edge and (quality_of(res, m.system) or 99) <= PPL_BUDGET]
    mp, tp = max(pre(True), key=lambda m: m.median, default=None), max(pre(False), key=lambda m: m.median, default=None)
    out.append(Goal(f"peers: prefill at 512, fastest passing edgeft vs fastest qualifying peer "
                    f"({mp.system if mp else '?'} / {tp.system if tp else '?'})",
                    mp.median / tp.median if mp and tp else None, 1.0,
                    detail=f"{mp.system if mp else '?'} / {tp.system if tp else '?'}"))
    cls = [m for m in res.measurements if m.case == PEERS and m.metric == "throughput"]
    e = next((m for m in cls if m.system.startswith("edgeft int8")), None)
    others = [m for m in cls if not m.system.startswith("edgeft")]
    o = max(others, key=lambda m: m.median, default=None)
    out.append(Goal(f"peers: classification int8 at batch 32 vs fastest peer ({o.system if o else '?'})",
                    e.median / o.median if e and o else None,
                    1.2, detail=o.system if o else ""))
    return out


def _in(res: SuiteResult, case: str, metric: str, system: str, params: dict | None = None):
    return next((m for m in res.measurements if m.case == case and m.matches(metric, system, params)), None)


def _median(m) -> float | None:
    return m.median if m is not None else None


def case_goals(res: SuiteResult) -> list[Goal]:
    """The goals of the cases run by name (``tune_minilm_sst2``, ``embeddings``...), each only when its case ran."""
    from benchmarks import constrained, embeddings, long_row, serving
    from benchmarks import tune_minilm_sst2 as minilm
    from benchmarks import tune_smollm2_sonnets as sonnets

    ran = {m.case for m in res.measurements}
    out = []
    if minilm.CASE in ran:
        acc = _in(res, minilm.CASE, "accuracy", minilm.TOP2)
        out.append(Goal(f"{minilm.CASE}: MiniLM-L6 top-2 over int8, SST-2 dev accuracy", _median(acc), 88.0,
                        detail=acc.params.get("dataset", "") if acc else ""))
    if sonnets.CASE in ran:
        out.append(Goal(f"{sonnets.CASE}: SmolLM2 top-4 over int8, held-out perplexity drop",
                        _median(_in(res, sonnets.CASE, "perplexity_drop", sonnets.SYSTEM)), 0.25,
                        detail="1 - after / before"))
    if embeddings.CASE in ran:
        out.append(Goal(f"{embeddings.CASE}: mean cosine to sentence-transformers",
                        _median(_in(res, embeddings.CASE, "cosine_mean", embeddings.EDGEFT_EMB)), 0.99))
        a, b = (_in(res, embeddings.CASE, "throughput", s, {"batch": 32}) for s in (embeddings.EDGEFT_EMB, embeddings.ST))
        out.append(Goal(f"{embeddings.CASE}: texts/s at batch 32 vs sentence-transformers",
                        a.median / b.median if a and b else None, 3.0))
    if constrained.CASE in ran:
        out.append(Goal(f"{constrained.CASE}: the schema mask's share of a decode step (%)",
                        _median(_in(res, constrained.CASE, "mask_share_of_decode", "llguidance mask on edgeft int8")),
                        constrained.MASK_GOAL_PCT, "<="))
    if serving.CASE in ran:
        out += serving_goals(res, serving.CASE, serving.NP)
    if long_row.CASE in ran:
        out.append(Goal(f"{long_row.CASE}: the cut keeps the same token ids (1 = yes)",
                        _median(_in(res, long_row.CASE, "same_ids", "all three")), 1.0))
    return out


def serving_goals(res: SuiteResult, case: str, np_: int) -> list[Goal]:
    """edgeft at ``np_`` clients against its own single client and against each llama-server at ``np_``."""
    agg = lambda system, c: _in(res, case, "aggregate_tps", system, {"clients": c})  # noqa: E731
    out = []
    # the int8 server (its goal stated even when not run), then the others the case ran: the same server with
    # --speculate off, and the other artifacts (``serving.ARTIFACTS``)
    for server in ["edgeft", *[s for s in res.systems(case) if s.startswith("edgeft ")]]:
        single, many = agg(server, 1), agg(server, np_)
        detail = "aggregate tok/s" + (", no drafts on either side" if "--speculate off" in server else "")
        out.append(Goal(f"{case}: {server} at {np_} clients vs its own single client", many.median / single.median
                        if single and many else None, 3.0, detail=detail))
    full = agg("edgeft", np_)  # the int8 server's, against each llama-server
    for peer in [s for s in res.systems(case) if s.startswith("llama-server")]:
        theirs = agg(peer, np_)
        out.append(Goal(f"{case}: edgeft at {np_} clients vs {peer} -np {np_}",
                        full.median / theirs.median if full and theirs else None, 1.3, detail="aggregate tok/s"))
        a, b = (_in(res, case, "ttft_p50_ms", s, {"clients": np_}) for s in ("edgeft", peer))
        out.append(Goal(f"{case}: TTFT p50 at {np_} clients vs {peer}'s", a.median / b.median if a and b else None,
                        1.0, "<="))
    return out


def gate_passed(res: SuiteResult, system: str) -> bool:
    """Whether an edgeft artifact passed its export gate (``res.gates``: the manifest's verdict)."""
    g = res.gate(system)
    return g is not None and g.passed


def _neg(x: float | None) -> float | None:
    return None if x is None else -x
