"""How far batched decoding moves an artifact's logits: each sequence in a batch against itself alone.

    .venv/bin/python -m benchmarks.batch_drift ARTIFACT [ARTIFACT...] [--prompts 8] [--new-tokens 32]

For each artifact, ``--prompts`` prompts of different lengths (cut from the sonnets) are decoded
greedily together by the batching engine (``edgeft.runtime.engine``), every row of logits
tapped; then each prompt is decoded alone (``Generator.generate``, one row per step) and
scored alone in one pass (``Generator.score``, many rows per call). Reported for batch vs
alone-steps, batch vs one pass, and alone-steps vs one pass: the largest and the median
absolute logit difference, the largest difference in log-softmax, and the share of rows
where both pick the same greedy token (compared until the first disagreement). int8 ``MatMulNBits`` kernels may take another path when a
call has more than one row, so int8 artifacts move more than fp32 ones; this measures by how
much. Writes ``benchmarks/results/batch-drift-DATE.json`` (and prints a table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from benchmarks import prepare
from benchmarks.serving import cpu_flags, cpu_model

REPO = Path(__file__).resolve().parents[1]


class Tap:
    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def __call__(self, logits):
        self.rows.append(logits.copy())
        return logits

    def accept(self, token):
        pass


def measure(path: Path, n_prompts: int, new_tokens: int) -> dict:
    from edgeft.runtime import Generator, SamplingParams
    from edgeft.runtime.engine import Engine

    gen = Generator.open(path)
    lines = [ln.strip() for ln in prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text().splitlines()
             if ln.strip()]
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
    out = {"artifact": str(path), "quantization": gen.manifest.quantization.get("scheme"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = [measure(p, a.prompts, a.new_tokens) for p in a.artifacts]
    date = datetime.date.today().isoformat()
    res = {"date": date, "command": "python -m benchmarks.batch_drift " + " ".join(sys.argv[1:]),
           "cpu": cpu_model(), "cpu_flags": cpu_flags(), "load_avg": os.getloadavg(), "rows": rows}
    out = a.out or REPO / "benchmarks" / "results" / f"batch-drift-{date}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    for r in rows:
        for what in ("vs_alone_steps", "vs_one_pass", "alone_steps_vs_one_pass"):
            d = r[what]
            print(f"{r['quantization']:>6} {r['batching']:>7} {what:<24}: max |dlogit| {d['max_abs_logit_diff']:.2e}, "
                  f"median {d['median_abs_logit_diff']:.2e}, max |dlogprob| {d['max_abs_logprob_diff']:.2e}, "
                  f"greedy agreement {100 * d['greedy_agreement']:.1f}% over {d['rows']} rows "
                  f"({r['mean_rows_per_decode_step']:.1f} rows per batched step)")
    print(f"written {out}")


if __name__ == "__main__":
    main()
