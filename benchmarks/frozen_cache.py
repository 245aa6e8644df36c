"""Case ``frozen_cache``: seconds per epoch, first and later, the frozen-block cache on and off, 8-bit and fp32 base.

    python -m benchmarks.run --cases frozen_cache            # ~20 min on 2 busy cores
    BENCH_QUICK=1 python -m benchmarks.run --cases frozen_cache   # MiniLM only, 2 epochs of a smaller subset

MiniLM-L6 top-2 on an SST-2 subset (``demo/sst2_2k.csv``) and SmolLM2-135M top-4 on a
sonnets subset (``demo/sonnets.txt``), each variant run by ``edgeft tune`` in its own
process (so peak memory is its own), same seed, data and steps. Per epoch it sums the
train steps' wall seconds and process CPU seconds (all threads) from the run's log: on a
shared machine CPU seconds are the steadier figure of work done. The ceiling the cache
allows is the share of block-passes it removes (MiniLM top-2 of 6: forward+backward of the
top 2 blocks ~ 3 passes each, the 4 frozen blocks 1 pass each -> 10/6 ~ 1.7x; SmolLM2 top-4
of 30 ~ 3.2x). The earlier run of the script this case replaces is kept as written:
``results/frozen_cache.{json,md}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import prepare
from edgeft.bench import summarize

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "frozen_cache"
ROOT = prepare.REPO
MODELS = {  # name: (pulled model, data maker, trainable layers, blocks, flags)
    "minilm-sst2": ("minilm-l6", "sst2", 2, 6, ["--max-length", "64", "-b", "32", "--lr", "1e-3"]),
    "smollm2-sonnets": ("smollm2-135m-instruct", "sonnets", 4, 30, ["--max-length", "128", "-b", "8", "--lr", "5e-4"]),
}


def _data(kind: str, folder: Path, quick: bool) -> Path:
    if kind == "sst2":
        rows = (ROOT / "demo" / "sst2_2k.csv").read_text().splitlines()
        path = folder / "sst2.csv"
        path.write_text("\n".join(rows[: 1 + (160 if quick else 320)]) + "\n")
    else:
        text = (ROOT / "demo" / "sonnets.txt").read_text()
        path = folder / "sonnets.txt"
        path.write_text(text[: 9000 if quick else 14000])
    return path


def one(model: str, data: str, n: int, flags: list[str], precision: str, cache: str, epochs: int, out: Path,
        threads: int = 2) -> dict:
    cmd = [*prepare.edgeft_cmd(), "tune", "-m", model, "-d", data, "-o", str(out), "-n", str(n),
           "--epochs", str(epochs), "--base-precision", precision, "--frozen-cache", cache, "--threads", str(threads),
           "--eval-every", "1000000", "--warmup", "0", "--no-progress", "--overwrite", *flags]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        tail = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise prepare.Unavailable(f"edgeft tune exited {run.returncode}: {tail[:300]}")
    m = json.loads((out / "metrics.json").read_text())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    per = m["steps"] // epochs
    steps = [e for e in log if "seconds" in e]
    epoch = [{"wall": round(sum(e["seconds"] for e in steps[k * per:(k + 1) * per]), 2),
              "cpu": round(sum(e["cpu_seconds"] for e in steps[k * per:(k + 1) * per]), 2)} for k in range(epochs)]
    after = m["after"]
    return {"precision": precision, "cache": cache, "used_cache": m.get("frozen_cache"), "epochs": epoch,
            "metric": after.get("accuracy", after.get("perplexity")), "peak_memory_mb": m["peak_memory_mb"],
            "train_examples": m["train_examples"], "steps": m["steps"]}


def _later(r: dict, k: str) -> float:
    later = r["epochs"][1:]
    return sum(e[k] for e in later) / len(later)


def case(ctx: Context) -> None:
    epochs = 2 if ctx.quick else 3
    load = [os.getloadavg()[0]]
    folder = prepare.WORK / CASE
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        for key, (model, kind, n, blocks, flags) in MODELS.items():
            if ctx.quick and key != "minilm-sst2":  # a smoke run: the smaller model only
                continue
            try:
                source = str(prepare.ensure_model(model))
            except prepare.Unavailable as exc:
                ctx.res.skip(CASE, key, str(exc))
                continue
            data = _data(kind, folder, ctx.quick)
            off: dict[str, dict] = {}
            for precision in ("int8", "fp32"):
                for cache in ("off", "on"):
                    system = f"{key}, {precision} base, cache {cache}"
                    t = time.time()
                    try:
                        r = one(source, str(data), n, flags, precision, cache, epochs,
                                folder / f"{key}-{precision}-{cache}", ctx.threads)
                    except prepare.Unavailable as exc:
                        ctx.res.skip(CASE, system, str(exc))
                        continue
                    load.append(os.getloadavg()[0])
                    if cache == "off":
                        off[precision] = r
                    record(ctx, system, r, off.get(precision), time.time() - t, n, blocks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ctx.add(CASE, "machine", "load_1m", summarize(load), "load", higher=False,
            note="frozen_cache: the 1-minute load average before and after every run (median [q1-q3])")


def record(ctx: Context, system: str, r: dict, off: dict | None, total_s: float, n: int, blocks: int) -> None:
    e1 = r["epochs"][0]
    ctx.add(CASE, system, "epoch1_wall_s", e1["wall"], "s", higher=False,
            note=f"{system.split(',')[0]}: top {n} of {blocks} blocks, {r['steps']} steps over {len(r['epochs'])} "
                 f"epochs of {r['train_examples']} examples; per-epoch sums of the train steps' seconds from log.jsonl")
    ctx.add(CASE, system, "epoch1_cpu_s", e1["cpu"], "s", higher=False)
    ctx.add(CASE, system, "later_wall_s", _later(r, "wall"), "s", higher=False)
    ctx.add(CASE, system, "later_cpu_s", _later(r, "cpu"), "s", higher=False)
    if off is not None:  # the later epochs' speed-up over cache off, same base
        ctx.add(CASE, system, "later_speedup_wall", _later(off, "wall") / _later(r, "wall"), "x")
        ctx.add(CASE, system, "later_speedup_cpu", _later(off, "cpu") / _later(r, "cpu"), "x")
    ctx.add(CASE, system, "used_cache", float(bool(r["used_cache"])), "yes=1")
    ctx.add(CASE, system, "metric", r["metric"], "accuracy" if "minilm" in system else "ppl",
            higher="minilm" in system)
    ctx.add(CASE, system, "peak_mb", r["peak_memory_mb"], "MB", higher=False)
    ctx.add(CASE, system, "total_wall_s", total_s, "s", higher=False)
