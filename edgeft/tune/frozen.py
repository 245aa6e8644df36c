"""The frozen-block cache: the frozen base runs once per example, not once per epoch.

The blocks below the trained ones are frozen and run in eval mode, so the hidden states
entering the first trained block (the *boundary*) are a fixed function of an example's
token ids. The first time an example passes, a forward pre-hook on the boundary block
copies those states into a memory-mapped file; from then on the frozen blocks are taken
out of the model for the forward pass (the block list temporarily holds only the trained
blocks) and a pre-hook hands the first trained block the cached states instead of what
the embeddings produced. Everything else the top blocks need is a function of the padded
batch and is computed by the model itself, exactly as without the cache: the attention
mask (by the model's own mask function, in the format its blocks expect), the position
ids and the rotary cos/sin (Llama), the sequence-length bookkeeping of the heads.
Absolute position and token-type embeddings (GPT-2, BERT) are added below the boundary,
so they are inside the cached states.

On disk (``OUT.partial/frozen-cache/``): ``states.bin``, every example's states unpadded
and back to back (train examples, then eval examples), ``filled.npy`` (which examples are
in), ``key.json``. The dtype is the one the boundary states have: fp32 over an int8 or
fp32 base (so a cached batch is exactly what recomputing would give), bf16/fp16 over a
bf16/fp16 base. The key covers everything that changes the states: the base weights'
sha256 and config, the base precision and autocast dtype, the trained-block count, the
tokenizer, the max length and every example's token ids. A cache whose key differs is
rebuilt.

With several processes (``edgeft.tune.distributed``) the cache is sharded by rank: example
``i`` always runs on rank ``i % world``, which caches it in its own
``frozen-cache-R-of-W/`` (only its examples take room there). A resume with another process
count owns the examples differently, so the old shards are deleted and rebuilt in the first
pass.

This module knows torch, numpy and the model layout; it knows nothing of optimizers,
schedules or the run folder beyond its own sub-folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_bytes, atomic_write_json

FOLDER = "frozen-cache"
RESERVE = 256 * 2**20  # disk left free for checkpoints and the run folder
_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 stored as its bits


def note(line: str) -> None:
    print(line, file=sys.stderr)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---- where the boundary is ------------------------------------------------------------

class Boundary:
    """The block list of a task model, split at the first trained block."""

    def __init__(self, model: Any, blocks: str, first: int) -> None:
        import torch.nn as nn

        parent, _, self.attr = blocks.rpartition(".")
        self.parent = model.get_submodule(parent) if parent else model
        self.all = getattr(self.parent, self.attr)
        self.first = first
        self.top = nn.ModuleList(list(self.all)[first:])

    @contextlib.contextmanager
    def capture(self, box: list[Any]) -> Iterator[None]:
        """Record the hidden states entering the first trained block (once per forward)."""
        def grab(_module: Any, args: tuple, kwargs: dict) -> None:
            if not box:
                box.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.all[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def feed(self, states: Any) -> Iterator[None]:
        """Run only the trained blocks, the first of them on ``states`` instead of the frozen blocks' output."""
        def swap(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (states.to(args[0].dtype),) + tuple(args[1:]), kwargs
            return args, kwargs | {"hidden_states": states.to(kwargs["hidden_states"].dtype)}

        handle = self.top[0].register_forward_pre_hook(swap, with_kwargs=True)
        self.parent._modules[self.attr] = self.top
        try:
            yield
        finally:
            self.parent._modules[self.attr] = self.all
            handle.remove()


def below_boundary(trained: Sequence[str], above: Sequence[str]) -> str | None:
    """The first trained parameter that lies below the boundary (outside ``above``), if any."""
    for name in trained:
        if not any(name == m or name.startswith(m + ".") for m in above):
            return name
    return None


# ---- the key --------------------------------------------------------------------------

def tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def examples_digest(examples: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for ids in examples:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def key_parts(base_sha256: str, base_config: str, precision: str, autocast: Any, trainable_layers: int,
              tokenizer: Any, max_length: int, examples: Sequence[Sequence[int]], shard: str = "1/1",
              int8_kernel: str | None = None) -> dict[str, Any]:
    """Everything the cached states depend on, by name (``shard``: this process's share of the data;
    ``int8_kernel``: which 8-bit layers computed them, for an int8 base)."""
    return {"base_sha256": base_sha256, "base_config": base_config, "base_precision": precision,
            "int8_kernel": int8_kernel,
            "autocast_dtype": str(autocast).replace("torch.", ""), "trainable_layers": trainable_layers,
            "tokenizer": tokenizer_digest(tokenizer), "max_length": max_length,
            "token_ids": examples_digest(examples), "shard": shard}


# ---- the cache ------------------------------------------------------------------------

class StateCache:
    """Unpadded per-example hidden states in one memory-mapped file, ``filled`` saying which are in."""

    def __init__(self, folder: Path, parts: dict[str, Any], lengths: Sequence[int], hidden: int, dtype: str,
                 boundary: Boundary) -> None:
        self.folder, self.parts, self.hidden, self.dtype, self.boundary = Path(folder), parts, hidden, dtype, boundary
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.tokens = int(self.lengths.sum())
        self.states: Any = None
        self.filled = np.zeros(len(self.lengths), dtype=bool)
        self.dirty = False

    @property
    def nbytes(self) -> int:
        return self.tokens * self.hidden * np.dtype(_NP[self.dtype]).itemsize

    def header(self) -> dict[str, Any]:
        return {"parts": self.parts, "dtype": self.dtype, "hidden": self.hidden, "tokens": self.tokens,
                "examples": len(self.lengths)}

    def changed(self) -> list[str] | None:
        """None when the folder holds this cache; else the key parts (or layout) that differ."""
        try:
            saved = json.loads((self.folder / "key.json").read_text())
        except (OSError, ValueError):
            return ["key"]
        mine = self.header()
        diff = [k for k in mine["parts"] if saved.get("parts", {}).get(k) != mine["parts"][k]]
        diff += [k for k in ("dtype", "hidden", "tokens", "examples") if saved.get(k) != mine[k]]
        return diff or None

    def open(self) -> list[str] | None:
        """Map the file, reusing what the folder holds when its key matches; return what changed, if anything."""
        present = all((self.folder / f).is_file() for f in ("key.json", "filled.npy", "states.bin"))
        diff = self.changed() if self.folder.exists() else None
        reuse = present and diff is None
        if not reuse:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            atomic_write_json(self.folder / "key.json", self.header())
        shape = (max(self.tokens, 1), self.hidden)
        self.states = np.memmap(self.folder / "states.bin", dtype=_NP[self.dtype], mode="r+" if reuse else "w+",
                                shape=shape)
        if reuse:
            self.filled = np.load(self.folder / "filled.npy")
        return diff

    def allocated(self) -> int:
        """Bytes already on disk for this cache (a reused file), so the room check does not count them twice."""
        path = self.folder / "states.bin"
        return path.stat().st_blocks * 512 if path.is_file() and self.changed() is None else 0


    def has(self, index: Sequence[int]) -> bool:
        return bool(self.filled[list(index)].all())

    def read(self, index: Sequence[int], width: int, device: Any) -> Any:
        import torch

        dtype = getattr(torch, self.dtype)
        out = torch.zeros((len(index), width, self.hidden), dtype=dtype)
        for r, i in enumerate(index):
            s, n = self.offsets[i], self.lengths[i]
            rows = torch.from_numpy(np.array(self.states[s:s + n]))
            out[r, :n] = rows.view(dtype) if self.dtype == "bfloat16" else rows
        return out.to(device)

    def write(self, index: Sequence[int], states: Any) -> None:
        import torch

        host = states.to("cpu", getattr(torch, self.dtype))
        for r, i in enumerate(index):
            if self.filled[i]:
                continue
            s, n = self.offsets[i], self.lengths[i]
            rows = host[r, :n]
            self.states[s:s + n] = (rows.view(torch.int16) if self.dtype == "bfloat16" else rows).numpy()
            self.filled[i] = True
            self.dirty = True

    def save(self) -> None:
        """Flush the states, then record which examples are in (a crash in between loses nothing valid)."""
        if self.states is None or not self.dirty:
            return
        self.states.flush()
        buf = io.BytesIO()
        np.save(buf, self.filled)
        atomic_write_bytes(self.folder / "filled.npy", buf.getvalue())
        self.dirty = False

    def close(self) -> None:
        self.save()
        self.states = None

    @contextlib.contextmanager
    def around(self, index: Sequence[int], width: int, device: Any) -> Iterator[None]:
        """Around one forward pass of examples ``index`` padded to ``width``: fed from the cache when all
        are in, else run in full with the boundary states of the missing ones stored afterwards."""
        if self.has(index):
            with self.boundary.feed(self.read(index, width, device)):
                yield
            return
        box: list[Any] = []
        with self.boundary.capture(box):
            yield
        if box:
            self.write(index, box[0])


def disk_free(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def adopt_kept(kept: Path, folder: Path) -> None:
    """Move a cache kept by an earlier run of the same OUT into this run's folder (its key is checked on open)."""
    if kept.is_dir() and not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, folder)


def room_or_refuse(cache: StateCache, required: bool) -> str | None:
    """None when the disk has room; else why not (raises when the cache was asked for)."""
    need = cache.nbytes - cache.allocated()
    free = disk_free(cache.folder)
    if need <= free - RESERVE:
        return None
    why = f"it needs {human(need)} and {human(free)} is free beside {cache.folder.parent}"
    if required:
        raise EdgeftError(f"--frozen-cache on: not enough disk ({why}); free some space or use --frozen-cache off")
    return why


# ---- one run's cache ------------------------------------------------------------------

def above_boundary(layout: Any, trainable_layers: int) -> list[str]:
    """The modules that run after the boundary: the trained blocks, the final norm(s), the heads."""
    top = [f"{layout.blocks}.{i}" for i in range(layout.n_blocks - trainable_layers, layout.n_blocks)]
    return top + list(layout.norms) + list(layout.heads)


def shard_name(rank: int = 0, size: int = 1) -> str:
    """The cache folder of rank ``rank`` of ``size`` processes (``frozen-cache`` for one process)."""
    return FOLDER if size == 1 else f"{FOLDER}-{rank + 1}-of-{size}"


def drop_other_shards(partial: Path, size: int) -> None:
    """Delete cache folders in ``partial`` left by a run with another process count."""
    mine = {shard_name(r, size) for r in range(size)}
    for old in partial.glob(FOLDER + "*"):
        if old.is_dir() and old.name not in mine:
            shutil.rmtree(old, ignore_errors=True)


def kept_path(cfg: Any, rank: int = 0, size: int = 1) -> Path:
    """Where ``--keep-cache`` leaves this rank's cache: beside OUT."""
    return cfg.out.with_name(f"{cfg.out.name}.{shard_name(rank, size)}")


def for_run(cfg: Any, loaded: Any, prep: Any, passes: float, partial: Path, base_sha256: str,
            base_config: str, max_length: int, rank: int = 0, size: int = 1) -> StateCache | None:
    """This run's cache (opened, reused when its key matches), or None with a one-line note saying why not.

    ``rank`` of ``size`` processes: the shard holds the examples ``i`` with ``i % size == rank``;
    only rank 0 prints notes.
    """
    from edgeft.tune.config import FrozenCache

    say = note if rank == 0 else (lambda _line: None)

    mode = cfg.frozen_cache
    if mode is FrozenCache.off:
        return None
    layout, n = loaded.layout, cfg.trainable_layers
    first = layout.n_blocks - n
    low = below_boundary(loaded.trained_names, above_boundary(layout, n))
    if first == 0 or low:
        why = "every block trains" if first == 0 else f"{low} trains and lies below the top {n} blocks"
        say(f"frozen cache: off ({why}, so no frozen block's output is fixed)")
        return None
    if mode is FrozenCache.auto and passes <= 1:
        return None
    folder = partial / shard_name(rank, size)
    if not cfg.resume:
        adopt_kept(kept_path(cfg, rank, size), folder)
    examples = [x for x, _ in prep.train] + [x for x, _ in prep.eval]
    parts = key_parts(base_sha256, base_config, cfg.base_precision.value, loaded.autocast_dtype, n,
                      loaded.tokenizer, max_length, examples, f"{rank + 1}/{size}",
                      loaded.int8_kernel)
    lengths = [len(x) if i % size == rank else 0 for i, x in enumerate(examples)]
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.base_precision.value, "float32")
    hidden = loaded.model.config.get_text_config().hidden_size
    cache = StateCache(folder, parts, lengths, hidden, dtype,
                       Boundary(loaded.model, layout.blocks, first))
    why = room_or_refuse(cache, required=mode is FrozenCache.on)
    if why:
        say(f"frozen cache: off ({why})")
        return None
    share = f"{len(examples)} examples" if size == 1 else f"rank 0's share of {len(examples)} examples, of {size} ranks"
    say(f"frozen cache: {human(cache.nbytes)} on disk in {folder} ({share}, {cache.tokens} "
        f"tokens of {dtype} states of width {hidden} entering block {first + 1} of {layout.n_blocks})")
    diff = cache.open()
    if diff:
        say(f"frozen cache: the saved one is for other settings ({', '.join(diff)}): rebuilt")
    return cache


def keep(cache: StateCache | None, kept: Path, quiet: bool = False) -> None:
    """``--keep-cache``: move the finished run's cache beside OUT (replacing an older one)."""
    if cache is None or not cache.folder.is_dir():
        return
    cache.close()
    shutil.rmtree(kept, ignore_errors=True)
    os.replace(cache.folder, kept)
    if not quiet:
        note(f"frozen cache: kept in {kept} ({human(cache.nbytes)})")
