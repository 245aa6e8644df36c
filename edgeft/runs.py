"""The run folder: what ``edgeft tune`` writes and ``edgeft export`` reads.

A run folder holds only what training changed, plus what is needed to rebuild the
model from its base:

- ``trained.safetensors``: the trained parameters, named as in the base model's
  ``state_dict()`` for the task's ``AutoModelFor...`` class (full precision).
- ``run.json``: ``RunInfo`` below (base reference and hash, task, labels, trained names).
- ``config.json``: the resolved ``TuneConfig``; ``metrics.json``; ``log.jsonl``;
  ``loss.png``; the tokenizer files; ``labels.json`` for classification.

The frozen blocks are never saved again: export merges ``trained.safetensors`` into the
base's original full-precision weights. Standard library only (and edgeft's ``Task``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json

RUN_INFO = "run.json"
TRAINED = "trained.safetensors"
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
