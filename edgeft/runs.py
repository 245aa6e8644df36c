"""The run folder: what ``edgeft tune`` writes and ``edgeft export`` reads.

A run folder holds only what training changed, plus what is needed to rebuild the
model from its base:

- ``trained.safetensors``: the trained parameters, named as in the base model's
  ``state_dict()`` for the task's ``AutoModelFor...`` class (full precision).
- ``run.json``: ``RunInfo`` below (base reference and hash, task, labels, trained names).
- ``config.json``: the resolved ``TuneConfig``; ``metrics.json``; ``log.jsonl``;
  ``loss.png``; the tokenizer files; ``labels.json`` for classification.

This module owns the folder's file names and its JSON files: ``tune`` writes them with
``write_run`` (the tensors, tokenizer and plot it writes itself, under these names), and
``read_run``, ``read_run_config``, ``read_metrics`` and ``summary`` read them back. It
imports only the standard library. The frozen blocks are never saved again:
``edgeft.tune.hf.load_run`` (torch side) rebuilds the tuned model by merging
``trained.safetensors`` into the base's original full-precision weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_bytes, atomic_write_json

RUN_INFO = "run.json"
TRAINED = "trained.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
LABELS = "labels.json"
LOG = "log.jsonl"
LOSS_PLOT = "loss.png"
RUN_FORMAT = "edgeft-run"


@dataclass(frozen=True)
class RunInfo:
    """How to rebuild a tuned model from its base."""

    task: Task
    base_model: str  # as the user named it: a pulled name, a folder, a hub id
    base_path: str  # the resolved local folder (or hub id)
    base_sha256: str  # sha256 over the base's weight files, sorted by name
    architecture: str  # model_type
    trainable_layers: int
    trained_parameters: list[str]
    labels: list[str] | None = None  # classification label names, index = class id
    untied_head: bool = False  # True when a tied lm_head was untied to train it
    data_sha256: dict[str, str] = field(default_factory=dict)  # {"train": ..., "eval": ...}
    max_length: int | None = None
    format: str = RUN_FORMAT
    format_version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"task": self.task.value}


def is_run_folder(path: Path) -> bool:
    return (Path(path) / RUN_INFO).is_file() and (Path(path) / TRAINED).is_file()


def read_run(path: Path) -> RunInfo:
    """Read ``run.json`` from a run folder, with a one-line error when it is not one."""
    path = Path(path)
    if not is_run_folder(path):
        raise EdgeftError(f"{path} is not an edgeft run folder (no {RUN_INFO} and {TRAINED})")
    d = json.loads((path / RUN_INFO).read_text())
    if d.get("format") != RUN_FORMAT:
        raise EdgeftError(f"{path / RUN_INFO} is not an edgeft run description")
    known = {f.name for f in dataclasses.fields(RunInfo)}
    return RunInfo(**{k: v for k, v in d.items() if k in known})


def write_run_info(path: Path, info: RunInfo) -> None:
    atomic_write_json(Path(path) / RUN_INFO, info.to_dict())


# config.json keys renamed since a run folder may have been written (old -> new).
RENAMED_CONFIG_KEYS = {"text_col": "text_column", "label_col": "label_column"}


# Settings added after run folders were first written, with the value an older run had in effect.
ADDED_CONFIG_KEYS = {"int8_kernel": "auto"}


def read_run_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder (or of ``OUT.partial``), renamed keys under their new names.

    ``{}`` when there is none or it is not JSON: the run's settings are then unknown.
    """
    try:
        saved = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    config = {RENAMED_CONFIG_KEYS.get(str(k), str(k)): v for k, v in saved.items()}
    for key, value in ADDED_CONFIG_KEYS.items():  # settings newer than the run: it ran with their default
        config.setdefault(key, value)
    return config


def write_log(folder: Path, log: Sequence[dict[str, Any]]) -> None:
    """``log.jsonl``: one JSON object per logged step or evaluation."""
    atomic_write_bytes(Path(folder) / LOG, "".join(json.dumps(e) + "\n" for e in log).encode())


def write_run(folder: Path, info: RunInfo, config: dict[str, Any], metrics: dict[str, Any],
              log: Sequence[dict[str, Any]]) -> None:
    """The run folder's JSON files: ``run.json``, ``config.json``, ``labels.json`` (classifiers),
    ``metrics.json`` and ``log.jsonl``. The caller writes the tensors, tokenizer and plot."""
    folder = Path(folder)
    write_run_info(folder, info)
    atomic_write_json(folder / CONFIG, config)
    if info.labels:
        atomic_write_json(folder / LABELS, {"labels": info.labels,
                                            "label2id": {n: i for i, n in enumerate(info.labels)}})
    atomic_write_json(folder / METRICS, metrics)
    write_log(folder, log)


def read_metrics(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``, with a one-line error when it is missing or not JSON."""
    try:
        metrics = json.loads((Path(path) / METRICS).read_text())
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"cannot read {Path(path) / METRICS}: {exc}") from None
    if not isinstance(metrics, dict):
        raise EdgeftError(f"{Path(path) / METRICS} is not a JSON object")
    return metrics


def summary(path: Path) -> str:
    """One line on a finished run: the quality before -> after, its best step, time and warnings."""
    m = read_metrics(path)
    before, after = m.get("before") or {}, m.get("after") or {}
    if Task(m["task"]) is Task.classification:
        figures = (f"accuracy {before.get('accuracy', 0):.4f} -> {after.get('accuracy', 0):.4f}, "
                   f"macro F1 {before.get('macro_f1', 0):.4f} -> {after.get('macro_f1', 0):.4f}")
    else:
        figures = f"perplexity {before.get('perplexity', 0):.2f} -> {after.get('perplexity', 0):.2f}"
    line = (f"{path}: {figures} (best step {m['best_step']} of {m['steps']} by {m.get('select_metric', 'accuracy')}, "
            f"{m['train_seconds']:.0f}s)")
    warnings = m.get("warnings") or []
    return line + "".join(f"; WARNING: {w}" for w in warnings)
