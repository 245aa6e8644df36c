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
``benchmarks.multi_decoder_classifier`` runs the same measurement on four SmolLM2 decoder
classifiers (``Family``, ``run_case``).

Two worker processes, each measuring one side alone (its own resident memory):
- ``one``: the first model alone, ``predict_proba`` over the texts (its memory);
- ``four``: the four models loaded together (one shared trunk session), and in alternating
  rounds (the order turns each round, so the machine's load falls on all three alike), at the
  same batch size: the first model alone (``predict_proba``), the four in one call
  (``classify_many``: the trunk once per batch) and the four one after another (``predict_proba``
  each: what four separate models cost, the trunk four times).
Figures: seconds per pass (median over the rounds, after one unmeasured pass of each), each
four-model figure against the one-model figure of the same rounds (and round by round), resident
memory after loading and after the passes (VmRSS) and the peak. Goals (issue 29): four with
``classify_many`` at most 2.2x one alone (four one after another: ~4x); memory of four against
one is reported.

Two more workers time loading the second model (what ``POST /v1/models/load`` does: open it,
every byte checked): ``add`` into a process that already holds the first (its trunk session
reused), ``alone`` into a process that holds nothing. Both first open one session of the first
model's top graph and drop it, so neither pays onnxruntime's one-time start-up. Figures: seconds
and the VmRSS the load added, one load each; goal (issue 29): ``add`` < 0.3x ``alone`` in both.
"""

from __future__ import annotations

import csv
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "multi_classifier"
ADD, ALONE = "load one more model, trunk already loaded", "load that model alone"
GOAL_ADD = 0.3
ONE, MANY, SEQ = "one MiniLM classifier", "four, classify_many (one trunk pass)", "four, one after another"
GOAL_TIME = 2.2
BATCH = 32
REPO = prepare.REPO
# name: (shared file, repository file, text column, label column); a derived set (``DERIVED``) is made from its file
DATA = {
    "sst2": (("sst2", "train.tsv"), "demo/sst2_2k.csv", None, None),
    "sst2-slice": (("sst2", "dev.tsv"), "tests/data/sst2_dev_400.tsv", None, None),
    "trec-coarse": (("trec", "train.tsv"), "tests/data/trec_test_300.tsv", "text", "coarse_label"),
    "trec-person": (("trec", "train.tsv"), "tests/data/trec_test_300.tsv", None, None),  # derived: _person
    "trec-fine": (("trec", "train.tsv"), "tests/data/trec_test_300.tsv", "text", "fine_label"),
    "sst2-length": (("sst2", "train.tsv"), "tests/data/sst2_dev_400.tsv", None, None),  # derived: _length
}
MINILM = ("sst2", "sst2-slice", "trec-coarse", "trec-person")  # this case's four data sets


@dataclass(frozen=True)
class Family:
    """Four classifiers of one base, as a case measures them (``run_case``)."""

    case: str
    one: str  # the system name of one model alone
    goal: float  # four in one call: at most this many times one alone
    what: str  # the four models, for the note


MINILM_FAMILY = Family(CASE, ONE, GOAL_TIME, "four MiniLM-L6 top-2 runs")


def _rows(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE
                                  if path.suffix == ".tsv" else csv.QUOTE_MINIMAL)


def _write(name: str, rows: list[tuple[str, str]]) -> Path:
    out = prepare.WORK / "data" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as dst:
        w = csv.writer(dst)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return out


def _person(trec: Path) -> Path:
    """TREC questions labelled ``person`` (coarse class HUM) or ``other``: a binary task of its own."""
    return _write(f"trec-person-{trec.stem}.csv",
                  [(r["text"], "person" if r["coarse_label"] == "HUM" else "other") for r in _rows(trec)])


def length_label(text: str) -> str:
    """A sentence's length as a label: ``short`` (under 10 words), ``medium`` (under 20) or ``long``."""
    n = len(text.split())
    return "short" if n < 10 else "medium" if n < 20 else "long"


def _length(sst2: Path) -> Path:
    """SST-2 sentences labelled by their length (``length_label``), not their sentiment: a task of its own."""
    rows = [(t, length_label(t)) for r in _rows(sst2) if (t := (r.get("sentence") or r.get("text") or "").strip())]
    return _write(f"sst2-length-{sst2.stem}.csv", rows)


DERIVED: dict[str, Callable[[Path], Path]] = {"trec-person": _person, "sst2-length": _length}


def data_path(name: str) -> Path:
    """Data set ``name``'s tuning file: the shared file, else the repository's slice (derived sets written once)."""
    shared, repo, *_ = DATA[name]
    try:
        path = prepare.data_file(*shared)
    except prepare.Unavailable:
        path = REPO / repo
    return DERIVED[name](path) if name in DERIVED else path


def slice_tag(name: str) -> str:
    """``"-slice"`` where data set ``name`` comes from the repository's slice (no shared data here), else
    ``""``: a cache name's part, so a run tuned on a slice never stands in for one tuned on the shared file."""
    try:
        prepare.data_file(*DATA[name][0])
    except prepare.Unavailable:
        return "-slice"
    return ""


def column_flags(name: str) -> list[str]:
    """``--text-column`` / ``--label-column`` where data set ``name``'s columns are not found by name."""
    _s, _r, text_col, label_col = DATA[name]
    return (["--text-column", text_col] if text_col else []) + (["--label-column", label_col] if label_col else [])


def texts(n: int) -> list[str]:
    """``n`` sentences: SST-2 and TREC rows interleaved (the repository's slices where the shared data is absent)."""
    sources = [data_path("sst2-slice"), data_path("trec-coarse")]
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


def alternate(passes: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``passes`` per round: one unmeasured pass of each first, then ``rounds`` rounds
    of one pass each, the order turned by one every round (so no pass always follows the same one)."""
    names = list(passes)
    for name in names:
        passes[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            passes[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def measure(spec: dict) -> dict:
    """One side (``spec["side"]``: one, four, add or alone) in this worker process."""
    if spec["side"] in ("add", "alone"):
        return measure_load(spec)
    from edgeft.bench import peak_rss_mib
    from edgeft.runtime import TextClassifier
    from edgeft.runtime.classify import classify_many
    from edgeft.runtime.trunks import loaded

    sample, batch = texts(spec["texts"]), spec.get("batch", BATCH)
    base = _vm_rss_mib()
    paths = spec["paths"][:1] if spec["side"] == "one" else spec["paths"]
    models = [TextClassifier.open(p, threads=spec["threads"]) for p in paths]
    out = {"loaded_rss_mib": _vm_rss_mib(), "base_rss_mib": base, "texts": len(sample),
           "trunks": len(loaded()), "models": len(models)}
    one = lambda: models[0].predict_proba(sample, batch)  # noqa: E731
    if spec["side"] == "one":  # its memory; the time is the four side's, in the same rounds as the four
        one()
    else:
        out["seconds"] = alternate({"one": one, "many": lambda: classify_many(models, sample, batch),
                                    "seq": lambda: [m.predict_proba(sample, batch) for m in models]},
                                   spec["repeats"])
        alone = [m.classify(sample[:50], batch) for m in models]
        out["equal_to_alone"] = classify_many(models, sample[:50], batch) == alone
    out["after_rss_mib"], out["peak_rss_mib"] = _vm_rss_mib(), peak_rss_mib()
    return out


def _artifacts(ctx: Context) -> list[Path]:
    from benchmarks.cases import TUNE_FLAGS

    steps = 20 if ctx.quick else ctx.classifier_steps
    prepare.ensure_model(prepare.ENCODER)
    arts = []
    for i, name in enumerate(MINILM):
        run = prepare.ensure_tuned(f"minilm-{name}-top2-{steps}", [
            "--model", prepare.ENCODER, "--task", "classification", "--data", str(data_path(name)),
            *column_flags(name), "--trainable-layers", "2", *TUNE_FLAGS, "--max-steps", str(steps), "--seed", str(i)])
        arts.append(prepare.ensure_exported(f"minilm-{name}-top2-{steps}-split-int8", run, "int8",
                                            ["--int8-mode", "dynamic", "--gate-texts", "200"]))
    return arts


def case(ctx: Context) -> None:
    run_case(ctx, MINILM_FAMILY, _artifacts(ctx), f"({', '.join(MINILM)}) exported int8 dynamic and split at the "
                                                  "freeze boundary")


def run_case(ctx: Context, fam: Family, arts: list[Path], how: str) -> None:
    """Measure ``arts`` (four split artifacts of one base) as ``fam``: its gates, then (unless
    ``BENCH_PREPARE_ONLY``) the one/four workers and the load workers, and their rows."""
    import json

    from benchmarks.cases import WorkerFailed, record_gate

    digests = {json.loads((a / "manifest.json").read_text()).get("trunk", {}).get("sha256") for a in arts}
    for a in arts:
        record_gate(ctx, fam.case, a.name, a)
    if os.environ.get("BENCH_PREPARE_ONLY"):  # tune and export now (a loaded machine is fine), measure later
        return
    texts = int(os.environ.get("BENCH_MULTI_TEXTS") or (200 if ctx.quick else 1000))  # speed needs no long tuning
    spec = {"paths": [str(a) for a in arts], "texts": texts, "batch": BATCH, "repeats": 2 if ctx.quick else ctx.repeats}
    try:
        one = ctx.measure(fam.case, side="one", **spec)
        four = ctx.measure(fam.case, side="four", **spec)
        add = ctx.measure(fam.case, side="add", **spec)
        alone = ctx.measure(fam.case, side="alone", **spec)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    note = (f"{fam.case}: {four['texts']} texts, batch {BATCH}, {ctx.threads} threads; {fam.what} {how}; "
            f"{len(digests)} distinct trunk(s) on disk, {four['trunks']} trunk session(s) loaded for four models; "
            f"classify_many equal to each model alone: {four['equal_to_alone']}")
    time_rows(ctx, fam, four["seconds"], note)
    memory_rows(ctx, fam, one, four)
    load_rows(ctx, fam.case, add, alone,
              f"one load each, every byte checked; trunk session reused: {add['shared_session']}")


def time_rows(ctx: Context, fam: Family, seconds: dict[str, list[float]], note: str) -> None:
    """Seconds per pass of one model, four in one call and four one after another (the same rounds), and
    each four-model figure against one model's: the ratio of the medians, round by round in the note."""
    from edgeft.bench import summarize

    rounds = len(seconds["one"])
    t_one = summarize(seconds["one"])
    ctx.add(fam.case, fam.one, "seconds", t_one, "s", higher=False, note=note)
    for key, system in (("many", MANY), ("seq", SEQ)):
        ctx.add(fam.case, system, "seconds", summarize(seconds[key]), "s", higher=False)
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(seconds[key], seconds["one"]))
        goal = f"goal <= {fam.goal}x one model alone; " if key == "many" else ""
        ctx.add(fam.case, system, "time_vs_one", summarize(seconds[key]).median / t_one.median, "x", higher=False,
                note=f"{system}: {goal}median over {rounds} alternating rounds against one model in the same "
                     f"rounds; round by round: {per_round}")


def memory_rows(ctx: Context, fam: Family, one: dict, four: dict) -> None:
    for key in ("loaded_rss_mib", "after_rss_mib", "peak_rss_mib"):
        ctx.add(fam.case, fam.one, key, one[key], "MiB", higher=False)
        ctx.add(fam.case, MANY, key, four[key], "MiB", higher=False)
    ctx.add(fam.case, MANY, "rss_vs_one", four["after_rss_mib"] / one["after_rss_mib"], "x", higher=False,
            note="resident memory after the passes, four models loaded against one (whole process, Python included)")
    loaded_one = one["loaded_rss_mib"] - one["base_rss_mib"]
    loaded_four = four["loaded_rss_mib"] - four["base_rss_mib"]
    ctx.add(fam.case, MANY, "load_rss_vs_one", loaded_four / max(loaded_one, 1e-9), "x", higher=False,
            note="memory the loading itself added (VmRSS after opening the models less before)")


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
