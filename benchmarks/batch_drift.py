"""How far batched decoding moves an artifact's logits: each sequence in a batch against itself alone.

    .venv/bin/python -m benchmarks.batch_drift ARTIFACT [ARTIFACT...] [--prompts 8] [--new-tokens 32]

For each artifact, ``--prompts`` prompts of different lengths (cut from the sonnets) are decoded
greedily together by the batching engine (``edgeft.runtime.engine``), every row of logits
tapped; then each prompt plus the tokens it got is scored alone in one pass
(``Generator.score``). Reported: the largest and the median absolute logit difference, the
largest difference in log-softmax, and the share of steps where the batched greedy token is
the one the lone pass ranks first. int8 ``MatMulNBits`` kernels may take another path when a
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
    from edgeft.runtime.processors import log_softmax

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
    diffs, lp_diffs, agree, steps = [], [], 0, 0
    for ids, toks, tap in zip(prompts, tokens, taps):
        alone = gen.score(ids + toks)[len(ids) - 1:]
        for row, ref, tok in zip(tap.rows, alone, toks):
            diffs.append(float(np.abs(row - ref).max()))
            lp_diffs.append(float(np.abs(log_softmax(row) - log_softmax(ref)).max()))
            agree += int(np.argmax(ref) == tok)
            steps += 1
    return {"artifact": str(path), "quantization": gen.manifest.quantization.get("scheme"),
            "batching": gen.decoder.batching, "prompts": n_prompts,
            "prompt_lengths": [len(p) for p in prompts], "new_tokens": new_tokens, "steps": steps,
            "mean_rows_per_decode_step": batch_rows,
            "max_abs_logit_diff": max(diffs), "median_abs_logit_diff": float(np.median(diffs)),
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
        print(f"{r['quantization']:>6} {r['batching']:>7}: max |dlogit| {r['max_abs_logit_diff']:.2e}, "
              f"median {r['median_abs_logit_diff']:.2e}, max |dlogprob| {r['max_abs_logprob_diff']:.2e}, "
              f"greedy agreement {100 * r['greedy_agreement']:.1f}% over {r['steps']} steps "
              f"({r['mean_rows_per_decode_step']:.1f} rows per step)")
    print(f"written {out}")


if __name__ == "__main__":
    main()
