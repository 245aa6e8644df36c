"""Case ``batch_drift``: how far batched decoding moves an artifact's logits, each sequence in a batch against itself alone.

    python -m benchmarks.run --cases batch_drift     # the suite's SmolLM2 int8 and fp32 artifacts (quick: int8)

For each artifact (in a worker process of its own), 8 prompts (a quick run: 4) of different lengths (cut from the sonnets) are decoded
greedily together by the batching engine (``edgeft.runtime.engine``), every row of logits
tapped; then each prompt is decoded alone (``Generator.generate``, one row per step) and
scored alone in one pass (``Generator.score``, many rows per call). Reported for batch vs
alone-steps, batch vs one pass, and alone-steps vs one pass: the largest and the median
absolute logit difference, the largest difference in log-softmax, and the share of rows
where both pick the same greedy token (compared until the first disagreement). int8 ``MatMulNBits`` kernels may take another path when a
call has more than one row, so int8 artifacts move more than fp32 ones; this measures by how
much. The earlier run of the script this case replaces is kept as written:
``results/batch-drift-2026-12-01.json``.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "batch_drift"
COMPARISONS = {"vs_alone_steps": "batch vs alone, step by step", "vs_one_pass": "batch vs one scoring pass",
               "alone_steps_vs_one_pass": "alone step by step vs one scoring pass"}


class Tap:
    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def __call__(self, logits):
        self.rows.append(logits.copy())
        return logits

    def accept(self, token):
        pass


def measure(spec: dict) -> dict:
    """The three comparisons on one artifact, in this (worker) process."""
    return drift(Path(spec["path"]), spec["prompts"], spec["new_tokens"], spec["threads"])


def drift(path: Path, n_prompts: int, new_tokens: int, threads: int | None = None) -> dict:
    from edgeft.runtime import Generator, SamplingParams
    from edgeft.runtime.engine import Engine

    gen = Generator.open(path, threads=threads)
    lines = [ln.strip() for ln in (prepare.REPO / "demo" / "sonnets.txt").read_text().splitlines() if ln.strip()]
    prompts = [gen.encode(" ".join(lines[5 * i: 5 * i + 1 + i % 4])) for i in range(n_prompts)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine = Engine(gen, parallel=n_prompts, ctx_size=n_prompts * (max(map(len, prompts)) + new_tokens + 1),
                    prefix_cache=0)
    taps, tokens, left = [Tap() for _ in prompts], [[] for _ in prompts], threading.Semaphore(0)

    def receiver(i):
        def on_chunk(c):
            if c.token_id is not None:
                tokens[i].append(c.token_id)
            if c.finish_reason is not None:
                left.release()
        return on_chunk

    try:
        for i, ids in enumerate(prompts):
            engine.submit(ids, params, receiver(i), [taps[i]])
        for _ in prompts:
            left.acquire()
        batch_rows = engine.stats.batched_rows / max(engine.stats.steps, 1)
    finally:
        engine.close()
    out = {"artifact": str(path), "quantization": gen.manifest.quantization.scheme,
           "batching": gen.decoder.batching, "prompts": n_prompts, "prompt_lengths": [len(p) for p in prompts],
           "new_tokens": new_tokens, "mean_rows_per_decode_step": batch_rows}
    # against the same sequence decoded alone, one token per step (what Generator.stream does)
    alone_taps = []
    for ids in prompts:
        tap = Tap()
        gen.generate(ids, params, processors=[tap])
        alone_taps.append(tap.rows)
    out["vs_alone_steps"] = _compare(taps, alone_taps, tokens)
    # against one pass over prompt + tokens (Generator.score: the prefill path, many rows per call)
    out["vs_one_pass"] = _compare(taps, [gen.score(ids + t)[len(ids) - 1:] for ids, t in zip(prompts, tokens)], tokens)
    out["alone_steps_vs_one_pass"] = _compare(
        [type("T", (), {"rows": r})() for r in alone_taps],
        [gen.score(ids + t)[len(ids) - 1:] for ids, t in zip(prompts, tokens)], tokens)
    return out


def _compare(taps, refs, tokens) -> dict:
    """Row by row while both saw the same tokens: logit and logprob differences, greedy agreement."""
    from edgeft.runtime.processors import log_softmax

    diffs, lp_diffs, agree, steps = [], [], 0, 0
    for tap, ref_rows, toks in zip(taps, refs, tokens):
        for row, ref, tok in zip(tap.rows, ref_rows, toks):
            diffs.append(float(np.abs(row - ref).max()))
            lp_diffs.append(float(np.abs(log_softmax(row) - log_softmax(np.asarray(ref))).max()))
            steps += 1
            if int(np.argmax(ref)) != tok:
                break  # the reference would have gone another way: later rows are not comparable
            agree += 1
    return {"rows": steps, "max_abs_logit_diff": max(diffs), "median_abs_logit_diff": float(np.median(diffs)),
            "max_abs_logprob_diff": max(lp_diffs), "greedy_agreement": agree / steps}


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, lm_artifact

    for q in ("int8",) if ctx.quick else ("int8", "fp32"):
        system = f"edgeft {q}"
        try:
            r = ctx.measure(CASE, path=str(lm_artifact(ctx, q)), prompts=4 if ctx.quick else 8,
                            new_tokens=16 if ctx.quick else 32)
        except (prepare.Unavailable, WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip(CASE, system, str(exc))
            continue
        for what, label in COMPARISONS.items():
            d, name = r[what], f"{system}: {label}"
            ctx.add(CASE, name, "max_abs_logit_diff", d["max_abs_logit_diff"], "logit", higher=False,
                    note=f"{system}: {r['prompts']} prompts of {min(r['prompt_lengths'])}-{max(r['prompt_lengths'])} "
                         f"tokens, {r['new_tokens']} new tokens, {r['mean_rows_per_decode_step']:.1f} rows per batched "
                         f"step ({r['batching']} batching)")
            ctx.add(CASE, name, "median_abs_logit_diff", d["median_abs_logit_diff"], "logit", higher=False)
            ctx.add(CASE, name, "max_abs_logprob_diff", d["max_abs_logprob_diff"], "logprob", higher=False)
            ctx.add(CASE, name, "greedy_agreement", d["greedy_agreement"], "share")
            ctx.add(CASE, name, "rows_compared", d["rows"], "rows")
