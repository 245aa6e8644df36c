"""The frozen-block cache: seconds per epoch, first and later, cache on and off, 8-bit and fp32 base.

    .venv/bin/python -m benchmarks.frozen_cache            # ~20 min on 2 busy cores
    .venv/bin/python -m benchmarks.frozen_cache --quick    # one epoch-pair per model, minutes

MiniLM-L6 top-2 on an SST-2 subset (``demo/sst2_2k.csv``) and SmolLM2-135M top-4 on a
sonnets subset (``demo/sonnets.txt``), each variant run by ``edgeft tune`` in its own
process (so peak memory is its own), same seed, data and steps. Per epoch it sums the
train steps' wall seconds and process CPU seconds (all threads) from the run's log: on a
shared machine CPU seconds are the steadier figure of work done. The ceiling the cache
allows is the share of block-passes it removes (MiniLM top-2 of 6: forward+backward of the
top 2 blocks ~ 3 passes each, the 4 frozen blocks 1 pass each -> 10/6 ~ 1.7x). Writes
``benchmarks/results/frozen_cache.{json,md}`` with the CPU flags and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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


def one(model: str, data: str, n: int, flags: list[str], precision: str, cache: str, epochs: int, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "edgeft"), "tune", "-m", model, "-d", data, "-o", str(out), "-n", str(n),
           "--epochs", str(epochs), "--base-precision", precision, "--frozen-cache", cache, "--threads", "2",
           "--eval-every", "1000000", "--warmup", "0", "--no-progress", "--overwrite", *flags]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{run.stderr[-2000:]}")
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


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            keep = ("avx", "fma", "f16c", "amx", "vnni", "sse4_2", "bf16")
            return sorted({f for f in line.split(":")[1].split() if f.startswith(keep) or "vnni" in f})
    return []


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    epochs = 2 if args.quick else 3
    load = [os.getloadavg()]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgeft-fc-") as tmp:
        for key in args.models.split(","):
            model, kind, n, _blocks, flags = MODELS[key]
            data = _data(kind, Path(tmp), args.quick)
            rows[key] = []
            for precision in ("int8", "fp32"):
                for cache in ("off", "on"):
                    t = time.time()
                    r = one(model, str(data), n, flags, precision, cache, epochs, Path(tmp) / f"{key}-{precision}-{cache}")
                    r["total_wall"] = round(time.time() - t, 1)
                    rows[key].append(r)
                    load.append(os.getloadavg())
                    print(key, json.dumps(r), flush=True)
    report = {"made_by": "python -m benchmarks.frozen_cache" + (" --quick" if args.quick else ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "cores": os.cpu_count(), "load_average_1m_during": [round(x[0], 1) for x in load],
              "shared_machine": "2 cores shared with 7 other helpers' tests and builds during the run",
              "epochs": epochs, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "frozen_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "frozen_cache.md").write_text(markdown(report))
    print(markdown(report))


def _later(r: dict, k: str) -> float:
    later = r["epochs"][1:]
    return sum(e[k] for e in later) / len(later)


def markdown(rep: dict) -> str:
    lines = [f"# Frozen-block cache: seconds per epoch ({rep['date']})", "",
             f"Made by `{rep['made_by']}`. CPU: {rep['cpu']}, {rep['cores']} cores; flags: {' '.join(rep['cpu_flags'])}.",
             f"Machine shared: {rep['shared_machine']}; 1-minute load average during the run: "
             f"{rep['load_average_1m_during']}. Wall seconds swing with the load; CPU seconds (all threads) are the "
             "steadier measure of work.", "",
             "| case | base | cache | epoch 1 wall / cpu s | later epochs wall / cpu s | later-epoch speed-up (wall / cpu) | metric | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in rep["results"].items():
        for r in rows:
            off = next(x for x in rows if x["precision"] == r["precision"] and x["cache"] == "off")
            sw, sc = _later(off, "wall") / _later(r, "wall"), _later(off, "cpu") / _later(r, "cpu")
            e1 = r["epochs"][0]
            lines.append(f"| {key} | {r['precision']} | {r['cache']} | {e1['wall']} / {e1['cpu']} | "
                         f"{_later(r, 'wall'):.2f} / {_later(r, 'cpu'):.2f} | {sw:.2f}x / {sc:.2f}x | "
                         f"{r['metric']:.4f} | {r['peak_memory_mb']:.0f} |")
    lines += ["", "Metric: dev accuracy (MiniLM) or eval perplexity (SmolLM2) after the last epoch. Speed-up: cache off's",
              "later epochs over this row's. Ceilings: MiniLM top-2 of 6 ~1.7x, SmolLM2 top-4 of 30 ~ (4*3+26)/(4*3) ~ 3.2x",
              "(forward+backward of a trained block ~ 3 block-passes, a frozen block 1; embeddings and head not counted).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
