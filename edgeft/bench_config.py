"""``BenchConfig``: what ``edgeft bench ARTIFACT`` measures, and how hard; validated on construction.

Each field is a flag of ``edgeft bench`` (its docstring the help). Standard library only,
so ``edgeft --help`` does not import numpy; ``edgeft.bench`` does the measuring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.flags import flag


@dataclass(frozen=True)
class BenchConfig:
    """What ``edgeft bench ARTIFACT`` measures, and how hard."""

    artifact: Path = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file."""
    threads: int | None = None
    """onnxruntime threads (default: every core)."""
    repeats: int = 5
    """Measured runs per figure (each figure is their median)."""
    warmup: int = 1
    """Unmeasured runs first."""
    new_tokens: int = 64
    """Tokens generated per decode run (generation artifacts)."""
    prompt_lengths: tuple[int, ...] = field(default=(32, 512), metadata=flag("--prompt-length"))
    """Prompt lengths at which prefill is timed; repeat the flag."""
    batch_sizes: tuple[int, ...] = field(default=(1, 8, 32), metadata=flag("--batch-size"))
    """Batch sizes for a classifier; repeat the flag."""
    bandwidth: bool = True
    """Also measure the machine's read bandwidth (about 5 s) and report decode tokens/s as a share of the limit
    it sets."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_lengths", tuple(self.prompt_lengths))
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if not Path(self.artifact).exists():
            raise EdgeftError(f"{self.artifact} does not exist (give an artifact folder or a packed .edgeft file)")
        if self.threads is not None and self.threads < 1:
            raise EdgeftError("--threads must be at least 1")
        if self.repeats < 1 or self.warmup < 0:
            raise EdgeftError("--repeats must be at least 1 and --warmup at least 0")
        if self.new_tokens < 2:
            raise EdgeftError("--new-tokens must be at least 2 (decode speed is timed after the first token)")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise EdgeftError("prompt lengths must be positive")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise EdgeftError("batch sizes must be positive")
