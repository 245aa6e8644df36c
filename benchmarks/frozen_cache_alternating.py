"""The frozen-block cache, epochs with the cache on and off in alternating order, in one process per base.

    .venv/bin/python -m benchmarks.frozen_cache_alternating [--rounds 2] [--models minilm-sst2,smollm2-sonnets]
    .venv/bin/python -m benchmarks.run --cases frozen_cache_alternating     # the same, as a case of the suite

For each model (MiniLM-L6 top-2 on the first rows of ``demo/sst2_2k.csv``; SmolLM2-135M top-4
on the start of ``demo/sonnets.txt``) and each base precision (int8, fp32), one worker process
loads the model once and runs ``edgeft.tune.train.train_step`` over whole epochs of the same
seeded batches: epoch 1 with the cache filling, then ``--rounds`` rounds of one epoch with the
cache off (every block runs) and one fed from the cache, so the machine's load falls on both
alike. Per epoch it records wall and process CPU seconds (all threads) and, per step, where
the time goes (collation, forward, backward, clipping, optimizer). The optimizer is the one
``edgeft tune`` makes; ``--optimizer-impl loop`` measures torch's per-tensor AdamW loop instead
(what ``edgeft tune`` used before it took the fused kernel). Writes
``benchmarks/results/frozen_cache_alternating.{json,md}`` with the CPU, its flags and the load.
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

from edgeft.bench import cpu_flags
from edgeft.bench import cpu_name as cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# name: (pulled model, data, trainable layers, blocks, batch, max length, lr, rows or characters)
MODELS = {
    "minilm-sst2": ("minilm-l6", "sst2", 2, 6, 32, 64, 1e-3, 160),
    "smollm2-sonnets": ("smollm2-135m-instruct", "sonnets", 4, 30, 4, 64, 5e-4, 1800),
}
CEILING = {"minilm-sst2": 10 / 6, "smollm2-sonnets": (4 * 3 + 26) / (4 * 3)}  # block-passes removed


def _data(kind: str, size: int, folder: Path) -> Path:
    if kind == "sst2":
        rows = (ROOT / "demo" / "sst2_2k.csv").read_text().splitlines()
        path = folder / "sst2.csv"
        path.write_text("\n".join(rows[: 1 + size]) + "\n")
    else:
        path = folder / "sonnets.txt"
        path.write_text((ROOT / "demo" / "sonnets.txt").read_text()[:size])
    return path


def worker(spec: dict) -> dict:
    """One base: fill epoch, then alternating off/on epochs; seconds per epoch and per part of a step."""
    import torch

    from edgeft.models import resolve_model
    from edgeft.tune.hf import load_tokenizer
    from edgeft.tune import train as T
    from edgeft.tune.config import TuneConfig
    from edgeft.tune.model import load_for_tuning

    torch.set_num_threads(spec["threads"])
    model, kind, n, _blocks, batch, length, lr, size = MODELS[spec["case"]]
    tmp = Path(spec["tmp"])
    cfg = TuneConfig(model=model, data=_data(kind, size, tmp), out=tmp / "run", trainable_layers=n,
                     base_precision=spec["precision"], batch_size=batch, max_length=length, lr=lr, warmup=0,
                     frozen_cache="on", progress=False, overwrite=True)
    resolved = resolve_model(model)
    tok = load_tokenizer(resolved)
    task = T.resolve_task(cfg)
    cfg = cfg.for_task(task)
    prep = T.prepare_data(cfg, task, tok, length)
    loaded = load_for_tuning(resolved, task, prep.labels, n, spec["precision"], "cpu", tokenizer=tok)
    plan = T.make_plan(cfg, len(prep.train))
    partial = tmp / "run.partial"
    partial.mkdir(parents=True, exist_ok=True)
    cache = T.open_cache(cfg, loaded, prep, plan, partial, resolved, length)
    optimizer = T.make_optimizer(cfg, loaded.model)
    if spec["optimizer_impl"] == "loop":
        groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=lr, foreach=False)
    parts = _instrument(loaded.model, optimizer, torch)
    epochs, step = [], 0
    schedule = ["fill"] + ["off", "on"] * spec["rounds"]
    for mode in schedule:
        T.set_modes(loaded.model, loaded.trainable_modules, training=True)
        for p in parts.values():
            p[:] = [0.0, 0.0]
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(plan.steps_per_epoch):
            T.train_step(cfg, loaded, prep, optimizer, step, plan, None, None if mode == "off" else cache)
            step += 1
        epochs.append({"mode": mode, "wall": round(time.perf_counter() - w0, 3),
                       "cpu": round(time.process_time() - c0, 3),
                       "parts_cpu": {k: round(v[1], 3) for k, v in parts.items()}})
        print(json.dumps(epochs[-1]), file=sys.stderr, flush=True)
    return {"case": spec["case"], "precision": spec["precision"], "optimizer_impl": spec["optimizer_impl"],
            "steps_per_epoch": plan.steps_per_epoch, "train_examples": len(prep.train),
            "trainable_parameters": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad),
            "epochs": epochs}


def _instrument(model, optimizer, torch) -> dict:
    """CPU seconds of forward (the whole model call), backward, clipping and optimizer step, summed per epoch."""
    parts = {k: [0.0, 0.0] for k in ("forward", "backward", "clip", "optimizer")}

    def timed(name, fn):
        def run(*a, **kw):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                parts[name][0] += time.perf_counter() - w
                parts[name][1] += time.process_time() - c
        return run

    model.forward = timed("forward", model.forward)
    optimizer.step = timed("optimizer", optimizer.step)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    return parts


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    nice = max(0, spec["nice"] - os.nice(0))  # the worker ends at --nice, however this process was started
    res = subprocess.run(["nice", "-n", str(nice), sys.executable, "-m", "benchmarks.frozen_cache_alternating",
                          "--worker", json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"worker {spec['case']} {spec['precision']} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summary(r: dict) -> dict:
    def mean(mode: str, key: str) -> float:
        xs = [e[key] for e in r["epochs"] if e["mode"] == mode]
        return sum(xs) / len(xs)

    out = {k: {m: round(mean(m, k), 3) for m in ("fill", "off", "on")} for k in ("wall", "cpu")}
    out["speedup_cpu"] = round(out["cpu"]["off"] / out["cpu"]["on"], 3)
    out["speedup_wall"] = round(out["wall"]["off"] / out["wall"]["on"], 3)
    out["share_of_ceiling_cpu"] = round(out["speedup_cpu"] / CEILING[r["case"]], 3)
    out["parts_cpu"] = {m: {k: round(sum(e["parts_cpu"][k] for e in r["epochs"] if e["mode"] == m)
                                / sum(e["mode"] == m for e in r["epochs"]), 3) for k in r["epochs"][0]["parts_cpu"]}
                        for m in ("off", "on")}
    return out


CASE = "frozen_cache_alternating"


def case(ctx) -> None:
    """The suite's case (``python -m benchmarks.run --cases frozen_cache_alternating``): every model and base, alternating."""
    with tempfile.TemporaryDirectory(prefix="edgeft-fca-") as tmp:
        for key, (_m, _k, n, blocks, *_rest) in MODELS.items():
            for precision in ("fp32", "int8"):
                folder = Path(tmp) / f"{key}-{precision}"
                folder.mkdir()
                spec = {"case": key, "precision": precision, "rounds": 1 if ctx.quick else 2, "threads": ctx.threads,
                        "nice": 0, "optimizer_impl": "tune", "tmp": str(folder)}
                s = summary(_spawn(spec))
                system = f"{key} top-{n} of {blocks}, {precision} base"
                for label, mode in (("epoch1", "fill"), ("later_off", "off"), ("later_on", "on")):
                    ctx.add(CASE, system, f"{label}_cpu_s", s["cpu"][mode], "s", higher=False)
                    ctx.add(CASE, system, f"{label}_wall_s", s["wall"][mode], "s", higher=False)
                ctx.add(CASE, system, "later_speedup_cpu", s["speedup_cpu"], "x",
                        note="cache-off over cache-on later epochs, alternating in one process")
                ctx.add(CASE, system, "share_of_ceiling_cpu", 100 * s["share_of_ceiling_cpu"], "%")


