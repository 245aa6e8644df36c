"""``TuneConfig``: everything one ``edgeft tune`` run needs, validated on construction.

The config is saved as ``config.json`` in the run folder (and in the unfinished
``OUT.partial`` folder, so ``--resume`` can check it continues the same run). It knows
nothing of torch; the choices are str-valued Enums so the CLI lists them in ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError


class Precision(str, Enum):
    int8 = "int8"  # bitsandbytes LLM.int8 for the frozen Linear layers
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


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


# Settings that may differ between an interrupted run and its --resume.
RESUME_FREE = ("resume", "overwrite", "progress", "threads", "frozen_cache", "keep_cache")


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run. Paths are resolved when the config is made."""

    model: str
    """Base model: a pulled name, a local Hugging Face folder or a hub id."""
    data: Path
    """Training data: .csv/.tsv/.jsonl/.json (columns) or .txt (plain text)."""
    out: Path
    """Run folder to write."""
    task: Task | None = None
    """causal-lm or classification; None: decided from the data when the run starts."""
    eval_data: Path | None = None
    """Evaluation data; without it a held-out split of ``data`` (``eval_fraction``, seeded)."""
    eval_fraction: float = 0.1
    text_col: str | None = None
    label_col: str | None = None
    trainable_layers: int = 2
    """Top transformer blocks trained (with the final norm and the head); the rest is frozen."""
    base_precision: Precision = Precision.int8
    train_embeddings: bool = False
    """Also train the token embeddings (for full fine-tuning comparisons); off by default."""
    untie_head: bool = False
    """With tied embeddings, train a separate copy of the LM head (saved as lm_head.weight)."""
    max_length: int | None = None
    """Tokens per example / block; default 128 for classification, 256 for causal-lm."""
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when given."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    """Warmup: a fraction of the steps when < 1, else a number of steps."""
    schedule: Schedule = Schedule.cosine
    optimizer: Optim = Optim.adamw
    max_grad_norm: float = 1.0
    class_weights: ClassWeights = ClassWeights.none
    eval_every: int = 0
    """Evaluate (and keep the best) every N optimizer steps; 0: at the end of each epoch."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps; 0: at every evaluation."""
    patience: int = 0
    """Stop after this many evaluations without improvement; 0: never stop early."""
    select_metric: SelectMetric = SelectMetric.auto
    """What the best evaluation is judged by; auto: macro F1 for imbalanced labels, else accuracy (loss for causal-lm)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding); the order is still seeded."""
    eval_batch_size: int = 32
    max_eval_examples: int | None = None
    gradient_checkpointing: bool = False
    frozen_cache: FrozenCache = FrozenCache.auto
    """Run the frozen blocks once per example: their output is cached on disk (OUT.partial/frozen-cache)
    at the first pass and fed to the top blocks afterwards. auto: on when training makes more than one
    pass over the data and the disk has room; off whenever something below the top blocks trains."""
    keep_cache: bool = False
    """Keep the frozen cache when the run finishes (as OUT.frozen-cache, reused by a later run of OUT)."""
    seed: int = 0
    device: Device = Device.auto
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "out", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().resolve())
        if self.task is not None:
            task = None if self.task == "auto" else _enum(Task, self.task, "task")  # "auto": the old spelling of None
            object.__setattr__(self, "task", task)
        for name, enum in (("base_precision", Precision), ("optimizer", Optim),
                           ("schedule", Schedule), ("class_weights", ClassWeights), ("device", Device),
                           ("select_metric", SelectMetric), ("frozen_cache", FrozenCache)):
            object.__setattr__(self, name, _enum(enum, getattr(self, name), name))
        self._validate()

    def _validate(self) -> None:
        positive = ("trainable_layers", "batch_size", "grad_accum", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise EdgeftError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_length", "threads", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EdgeftError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_length is not None and self.max_length < 8:
            raise EdgeftError(f"max-length must be at least 8, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise EdgeftError(f"eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.epochs <= 0:
            raise EdgeftError(f"epochs must be positive, got {self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0 or self.max_grad_norm < 0:
            raise EdgeftError("lr must be positive; weight-decay, warmup and max-grad-norm not negative")
        if min(self.eval_every, self.checkpoint_every, self.patience) < 0:
            raise EdgeftError("eval-every, checkpoint-every and patience must not be negative")
        if self.task is Task.causal_lm and self.select_metric in (SelectMetric.accuracy, SelectMetric.macro_f1):
            raise EdgeftError(f"select-metric {self.select_metric.value} is for classification; causal-lm uses loss")
        if self.resume and self.overwrite:
            raise EdgeftError("--resume and --overwrite contradict each other: choose one")

    @property
    def partial(self) -> Path:
        """Where an unfinished run lives (checkpoints included) until it is complete."""
        return self.out.with_name(self.out.name + ".partial")

    @property
    def kept_cache(self) -> Path:
        """Where ``--keep-cache`` leaves the frozen cache of a finished run."""
        return self.out.with_name(self.out.name + ".frozen-cache")

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


def _enum(enum: type[Enum], value: Any, name: str) -> Enum:
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise EdgeftError(f"{name.replace('_', '-')}: {value!r} is not one of {allowed}") from None
