"""SST-2 defaults sweep: all-MiniLM-L6-v2, top-N blocks over the 8-bit base, on a train subset.

    .venv/bin/python -m benchmarks.sst2_sweep --subset 6000 --configs 'n=2,lr=1e-3' 'n=4,lr=5e-4,b=32'
    .venv/bin/python -m benchmarks.sst2_sweep --subset 0 --configs 'defaults' --epochs 3   # the full 67k

Each configuration is one ``edgeft tune`` process (``nice -n 5``, 2 threads) on a seeded sample
of ``train.tsv`` (``--subset 0``: all of it), evaluated on the whole dev set (872) after every
epoch. Runs that share the layer count and max length share one kept frozen cache
(``--keep-cache`` on the same OUT), so a sweep pays for the 8-bit base once per (N, length),
except where a row says ``cache: fresh``. A configuration is ``key=value`` pairs: ``n``
(trainable layers), ``lr``, ``b`` (batch size), ``len`` (max length), ``warmup``, ``schedule``,
``epochs``, ``wd``; ``defaults`` passes no flag but the data, model, ``-n`` and ``--epochs`` given.
Appends one JSON line per configuration to ``--out`` (default
``benchmarks/results/sst2_sweep.jsonl``) with dev accuracy per epoch, wall and CPU seconds of the
train steps, wall seconds of the whole process, the CPU and the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from edgeft.bench import cpu_flags
from edgeft.bench import cpu_name as cpu_model

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("EDGEFT_SHARED_DATA") or ROOT.parent / "shared" / "data") / "sst2"
FLAGS = {"n": "-n", "lr": "--lr", "b": "-b", "len": "--max-length", "warmup": "--warmup",
         "schedule": "--schedule", "epochs": "--epochs", "wd": "--weight-decay"}


def subset(k: int, folder: Path, seed: int = 0) -> Path:
    """A seeded sample of ``k`` training rows (0: the whole file)."""
    if not k:
        return SST2 / "train.tsv"
    path = folder / f"sst2-train-{k}-s{seed}.tsv"
    if not path.exists():
        head, *rows = (SST2 / "train.tsv").read_text().splitlines()
        random.Random(seed).shuffle(rows)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([head, *rows[:k]]) + "\n")
    return path


def parse(spec: str, epochs: float, n: int) -> dict[str, str]:
    out = {"n": str(n), "epochs": str(epochs)}
    if spec != "defaults":
        out |= dict(kv.split("=", 1) for kv in spec.split(","))
    return out


def run(spec: str, args: argparse.Namespace) -> dict:
    conf = parse(spec, args.epochs, args.n)
    data = subset(args.subset, args.work)
    out = args.work / "runs" / f"n{conf['n']}-len{conf.get('len', 'default')}-sub{args.subset}"
    fresh = not out.with_name(out.name + ".frozen-cache").exists()
    cmd = ["nice", "-n", str(args.nice), str(Path(sys.executable).parent / "edgeft"), "tune", "-m", "minilm-l6",
           "-d", str(data), "--eval-data", str(SST2 / "dev.tsv"), "-o", str(out), "--overwrite", "--no-progress",
           "--threads", str(args.threads), "--keep-cache", "--frozen-cache", args.cache]
    for k, v in conf.items():
        cmd += [FLAGS[k], v]
    load0, t0 = os.getloadavg(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [round(e["eval"]["accuracy"], 4) for e in log if "eval" in e]
    steps = [e for e in log if "seconds" in e]
    return {"config": spec, "flags": conf, "subset": args.subset or 67349, "train_examples": m["train_examples"],
            "cache": "fresh" if fresh else "reused", "steps": m["steps"],
            "dev_accuracy_per_epoch": evals[1:], "dev_accuracy_before": evals[0],
            "dev_accuracy_best": round(m["after"]["accuracy"], 4), "dev_accuracy_last": round(m["last"]["accuracy"], 4),
            "train_wall_s": round(sum(e["seconds"] for e in steps), 1),
            "train_cpu_s": round(sum(e["cpu_seconds"] for e in steps), 1), "process_wall_s": round(wall, 1),
            "load_avg_1m": [round(load0[0], 1), round(os.getloadavg()[0], 1)], "threads": args.threads,
            "cpu": cpu_model(), "isa": " ".join(cpu_flags()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=6000)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["defaults"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=5)
    ap.add_argument("--cache", default="on", choices=("on", "off", "auto"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-sst2-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sst2_sweep.jsonl")
    args = ap.parse_args()
    for spec in args.configs:
        row = run(spec, args)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
