"""Case ``multi_classifier``: four classifiers tuned from one base over the same texts, one trunk pass.

    python -m benchmarks.run --cases multi_classifier
    BENCH_QUICK=1 python -m benchmarks.run --cases multi_classifier     # a smoke run (200 texts, few steps)

Four MiniLM-L6 classifiers, each tuned top-2 of 6 over the int8 base (``edgeft tune
--trainable-layers 2``) on different data: SST-2 rows, another SST-2 slice, TREC's coarse
question classes and TREC questions as about a person or not (``../shared/data`` where present,
else the repository's ``demo/sst2_2k.csv`` and ``tests/data`` slices), exported int8 with ``--int8-mode dynamic``
(the same quantization for all four, so their trunks, the embeddings and the four frozen
blocks, are byte-identical: split at the default boundary, the runs' frozen count). Texts:
1,000 SST-2 dev and TREC sentences (a quick run: 200; ``BENCH_MULTI_TEXTS`` sets the count, so a
quick run's briefly tuned models can be timed on 1,000: the time does not depend on how well they learnt).

Two worker processes, each measuring one side alone (its own resident memory):
- ``one``: the first model alone, ``predict_proba`` over the texts;
- ``four``: the four models loaded together (one shared trunk session), ``classify_many`` over
  the same texts, and, alternating with it, the four run one after another (``predict_proba``
  each: what four separate models cost, the trunk four times).
Figures: seconds per pass (median of repeats after a warm-up), resident memory after loading
and after the passes (VmRSS) and the peak. Goals (issue 29): four with ``classify_many`` at
most 2.2x one alone (four one after another: ~4x); memory of four against one is reported.

Two more workers time loading the second model (what ``POST /v1/models/load`` does: open it,
every byte checked): ``add`` into a process that already holds the first (its trunk session
reused), ``alone`` into a process that holds nothing. Both first open one session of the first
model's top graph and drop it, so neither pays onnxruntime's one-time start-up. Figures: seconds
and the VmRSS the load added, one load each; goal (issue 29): ``add`` < 0.3x ``alone`` in both.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "multi_classifier"
ADD, ALONE = "load one more model, trunk already loaded", "load that model alone"
GOAL_ADD = 0.3
ONE, MANY, SEQ = "one MiniLM classifier", "four, classify_many (one trunk pass)", "four, one after another"
GOAL_TIME = 2.2
REPO = prepare.REPO
# name: (shared file, repository file, text column, label column)
DATA = {
    "sst2": (("sst2", "train.tsv"), "demo/sst2_2k.csv", None, None),
    "sst2-slice": (("sst2", "dev.tsv"), "tests/data/sst2_dev_400.tsv", None, None),
    "trec-coarse": (("trec", "train.tsv"), "tests/data/trec_test_300.tsv", "text", "coarse_label"),
    "trec-person": (("trec", "train.tsv"), "tests/data/trec_test_300.tsv", None, None),  # derived: _person
}


def _data(name: str) -> Path:
    shared, repo, *_ = DATA[name]
    try:
        path = prepare.data_file(*shared)
    except prepare.Unavailable:
        path = REPO / repo
    return _person(path) if name == "trec-person" else path


def _person(trec: Path) -> Path:
    """TREC questions labelled ``person`` (coarse class HUM) or ``other``: a binary task of its own."""
    import csv

    out = prepare.WORK / "data" / f"trec-person-{trec.stem}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(trec, encoding="utf-8") as src, open(out, "w", newline="", encoding="utf-8") as dst:
        w = csv.writer(dst)
        w.writerow(["text", "label"])
        for row in csv.DictReader(src, delimiter="\t"):
            w.writerow([row["text"], "person" if row["coarse_label"] == "HUM" else "other"])
    return out


def texts(n: int) -> list[str]:
    """``n`` sentences: SST-2 and TREC rows interleaved (the repository's slices where the shared data is absent)."""
    sources = [_data("sst2-slice"), _data("trec-coarse")]
    rows = []
    for path in sources:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        rows.append([ln.split("\t" if path.suffix == ".tsv" else ",")[0].strip() for ln in lines if ln.strip()])
    mixed = [t for pair in zip(*rows) for t in pair if t]
    return (mixed * (n // max(1, len(mixed)) + 1))[:n]


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_load(spec: dict) -> dict:
    """Seconds and resident memory to open the second model, with the first held (``add``) or alone."""
    import onnxruntime as ort

    from edgeft.artifact import read_manifest
    from edgeft.runtime import TextClassifier

    first, second = spec["paths"][:2]
    warm = ort.InferenceSession(str(Path(first) / read_manifest(Path(first)).graph.file),
                                providers=["CPUExecutionProvider"])
    del warm  # onnxruntime's start-up paid on both sides alike
    held = [TextClassifier.open(first, threads=spec["threads"])] if spec["side"] == "add" else []
    rss, t0 = _vm_rss_mib(), time.perf_counter()
    model = TextClassifier.open(second, threads=spec["threads"])
    seconds, added = time.perf_counter() - t0, _vm_rss_mib() - rss
    shared = bool(held) and model.trunk is held[0].trunk
    return {"seconds": seconds, "rss_added_mib": added, "shared_session": shared}


def measure(spec: dict) -> dict:
    """One side (``spec["side"]``: one, four, add or alone) in this worker process."""
    if spec["side"] in ("add", "alone"):
        return measure_load(spec)
    from edgeft.bench import peak_rss_mib, summarize, timeit
    from edgeft.runtime import TextClassifier
    from edgeft.runtime.classify import classify_many
    from edgeft.runtime.trunks import loaded

    sample = texts(spec["texts"])
    base = _vm_rss_mib()
    paths = spec["paths"][:1] if spec["side"] == "one" else spec["paths"]
    models = [TextClassifier.open(p, threads=spec["threads"]) for p in paths]
    out = {"loaded_rss_mib": _vm_rss_mib(), "base_rss_mib": base, "texts": len(sample),
           "trunks": len(loaded()), "models": len(models)}
    if spec["side"] == "one":
        out["seconds"] = {ONE: summarize(timeit(lambda: models[0].predict_proba(sample, 32),
                                                spec["repeats"])).to_dict()}
    else:
        runs: dict[str, list[float]] = {MANY: [], SEQ: []}
        for _ in range(spec["repeats"]):  # alternating, so the machine's load falls on both alike
            runs[MANY] += timeit(lambda: classify_many(models, sample, 32), 1)
            runs[SEQ] += timeit(lambda: [m.predict_proba(sample, 32) for m in models], 1)
        out["seconds"] = {k: summarize(v).to_dict() for k, v in runs.items()}
        alone = [m.classify(sample[:50]) for m in models]
        out["equal_to_alone"] = classify_many(models, sample[:50]) == alone
    out["after_rss_mib"], out["peak_rss_mib"] = _vm_rss_mib(), peak_rss_mib()
    return out


def _artifacts(ctx: Context) -> list[Path]:
    from benchmarks.cases import TUNE_FLAGS

    steps = 20 if ctx.quick else ctx.classifier_steps
    prepare.ensure_model(prepare.ENCODER)
    arts = []
    for i, (name, (_s, _r, text_col, label_col)) in enumerate(DATA.items()):
        cols = (["--text-column", text_col] if text_col else []) + (["--label-column", label_col] if label_col else [])
        run = prepare.ensure_tuned(f"minilm-{name}-top2-{steps}", [
            "--model", prepare.ENCODER, "--task", "classification", "--data", str(_data(name)), *cols,
            "--trainable-layers", "2", *TUNE_FLAGS, "--max-steps", str(steps), "--seed", str(i)])
        arts.append(prepare.ensure_exported(f"minilm-{name}-top2-{steps}-split-int8", run, "int8",
                                            ["--int8-mode", "dynamic", "--gate-texts", "200"]))
    return arts


def case(ctx: Context) -> None:
    import json

    from benchmarks.cases import WorkerFailed, _stat, record_gate

    arts = _artifacts(ctx)
    digests = {json.loads((a / "manifest.json").read_text()).get("trunk", {}).get("sha256") for a in arts}
    for a in arts:
        record_gate(ctx, CASE, a.name, a)
    texts = int(os.environ.get("BENCH_MULTI_TEXTS") or (200 if ctx.quick else 1000))  # speed needs no long tuning
    spec = {"paths": [str(a) for a in arts], "texts": texts,
            "repeats": 2 if ctx.quick else ctx.repeats}
    try:
        one = ctx.measure(CASE, side="one", **spec)
        four = ctx.measure(CASE, side="four", **spec)
        add = ctx.measure(CASE, side="add", **spec)
        alone = ctx.measure(CASE, side="alone", **spec)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    note = (f"{CASE}: {four['texts']} texts, batch 32, {ctx.threads} threads; four MiniLM-L6 top-2 runs "
            f"({', '.join(DATA)}) exported int8 dynamic and split at the freeze boundary; "
            f"{len(digests)} distinct trunk(s) on disk, {four['trunks']} trunk session(s) loaded for four models; "
            f"classify_many equal to each model alone: {four['equal_to_alone']}")
    t_one = _stat(one["seconds"][ONE])
    ctx.add(CASE, ONE, "seconds", t_one, "s", higher=False, note=note)
    for system in (MANY, SEQ):
        t = _stat(four["seconds"][system])
        ctx.add(CASE, system, "seconds", t, "s", higher=False)
        ctx.add(CASE, system, "time_vs_one", t.median / t_one.median, "x", higher=False,
                note=f"{system}: goal <= {GOAL_TIME}x one model alone" if system == MANY else "")
    for key in ("loaded_rss_mib", "after_rss_mib", "peak_rss_mib"):
        ctx.add(CASE, ONE, key, one[key], "MiB", higher=False)
        ctx.add(CASE, MANY, key, four[key], "MiB", higher=False)
    ctx.add(CASE, MANY, "rss_vs_one", four["after_rss_mib"] / one["after_rss_mib"], "x", higher=False,
            note="resident memory after the passes, four models loaded against one (whole process, Python included)")
    loaded_one = one["loaded_rss_mib"] - one["base_rss_mib"]
    loaded_four = four["loaded_rss_mib"] - four["base_rss_mib"]
    ctx.add(CASE, MANY, "load_rss_vs_one", loaded_four / max(loaded_one, 1e-9), "x", higher=False,
            note="memory the loading itself added (VmRSS after opening the models less before)")
    load_rows(ctx, CASE, add, alone, f"one load each, every byte checked; trunk session reused: {add['shared_session']}")


def load_rows(ctx: Context, case: str, add: dict, alone: dict, note: str) -> None:
    """One more model loaded beside its trunk against loading it alone: seconds and memory added, and the
    ratios (goal < ``GOAL_ADD``); ``add`` and ``alone`` hold ``seconds`` and ``rss_added_mib``."""
    for system, r in ((ADD, add), (ALONE, alone)):
        ctx.add(case, system, "load_seconds", r["seconds"], "s", higher=False, note=note if r is add else "")
        ctx.add(case, system, "load_rss_added_mib", r["rss_added_mib"], "MiB", higher=False)
    ctx.add(case, ADD, "load_time_vs_alone", add["seconds"] / max(alone["seconds"], 1e-9), "x", higher=False,
            note=f"goal < {GOAL_ADD}x loading it alone")
    ctx.add(case, ADD, "load_rss_vs_alone", add["rss_added_mib"] / max(alone["rss_added_mib"], 1e-9), "x",
            higher=False, note=f"goal < {GOAL_ADD}x loading it alone")
