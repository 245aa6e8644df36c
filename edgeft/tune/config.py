"""``TuneConfig``: everything one ``edgeft tune`` run needs, validated on construction.

The config is saved as ``config.json`` in the run folder (and in the unfinished
``OUT.partial`` folder, so ``--resume`` can check it continues the same run). It knows
nothing of torch; the choices are str-valued Enums so the CLI lists them in ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, enum_value, flag


class Precision(str, Enum):
    int8 = "int8"  # 8-bit frozen Linear layers: bitsandbytes LLM.int8 on CUDA, edgeft's int8 rows on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Int8Kernel(str, Enum):
    auto = "auto"  # bitsandbytes on CUDA, edgeft's int8 rows on CPU
    edgeft = "edgeft"  # edgeft.tune.int8: rows quantized as the checkpoint is read (CPU or CUDA)
    bitsandbytes = "bitsandbytes"  # bitsandbytes LLM.int8 (on CPU it holds more memory than an fp32 base)


class Optim(str, Enum):
    adamw = "adamw"
    adamw8bit = "adamw8bit"  # bitsandbytes' 8-bit AdamW


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class ClassWeights(str, Enum):
    none = "none"
    balanced = "balanced"  # n / (classes * count): rare labels weigh more


class SelectMetric(str, Enum):
    auto = "auto"  # classification: macro_f1 when the labels are imbalanced, else accuracy; causal-lm: loss
    accuracy = "accuracy"
    macro_f1 = "macro_f1"
    loss = "loss"


class FrozenCache(str, Enum):
    auto = "auto"  # on when training makes more than one pass over the data and the disk has room
    on = "on"
    off = "off"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# --help panels of edgeft tune.
DATA, MODEL, TRAIN = "Data", "Model", "Training"

# Settings that may differ between an interrupted run and its --resume.
RESUME_FREE = ("resume", "overwrite", "progress", "threads", "frozen_cache", "keep_cache")


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run. Paths are resolved when the config is made."""

    model: str = field(metadata=flag("--model", "-m", panel=MODEL))
    """Base model: a pulled name (smollm2-135m-instruct, minilm-l6), a Hugging Face folder or a hub id."""
    data: Path = field(metadata=flag("--data", "-d", panel=DATA))
    """Training data: .csv/.tsv/.jsonl/.json with columns, or plain .txt."""
    out: Path = field(metadata=flag("--out", "-o"))
    """Run folder to write (refused if it exists, unless --overwrite)."""
    task: Task | None = None
    """causal-lm or classification [default: classification when the data has a label column, else causal-lm]."""
    eval_data: Path | None = field(default=None, metadata=flag(panel=DATA))
    """Evaluation data; without it a seeded held-out split of --data."""
    eval_fraction: float = field(default=0.1, metadata=flag(panel=DATA, above=0, below=1))
    """Held-out fraction when there is no --eval-data."""
    text_column: str | None = field(default=None, metadata=flag(panel=DATA))
    """Text column (default: detected by name)."""
    label_column: str | None = field(default=None, metadata=flag(panel=DATA))
    """Label column (default: detected by name)."""
    pair_column: str | None = field(default=None, metadata=flag(panel=DATA))
    """Second text column of a pair classifier (NLI, duplicates, relevance); default: a pair found by name
    (sentence1/sentence2, premise/hypothesis, question/answer, query/passage, text/text_pair)."""
    max_length: int | None = field(default=None, metadata=flag(panel=DATA, min=8))
    """Tokens per example or text block (default: 128 for classification, 256 for causal-lm); longer text is
    truncated with one warning."""
    max_eval_examples: int | None = field(default=None, metadata=flag(panel=DATA, min=1))
    """Evaluate on at most this many examples/blocks."""
    trainable_layers: int = field(default=2, metadata=flag("--trainable-layers", "-n", panel=MODEL, min=1))
    """Top transformer blocks to train, with the final norm and the head."""
    base_precision: Precision = field(default=Precision.int8, metadata=flag(panel=MODEL))
    """Precision of the frozen part: int8 is bitsandbytes LLM.int8 on CUDA; on CPU int8 rows quantized as the
    checkpoint is read (no full-precision copy of them, no bitsandbytes)."""
    int8_kernel: Int8Kernel = field(default=Int8Kernel.auto, metadata=flag(panel=MODEL))
    """Which 8-bit layers an int8 base uses: auto is bitsandbytes LLM.int8 on CUDA and edgeft's int8 rows on CPU
    (bitsandbytes' CPU path holds more memory than an fp32 base)."""
    untie_head: bool = field(default=False, metadata=flag(panel=MODEL))
    """Train a tied LM head as its own copy, saved as lm_head.weight (default: a tied head stays frozen with the
    embeddings)."""
    train_embeddings: bool = field(default=False, metadata=flag(panel=MODEL))
    """Also train the embeddings (full fine-tuning with -n = all blocks and fp32)."""
    epochs: float = field(default=1.0, metadata=flag(panel=TRAIN, above=0))
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = field(default=None, metadata=flag(panel=TRAIN, min=1))
    """Optimizer steps; overrides --epochs."""
    batch_size: int | None = field(default=None, metadata=flag("--batch-size", "-b", panel=TRAIN, min=1))
    """Examples per micro-batch, in all (under torchrun each process takes its share); default: 32 for classification,
    16 for causal-lm."""
    grad_accum: int = field(default=1, metadata=flag(panel=TRAIN, min=1))
    """Micro-batches per optimizer step."""
    lr: float | None = field(default=None, metadata=flag(panel=TRAIN, above=0))
    """Peak learning rate (default: 0.0001 for classification, 0.0001 for causal-lm)."""
    weight_decay: float = field(default=0.01, metadata=flag(panel=TRAIN, min=0))
    """AdamW weight decay (not on biases and norms)."""
    warmup: float = field(default=0.06, metadata=flag(panel=TRAIN, min=0))
    """Warmup: fraction of steps if < 1, else steps."""
    schedule: Schedule = field(default=Schedule.cosine, metadata=flag(panel=TRAIN))
    """Decay after warmup."""
    optimizer: Optim = field(default=Optim.adamw, metadata=flag(panel=TRAIN))
    """adamw or bitsandbytes' 8-bit adamw8bit."""
    max_grad_norm: float = field(default=1.0, metadata=flag(panel=TRAIN, min=0))
    """Gradient clipping norm (0: off)."""
    class_weights: ClassWeights = field(default=ClassWeights.none, metadata=flag(panel=TRAIN))
    """balanced: weigh rare labels up in the loss."""
    eval_every: int = field(default=0, metadata=flag(panel=TRAIN, min=0))
    """Evaluate every N steps and keep the best (0: each epoch)."""
    checkpoint_every: int = field(default=0, metadata=flag(panel=TRAIN, min=0))
    """Checkpoint every N steps (0: at each evaluation)."""
    patience: int = field(default=0, metadata=flag(panel=TRAIN, min=0))
    """Stop after N evaluations without improvement (0: off)."""
    select_metric: SelectMetric = field(default=SelectMetric.auto, metadata=flag(panel=TRAIN))
    """What picks the best evaluation. auto: macro_f1 when the labels are imbalanced (the most common over 1.5x
    the rarest), else accuracy; loss for causal-lm."""
    group_by_length: bool = field(default=True, metadata=flag(panel=TRAIN))
    """Batch examples of similar length together (less padding, seeded order)."""
    eval_batch_size: int = field(default=32, metadata=flag(panel=TRAIN, min=1))
    """Examples per evaluation batch."""
    gradient_checkpointing: bool = field(default=False, metadata=flag(panel=TRAIN))
    """Recompute activations of trained blocks in backward (less memory)."""
    frozen_cache: FrozenCache = field(default=FrozenCache.auto, metadata=flag(panel=TRAIN))
    """Run the frozen blocks once per example: their output is cached on disk in OUT.partial and fed to the
    top blocks from the second pass on (and to every evaluation after the first). auto: on when training makes
    more than one pass and the disk has room; always off when something below the top blocks trains."""
    keep_cache: bool = field(default=False, metadata=flag(panel=TRAIN))
    """Keep the frozen cache after the run (OUT.frozen-cache; a later run of OUT reuses it when nothing it
    depends on changed)."""
    seed: int = field(default=0, metadata=flag(panel=TRAIN))
    """Seed for the split, the data order, the new head and dropout."""
    device: Device = Device.auto
    """auto: CUDA when visible (bf16 autocast), else CPU."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """CPU threads for torch (default: torch's choice)."""
    resume: bool = False
    """Continue an interrupted run from OUT.partial's last checkpoint."""
    overwrite: bool = False
    """Replace an existing OUT (and discard OUT.partial)."""
    progress: bool = True
    """Show the progress bar."""

    def __post_init__(self) -> None:
        for name in ("data", "out", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().resolve())
        if self.task is not None:
            object.__setattr__(self, "task", enum_value(Task, self.task, "--task"))
        for name, enum in (("base_precision", Precision), ("optimizer", Optim),
                           ("schedule", Schedule), ("class_weights", ClassWeights), ("device", Device),
                           ("select_metric", SelectMetric), ("frozen_cache", FrozenCache), ("int8_kernel", Int8Kernel)):
            object.__setattr__(self, name, enum_value(enum, getattr(self, name), "--" + name.replace("_", "-")))
        check_fields(self)
        self._validate()

    def _validate(self) -> None:
        """What no one field's range says (each range is declared on its field)."""
        if self.task is Task.causal_lm and self.select_metric in (SelectMetric.accuracy, SelectMetric.macro_f1):
            raise EdgeftError(f"select-metric {self.select_metric.value} is for classification; causal-lm uses loss")
        if self.resume and self.overwrite:
            raise EdgeftError("--resume and --overwrite contradict each other: choose one")

    def for_task(self, task: Task) -> TuneConfig:
        """This config for ``task``, every setting left unset taking the task's default (``task_defaults``)."""
        unset = {k: v for k, v in task_defaults(task).items() if getattr(self, k) is None}
        return dataclasses.replace(self, task=task, **unset)

    @property
    def partial(self) -> Path:
        """Where an unfinished run lives (checkpoints included) until it is complete."""
        return self.out.with_name(self.out.name + ".partial")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
            elif isinstance(v, Path):
                d[k] = str(v)
        return d

    def same_run(self, other: dict[str, Any]) -> list[str]:
        """Names of the settings that differ from a saved config (ignoring resume-free ones)."""
        mine = self.to_dict()
        return [k for k in mine if k not in RESUME_FREE and other.get(k) != mine[k]]


def task_defaults(task: Task) -> dict[str, Any]:
    """The defaults that depend on the task: the one rule, for every model.

    Both tasks take a peak learning rate of 1e-4: on the whole of SST-2 it beat 3e-4 with every
    seed tried, though 3e-4 won on a subset (benchmarks/results/sst2_sweep.md); for a causal LM
    it leaves a pretrained model's style intact. Classification batches 32 texts; 128 tokens
    cost nothing for shorter texts, since a batch is padded only to its longest example.
    """
    if task is Task.classification:
        return {"max_length": 128, "lr": 1e-4, "batch_size": 32}
    return {"max_length": 256, "lr": 1e-4, "batch_size": 16}

