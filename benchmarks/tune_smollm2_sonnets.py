"""SmolLM2-135M on Shakespeare's sonnets: top 4 of 30 blocks over an int8 base, CPU.

Run:  EDGEFT_HOME=... .venv/bin/python benchmarks/tune_smollm2_sonnets.py [--steps 12] [--threads 2]

Measures held-out perplexity before and after (10% of the sonnets, seeded split, the
same text blocks both times), wall time, peak memory, and prints a few generated lines
from the tuned model (the trained blocks merged into the base's fp32 weights). Writes
``benchmarks/results/tune_smollm2_sonnets.json``. Sized for ~10 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SONNETS = REPO / "demo" / "sonnets.txt"  # the same file as the shared poetry/shakespeare_sonnets.txt
PROMPTS = ["Shall I compare thee", "When in the chronicle of wasted time", "My love is as a fever"]


def generate_lines(run: Path, max_new_tokens: int = 40) -> list[str]:
    import torch

    from edgeft.tune.model import load_tuned

    model, tok = load_tuned(run)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        torch.manual_seed(0)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                             pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeft-bench/smollm2-sonnets"))
    ap.add_argument("--data", type=Path, default=SONNETS)
    args = ap.parse_args()

    from edgeft.tune import Task, TuneConfig, tune

    cfg = TuneConfig(model="smollm2-135m-instruct", data=args.data, out=args.out, task=Task.causal_lm,
                     trainable_layers=4, base_precision="int8", max_length=args.max_length,
                     batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, warmup=0.1,
                     eval_batch_size=8, threads=args.threads, overwrite=True, progress=True)
    t0 = time.perf_counter()
    run = tune(cfg)
    wall = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    before, after = m["before"]["perplexity"], m["after"]["perplexity"]
    lines = generate_lines(run)
    result = {
        "case": "smollm2-135m-instruct on shakespeare sonnets, top 4/30 blocks, int8 base, CPU",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite", "progress")},
        "perplexity_before": before, "perplexity_after": after,
        "perplexity_drop": 1 - after / before, "goal_drop": 0.25, "goal_met": (1 - after / before) >= 0.25,
        "eval_tokens": m["after"]["tokens"], "train_blocks": m["train_examples"], "steps": m["steps"],
        "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 1), "tokens_per_s": m["tokens_per_s"],
        "peak_memory_mb": m["peak_memory_mb"], "trainable_parameters": m["trainable_parameters"],
        "total_parameters": m["total_parameters"], "generated": lines,
    }
    dest = REPO / "benchmarks" / "results" / "tune_smollm2_sonnets.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
