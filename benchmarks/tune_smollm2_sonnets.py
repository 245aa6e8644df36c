"""Case ``tune_smollm2_sonnets``: SmolLM2-135M on Shakespeare's sonnets, top 4 of 30 blocks over an int8 base.

    python -m benchmarks.run --cases tune_smollm2_sonnets [--tune-steps 60]    # ~10 min on 2 busy cores

One ``edgeft tune`` run in its own process (``--tune-steps`` / 5 steps: 12 by default) on
``demo/sonnets.txt`` (the same file as the shared poetry/shakespeare_sonnets.txt), with its seeded
10% held-out split: held-out perplexity before and after (the same text blocks both times), the
drop, the tune CLI's train seconds, tokens/s and peak memory, and the command's wall time. A worker
then samples a few lines from the tuned model (PyTorch, the trained blocks merged into the base),
kept as notes. The goal (a 25% perplexity drop) is in ``benchmarks.headline``. The earlier run of
the script this case replaces is kept as written: ``results/tune_smollm2_sonnets.json``.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "tune_smollm2_sonnets"
SYSTEM = "edgeft tune top-4 over int8"
SONNETS = prepare.REPO / "demo" / "sonnets.txt"
PROMPTS = ["Shall I compare thee", "When in the chronicle of wasted time", "My love is as a fever"]


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed

    steps = max(ctx.tune_steps // 5, 2)
    prepare.ensure_model(prepare.LM)
    name = f"{CASE}-{steps}"
    run = prepare.ensure_tuned(name, [
        "--model", prepare.LM, "--task", "causal-lm", "--data", str(SONNETS), "--trainable-layers", "4",
        "--base-precision", "int8", "--max-length", "128", "--batch-size", "8", "--lr", "5e-4", "--warmup", "0.1",
        "--eval-batch-size", "8", "--max-steps", str(steps), "--seed", "0", "--threads", str(ctx.threads),
        "--no-progress"], fresh=True)
    m = prepare.run_metrics(run)
    before, after = m["before"]["perplexity"], m["after"]["perplexity"]
    note = (f"{SYSTEM}: {m['steps']} steps of 8 blocks of 128 tokens, lr 5e-4, on demo/sonnets.txt; perplexity on "
            f"its seeded 10% held-out split ({m['after'].get('tokens', '?')} tokens), from the run's metrics.json")
    ctx.add(CASE, SYSTEM, "perplexity_before", before, "ppl", higher=False, dataset="sonnets-heldout", note=note)
    ctx.add(CASE, SYSTEM, "perplexity", after, "ppl", higher=False, dataset="sonnets-heldout")
    ctx.add(CASE, SYSTEM, "perplexity_drop", 1 - after / before, "share")
    ctx.add(CASE, SYSTEM, "train_s", m["train_seconds"], "s", higher=False)
    wall = prepare.logged_seconds("tune", name)
    if wall is not None:
        ctx.add(CASE, SYSTEM, "wall_s", wall, "s", higher=False)
    ctx.add(CASE, SYSTEM, "tokens_per_s", m["tokens_per_s"], "tok/s")
    ctx.add(CASE, SYSTEM, "peak_mb", m["peak_memory_mb"], "MB", higher=False)
    ctx.add(CASE, SYSTEM, "trainable_m", m["trainable_parameters"] / 1e6, "M params", higher=False)
    try:
        lines = ctx.spawn("sample-tuned", path=str(run), prompts=PROMPTS, new_tokens=40)["lines"]
        ctx.res.notes += [f"{CASE}: sampled from the tuned model (temperature 0.7, top-p 0.9): {s!r}" for s in lines]
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        ctx.res.skip(CASE, "samples", str(exc))
