"""``BenchConfig``: what ``edgeft bench ARTIFACT`` measures, and how hard; validated on construction.

Each field is a flag of ``edgeft bench`` (its docstring the help). Standard library only,
so ``edgeft --help`` does not import numpy; ``edgeft.bench`` does the measuring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, flag
from edgeft.runtime.params import Spin


@dataclass(frozen=True)
class BenchConfig:
    """What ``edgeft bench ARTIFACT`` measures, and how hard."""

    artifact: Path = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """onnxruntime threads (default: every core)."""
    spin: Spin = field(default=Spin.auto, metadata=flag(env="EDGEFT_SPIN"))
    """Idle onnxruntime threads spin (on) or sleep (off); auto: spin only when the cores the threads take
    are idle at load. Env: EDGEFT_SPIN (1, 0 or auto)."""
    repeats: int = field(default=5, metadata=flag(min=1))
    """Measured runs per figure (each figure is their median)."""
    warmup: int = field(default=1, metadata=flag(min=0))
    """Unmeasured runs first."""
    new_tokens: int = field(default=64, metadata=flag(min=2))
    """Tokens generated per decode run (generation artifacts; at least 2: decode speed is timed after the first
    token)."""
    prompt_lengths: tuple[int, ...] = field(default=(32, 512), metadata=flag("--prompt-length", min=1))
    """Prompt lengths at which prefill is timed; repeat the flag."""
    batch_sizes: tuple[int, ...] = field(default=(1, 8, 32), metadata=flag("--batch-size", min=1))
    """Batch sizes for a classifier; repeat the flag."""
    bandwidth: bool = True
    """Also measure the machine's read bandwidth (about 5 s) and report decode tokens/s as a share of the limit
    it sets."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_lengths", tuple(self.prompt_lengths))
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if not Path(self.artifact).exists():
            raise EdgeftError(f"{self.artifact} does not exist (give an artifact folder or a packed .edgeft file)")
        check_fields(self)
        if not self.prompt_lengths or not self.batch_sizes:
            raise EdgeftError("give at least one --prompt-length and one --batch-size")
