"""``edgeft tune``: train the top blocks of a model over a frozen (8-bit) base; write a run folder.

``tune(TuneConfig(...)) -> Path`` is the whole stage. Submodules: ``config`` (the frozen
``TuneConfig`` and its Enums), ``model`` (loading, freezing, int8), ``dataset`` (tokenized
examples, seeded order), ``frozen`` (the frozen-block hidden-state cache), ``train`` (the
loop, checkpoints, run folder), ``metrics``.
Importing this package imports no torch; ``tune`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeft.artifact import Task
from edgeft.tune.config import ClassWeights, Device, FrozenCache, Optim, Precision, Schedule, TuneConfig

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["ClassWeights", "Device", "FrozenCache", "Optim", "Precision", "Schedule", "Task", "TuneConfig", "tune"]


def tune(config: TuneConfig, callback: Any = None) -> Path:
    """Run one tuning job (see ``edgeft.tune.train.tune``); return the run folder."""
    from edgeft.tune.train import tune as _tune

    return _tune(config, callback=callback)
