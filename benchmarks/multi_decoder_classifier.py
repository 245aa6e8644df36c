"""Case ``multi_decoder_classifier``: four SmolLM2 decoder classifiers of one base over the same texts, one trunk pass.

    BENCH_PREPARE_ONLY=1 python -m benchmarks.run --cases multi_decoder_classifier   # tune and export only (cached)
    python -m benchmarks.run --cases multi_decoder_classifier                        # then measure, on a quiet machine
    BENCH_QUICK=1 python -m benchmarks.run --cases multi_decoder_classifier          # a smoke run (200 texts, 2 rounds)

``multi_classifier``'s measurement (``benchmarks.multi_classifier.run_case``) on decoders: four
SmolLM2-135M-Instruct runs, each ``edgeft tune --task classification -n 4`` (top 4 of 30 blocks
over the int8 base, a score head on the last real token) on a different labelled task from
``../shared/data`` (``TASKS``: SST-2 sentiment, TREC's coarse and its fine question classes,
SST-2 sentences by length; ``$EDGEFT_SHARED_DATA`` moves it), else the repository's slices
(cached under names of their own). The tuning is short (``STEPS`` steps of 8 texts, the same in
a quick run, so a quick run measures the prepared models): quality is not the point, only that
each model has a top of its own above one frozen base (so each run is evaluated, and its export
gated, on rows of its own tuning file: a held-out split of a small slice can hold a label the
rest lacks, which ``edgeft tune`` refuses). Each is exported int8 with ``--int8-mode dynamic``
(the same quantization for all four) split at ``--trunk-blocks 26`` (the freeze boundary), so
the four trunks are byte-identical and load as one session.

Texts and rounds as in ``multi_classifier``: 1,000 SST-2 dev and TREC sentences (quick: 200;
``BENCH_MULTI_TEXTS`` sets the count), batch 32; in alternating rounds the first model alone,
the four in one call (``classify_many``: the trunk once per batch) and the four one after
another; each four-model figure against one model's of the same rounds. Goal (issue 29): the
four in one call at most 1.5x one alone. Memory of four against one and the load-one-more rows
as there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import prepare
from benchmarks.multi_classifier import Family, column_flags, data_path, measure, run_case, slice_tag  # noqa: F401 - measure: the workers'
from benchmarks.multi_decoder import LAYERS, TOP, TRUNK_BLOCKS  # noqa: F401 - LAYERS: what TOP and TRUNK_BLOCKS split

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "multi_decoder_classifier"
ONE = "one SmolLM2-135M classifier"
GOAL_TIME = 1.5
STEPS, MAX_LENGTH = 20, 64
# the four tasks (multi_classifier.DATA names): sentiment, question class coarse and fine, sentence length
TASKS = ("sst2", "trec-coarse", "trec-fine", "sst2-length")


def family() -> Family:
    return Family(CASE, ONE, GOAL_TIME,
                  f"four SmolLM2-135M-Instruct classifiers (a score head on the last real token) tuned top-{TOP} "
                  f"for {STEPS} steps of 8 texts (short: quality is not the point)")


def artifact(ctx: Context, i: int) -> Path:
    """Task ``i``'s run, exported int8 (dynamic) and split at ``TRUNK_BLOCKS`` (cached)."""
    name, data = TASKS[i], str(data_path(TASKS[i]))
    tag = f"smollm2-cls-{name}{slice_tag(name)}-top{TOP}-{STEPS}"
    run = prepare.ensure_tuned(tag, [  # evaluated on its own rows: no held-out split to lack a rare label
        "--model", prepare.LM, "--task", "classification", "--data", data, "--eval-data", data, *column_flags(name),
        "--trainable-layers", str(TOP), "--max-length", str(MAX_LENGTH), "--batch-size", "8", "--lr", "5e-4",
        "--max-steps", str(STEPS), "--max-eval-examples", "64", "--eval-batch-size", "16",
        "--threads", str(ctx.threads), "--no-progress", "--seed", str(i)])
    return prepare.ensure_exported(f"{tag}-split{TRUNK_BLOCKS}-int8", run, "int8", [
        "--int8-mode", "dynamic", "--trunk-blocks", str(TRUNK_BLOCKS), "--gate-texts", "64",
        "--threads", str(ctx.threads), "--no-progress"])


def case(ctx: Context) -> None:
    prepare.ensure_model(prepare.LM)
    arts = [artifact(ctx, i) for i in range(len(TASKS))]
    run_case(ctx, family(), arts, f"on {', '.join(TASKS)}, exported int8 dynamic and split at --trunk-blocks "
                                  f"{TRUNK_BLOCKS}")
