"""all-MiniLM-L6 on SST-2: top 2 of 6 blocks over an int8 base, beside full fine-tuning, CPU.

Run:  EDGEFT_HOME=... .venv/bin/python benchmarks/tune_minilm_sst2.py [--steps 80] [--variants int8-top2,full]

Each variant runs in its own process (so peak memory is its own) for the same number of
steps on the same seeded batches: ``int8-top2`` trains blocks 5-6, the pooler and the
classifier over an int8 frozen base; ``full`` trains everything (embeddings included) in
fp32. Reports dev accuracy (all 872 dev sentences), wall time and peak memory, and writes
``benchmarks/results/tune_minilm_sst2.json``. Sized for ~10 minutes a variant on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("EDGEFT_SHARED_DATA") or REPO.parent / "shared" / "data") / "sst2"
VARIANTS = {
    "int8-top2": {"trainable_layers": 2, "base_precision": "int8"},
    "full": {"trainable_layers": 6, "base_precision": "fp32", "train_embeddings": True},
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from edgeft.tune import Task, TuneConfig, tune

    lr = args.lr if name != "full" else args.full_lr
    cfg = TuneConfig(model="minilm-l6", data=SST2 / "train.tsv", eval_data=SST2 / "dev.tsv",
                     out=args.out / name, task=Task.classification, max_length=64, batch_size=args.batch_size,
                     max_steps=args.steps, lr=lr, warmup=0.1, eval_batch_size=64, threads=args.threads,
                     overwrite=True, progress=True, **VARIANTS[name])
    t0 = time.perf_counter()
    run = tune(cfg)
    wall = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    return {
        "variant": name, "lr": lr, "steps": m["steps"], "batch_size": args.batch_size,
        "dev_accuracy_before": m["before"]["accuracy"], "dev_accuracy": m["after"]["accuracy"],
        "dev_macro_f1": m["after"]["macro_f1"], "confusion_matrix": m["after"]["confusion_matrix"],
        "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 1),
        "examples_per_s": m["examples_per_s"], "peak_memory_mb": m["peak_memory_mb"],
        "trainable_parameters": m["trainable_parameters"], "total_parameters": m["total_parameters"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="int8-top2,full")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeft-bench/minilm-sst2"))
    ap.add_argument("--tag", default="", help="suffix of the result file name (a second budget beside the first)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)))
        return
    results = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
        print(json.dumps(results[-1]), flush=True)
    out = {"case": "all-MiniLM-L6-v2 on SST-2 (train 67k, dev 872), CPU", "goal_dev_accuracy": 0.88,
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "variants": results}
    dest = REPO / "benchmarks" / "results" / f"tune_minilm_sst2{'-' + args.tag if args.tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
