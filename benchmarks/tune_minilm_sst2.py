"""Case ``tune_minilm_sst2``: all-MiniLM-L6 on SST-2, top 2 of 6 blocks over an int8 base, beside full fine-tuning.

    python -m benchmarks.run --cases tune_minilm_sst2 [--tune-steps 80]     # ~10 min a variant on 2 busy cores

Each variant is one ``edgeft tune`` run in its own process (so its peak memory is its own), for
the same number of steps (the suite's ``--tune-steps``) on the same seeded batches: ``int8-top2``
trains blocks 5-6, the pooler and the classifier over an int8 frozen base; ``full`` trains
everything (embeddings included) in fp32. Recorded per variant: dev accuracy before and after (all
872 dev sentences; a quick run: the first 128), macro F1, the tune CLI's train seconds, examples/s
and peak memory, and the wall time of the whole command. The goal (88% dev accuracy for top-2 over
int8) is in ``benchmarks.headline``. Earlier runs of the script this case replaces are kept as they
were written: ``results/tune_minilm_sst2*.json``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "tune_minilm_sst2"
# variant -> (system name, learning rate, edgeft tune flags; ALL: every block of the model)
ALL = "all"
VARIANTS = {
    "int8-top2": ("edgeft tune top-2 over int8", 5e-4, ["--trainable-layers", "2", "--base-precision", "int8"]),
    "full": ("full fine-tuning (fp32)", 1e-4,
             ["--trainable-layers", ALL, "--base-precision", "fp32", "--train-embeddings"]),
}
TOP2 = VARIANTS["int8-top2"][0]  # the goal's system
QUICK_EVAL = 128  # dev sentences a quick run evaluates on


def case(ctx: Context) -> None:
    steps = ctx.tune_steps
    train, dev = prepare.data_file("sst2", "train.tsv"), prepare.data_file("sst2", "dev.tsv")
    model = prepare.ensure_model(prepare.ENCODER)
    blocks = str(json.loads((model / "config.json").read_text())["num_hidden_layers"])
    for variant, (system, lr, flags) in VARIANTS.items():
        flags = [blocks if f == ALL else f for f in flags]
        name = f"{CASE}-{variant}-{steps}{'-quick' if ctx.quick else ''}"
        args = ["--model", prepare.ENCODER, "--task", "classification", "--data", str(train),
                "--eval-data", str(dev), *flags, "--max-length", "64", "--batch-size", "32", "--lr", str(lr),
                "--warmup", "0.1", "--eval-batch-size", "64", "--max-steps", str(steps), "--seed", "0",
                "--threads", str(ctx.threads), "--no-progress",
                *(["--max-eval-examples", str(QUICK_EVAL)] if ctx.quick else [])]
        try:
            run = prepare.ensure_tuned(name, args, fresh=True)
            record(ctx, system, run, prepare.logged_seconds("tune", name), lr)
        except prepare.Unavailable as exc:
            ctx.res.skip(CASE, system, str(exc))


def record(ctx: Context, system: str, run, wall_s: float | None, lr: float) -> None:
    """The figures of one variant's run folder (its metrics.json), as measurements of this case."""
    m = prepare.run_metrics(run)
    before, after = m["before"], m["after"]
    dataset = "sst2-dev" if not ctx.quick else f"sst2-dev (first {QUICK_EVAL})"
    note = (f"{system}: {m['steps']} steps of 32, lr {lr:g}, max length 64, one `edgeft tune` process "
            f"per variant; figures from its metrics.json")
    ctx.add(CASE, system, "accuracy", 100 * after["accuracy"], "%", dataset=dataset, note=note)
    ctx.add(CASE, system, "accuracy_before", 100 * before["accuracy"], "%", dataset=dataset)
    ctx.add(CASE, system, "macro_f1", after["macro_f1"], "F1", dataset=dataset)
    ctx.add(CASE, system, "train_s", m["train_seconds"], "s", higher=False)
    if wall_s is not None:
        ctx.add(CASE, system, "wall_s", wall_s, "s", higher=False)
    ctx.add(CASE, system, "examples_per_s", m["examples_per_s"], "examples/s")
    ctx.add(CASE, system, "peak_mb", m["peak_memory_mb"], "MB", higher=False)
    ctx.add(CASE, system, "trainable_m", m["trainable_parameters"] / 1e6, "M params", higher=False)
    cm = after.get("confusion_matrix")
    if cm:
        ctx.res.notes.append(f"{CASE}: {system}'s confusion matrix on {dataset} (rows: true "
                             f"{', '.join(cm['labels'])}): {cm['matrix']}")
