"""Case ``prefill_logits``: prompt prefill with the head on the last position only, against every position.

    BENCH_WORK=/work/bench-work python -m benchmarks.run --cases prefill_logits

A decoder artifact's graph has an optional ``logits_to_keep`` input (``edgeft.export.graphs``):
at 0 the head computes logits for every prompt position, as every artifact did before it
had the input; at 1 for the last one only, which is what the runtime asks for when it
prefills a prompt. One worker process per artifact (SmolLM2-135M int8 and mixed, the
generation case's artifacts) opens the artifact once and times ``DecodeState.prefill`` of
prompts of several lengths under each variant, the variants' order rotated per round:

- ``every position (before)``: ``logits_to_keep`` 0, chunks of 256 prompt tokens;
- ``last position (now)``: ``logits_to_keep`` 1, chunks of 256 (the runtime's ``PREFILL_CHUNK``);
- ``last position, chunks of 512``: the same with ``PREFILL_CHUNK`` at 512 (whether the chunk,
  no longer bounded by the logits output, should grow).

The variants are switched through ``edgeft.runtime.generate``'s module values, in the worker
only. Reported: prefill tokens/s per variant and length, each round's ratio to ``before``,
and the largest difference between the variants' last-position logits (they must agree).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from benchmarks import prepare
from edgeft.bench import Stat, summarize

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "prefill_logits"
VARIANTS = {"every position (before)": (0, 256), "last position (now)": (1, 256),
            "last position, chunks of 512": (1, 512)}
BEFORE = "every position (before)"
LENGTHS = (128, 512, 1024)


def case(ctx: Context) -> None:
    from benchmarks.cases import EDGEFT, lm_artifact

    rounds, repeats = (2, 2) if ctx.quick else (4, 3)
    for quant in ("int8", "mixed"):
        path = lm_artifact(ctx, quant)
        system = EDGEFT[quant]
        r = ctx.measure(CASE, timeout=3600, path=str(path), rounds=rounds, repeats=repeats, lengths=list(LENGTHS))
        for variant, by_len in r["tps"].items():
            for n, tps in by_len.items():
                ctx.add(CASE, f"{system}, {variant}", f"prefill_tps@{n}", Stat.from_dict(tps), "tok/s",
                        rounds=rounds, repeats=repeats, tokens=int(n),
                        note=f"{quant}: DecodeState.prefill of a {n}-token prompt, median of {repeats} per round")
                if variant != BEFORE:
                    ctx.add(CASE, f"{system}, {variant}", f"speedup@{n}", Stat.from_dict(r["ratio"][variant][n]), "x",
                            note=f"{quant}, {n} tokens: per-round ratio of prefill rates to '{BEFORE}'")
        ctx.add(CASE, system, "max_logit_difference", r["max_diff"], "abs", higher=False,
                note=f"{quant}: largest |difference| between the variants' last-position logits "
                     f"(scale: {r['logit_scale']:.1f}, the largest |logit|)")


# ---------------------------------------------------------------- the worker (its own process)


def measure(spec: dict) -> dict[str, Any]:
    import numpy as np

    from edgeft.runtime import Generator
    from edgeft.runtime import generate as rt

    gen = Generator.open(spec["path"], threads=spec["threads"])
    if not gen.engine.keep:
        raise SystemExit(f"{spec['path']} has no logits_to_keep input: re-export it")
    text = prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text()
    lengths = [int(n) for n in spec["lengths"]]
    ids = gen.encode(text)
    prompts = {n: ids[1000:1000 + n] for n in lengths}
    names = list(VARIANTS)
    secs: dict[str, dict[int, list[float]]] = {v: {n: [] for n in lengths} for v in names}
    ratio: dict[str, dict[int, list[float]]] = {v: {n: [] for n in lengths} for v in names if v != BEFORE}
    last: dict[str, np.ndarray] = {}

    def run(variant: str, ids: list[int]) -> tuple[float, np.ndarray]:
        keep, chunk = VARIANTS[variant]
        rt._KEEP_LAST = np.array([keep], dtype=np.int64)
        rt.PREFILL_CHUNK = chunk
        state = gen.engine.start(len(ids) + 1)
        t0 = time.perf_counter()
        row = state.prefill(ids)
        return time.perf_counter() - t0, row

    for v in names:  # warm-up: one of each, and the logits the variants must agree on
        _, last[v] = run(v, prompts[lengths[-1]])
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        this: dict[str, dict[int, float]] = {v: {} for v in names}
        for v in order:
            for n in lengths:
                best = [run(v, prompts[n])[0] for _ in range(spec["repeats"])]
                this[v][n] = sorted(best)[len(best) // 2]
                secs[v][n].append(this[v][n])
        for v in ratio:
            for n in lengths:
                ratio[v][n].append(this[BEFORE][n] / this[v][n])
    ref = last[BEFORE]
    return {"tps": {v: {n: summarize(s).inverse(n).to_dict() for n, s in by.items()} for v, by in secs.items()},
            "ratio": {v: {n: summarize(x).to_dict() for n, x in by.items()} for v, by in ratio.items()},
            "max_diff": float(max(np.abs(last[v] - ref).max() for v in names)),
            "logit_scale": float(np.abs(ref).max())}