def _base(r: dict) -> str:
    return r["precision"] + (", AdamW loop" if r.get("optimizer_impl") == "loop" else "")


def markdown(rep: dict) -> str:
    lines = [f"# Frozen-block cache, cache on and off in alternating epochs ({rep['date']})", "",
             f"Made by `{rep['made_by']}` ({rep['rounds']} round(s) of one epoch off, one on, after the filling "
             f"epoch; one process per model and base). CPU: {rep['cpu']}, {rep['cores']} cores, "
             f"{rep['threads']} torch threads; flags: {' '.join(rep['cpu_flags'])}. Optimizer: {rep['optimizer_impl']}.",
             f"Machine: {rep['shared_machine']}; 1-minute load average before, between and after the workers (per run): "
             f"{rep['load_average_1m']}. CPU seconds (all threads of the process) are the steadier measure of work "
             "on a loaded machine; wall seconds swing with the load.", "",
             "| case | base | epoch 1 (filling) cpu / wall s | later, cache off cpu / wall s | later, cache on cpu / wall s "
             "| speed-up cpu / wall | ceiling | share of ceiling (cpu) |", "|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        s = r["summary"]
        # the ceiling counts block-passes of equal cost: an fp32 base's; an int8 frozen block costs more
        share = f"{100 * s['share_of_ceiling_cpu']:.0f}%" if r["precision"] == "fp32" else "n/a (int8 blocks cost more)"
        lines.append(f"| {r['case']} | {_base(r)} | {s['cpu']['fill']:.2f} / {s['wall']['fill']:.2f} | "
                     f"{s['cpu']['off']:.2f} / {s['wall']['off']:.2f} | {s['cpu']['on']:.2f} / {s['wall']['on']:.2f} | "
                     f"{s['speedup_cpu']:.2f}x / {s['speedup_wall']:.2f}x | {CEILING[r['case']]:.2f}x | "
                     f"{share} |")
    lines += ["", "Where a later epoch's CPU seconds go (per epoch; forward is the whole model call, the cache read "
              "included):", "", "| case | base | cache | forward | backward | clip | optimizer |", "|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        for m in ("off", "on"):
            p = r["summary"]["parts_cpu"][m]
            lines.append(f"| {r['case']} | {_base(r)} | {m} | {p['forward']:.2f} | {p['backward']:.2f} | "
                         f"{p['clip']:.2f} | {p['optimizer']:.2f} |")
    lines += ["", "Ceilings: the share of block-passes the cache removes, forward+backward of a trained block ~3 "
              "passes, a frozen block 1 (MiniLM top-2 of 6: 10/6; SmolLM2 top-4 of 30: 38/12); embeddings, head, "
              "loss and optimizer are not counted, so no run can reach them.", ""]
    return "\n".join(lines)


def merge(tags: list[str], tag: str) -> None:
    """Runs made at the same time (one per model or optimizer) written as one report."""
    reps = [json.loads((RESULTS / f"frozen_cache_alternating-{t}.json").read_text()) for t in tags]
    rep = dict(reps[0], made_by="; ".join(r["made_by"] for r in reps), results=[x for r in reps for x in r["results"]],
               optimizer_impl="; ".join(f"{t}: {r['optimizer_impl']}" for t, r in zip(tags, reps, strict=True)),
               rounds="/".join(str(r["rounds"]) for r in reps),
               load_average_1m=[r["load_average_1m"] for r in reps])
    name = "frozen_cache_alternating" + (f"-{tag}" if tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(rep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=5)
    ap.add_argument("--optimizer-impl", choices=("tune", "loop"), default="tune")
    ap.add_argument("--tag", default="")
    ap.add_argument("--merge", help="tags of earlier runs to write side by side as one file (named by --tag)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.merge:
        merge(args.merge.split(","), args.tag)
        return
    load, results = [os.getloadavg()[0]], []
    with tempfile.TemporaryDirectory(prefix="edgeft-fca-") as tmp:
        for case in args.models.split(","):
            for precision in args.precisions.split(","):
                folder = Path(tmp) / f"{case}-{precision}"
                folder.mkdir()
                spec = {"case": case, "precision": precision, "rounds": args.rounds, "threads": args.threads,
                        "nice": args.nice, "optimizer_impl": args.optimizer_impl, "tmp": str(folder)}
                r = _spawn(spec)
                r["summary"] = summary(r)
                results.append(r)
                load.append(os.getloadavg()[0])
                print(json.dumps(r["summary"]), flush=True)
    rep = {"made_by": "python -m benchmarks.frozen_cache_alternating " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
           "cores": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
           "optimizer_impl": "torch AdamW, per-tensor loop (foreach=False)" if args.optimizer_impl == "loop"
           else "edgeft tune's (fused AdamW)",
           "load_average_1m": [round(x, 1) for x in load],
           "shared_machine": "2 cores shared with 6 other helpers' tests, benchmarks and builds (loaded)",
           "results": results}
    name = "frozen_cache_alternating" + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
