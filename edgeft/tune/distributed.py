"""Data-parallel tuning over ``torch.distributed``, as launched by ``torchrun`` or ``accelerate launch``.

The launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address);
``World.from_env`` reads them, and ``session`` joins the process group (gloo on CPU, NCCL on
CUDA, one GPU per process by local rank). Without a launcher the world is one process and
every function here is a no-op, so a single-process run is exactly what it was.

How the work is split: the seeded stream of global micro-batches (``edgeft.tune.dataset``)
is the same whatever the process count; each process runs its part of every micro-batch.
With the frozen cache on, an example always goes to the same process (example ``i`` to rank
``i % world``), so each rank's cache shard serves it again next epoch; without it, a batch
is dealt out by position (balanced). Gradients of the trained parameters and the batch's
loss and weight are summed across processes in one all-reduce per optimizer step, then
divided by the global weight: the step is the single-process step, up to float rounding.
Trainable parameters start from rank 0's copy, and every rank takes the same optimizer step,
so they stay equal without further traffic.

This module knows torch.distributed and the launcher's environment; it knows nothing of
models, data or the run folder.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edgeft.errors import EdgeftError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the launcher's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))
        except ValueError:
            raise EdgeftError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
        if not 0 <= rank < max(size, 1):
            raise EdgeftError(f"RANK {rank} is outside WORLD_SIZE {size}")
        return cls(rank, max(size, 1), local)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, the run folder and progress bars."""
        return self.rank == 0

    @property
    def shard(self) -> str:
        return f"{self.rank + 1}/{self.size}"

    def part(self, index: Sequence[int], by_owner: bool) -> list[int]:
        """This rank's share of a global batch of example indices."""
        if self.size == 1:
            return list(index)
        if by_owner:
            return [i for i in index if i % self.size == self.rank]
        return list(index[self.rank::self.size])


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one); reads the launcher's environment only."""
    return os.environ.get("RANK", "0") == "0"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@contextlib.contextmanager
def session(world: World, device: Any) -> Iterator[None]:
    """Join the launcher's process group for the block (gloo on CPU, NCCL on CUDA); leave it after."""
    if world.size == 1 or _dist().is_initialized():
        yield
        return
    dist = _dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ:
        raise EdgeftError(f"WORLD_SIZE is {world.size} but no rendezvous address is set: start with torchrun")
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, **kwargs)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # leave together: a rank tearing its gloo threads down while rank 0 still writes the run folder
    # (or still talks) was seen to abort at exit ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def leave(code: int = 0) -> None:
    """End a process of a multi-process run now, once its work is written: flush stdio, then ``os._exit``.

    Interpreter teardown after a gloo run was seen to abort a rank (SIGABRT, "terminate called without an
    active exception", from the process group's C++ threads while Python objects were being finalized) after
    every file was complete, so torchrun reported a failed run; skipping the teardown avoids it. Call it only
    after ``session`` has left the process group, and only where nothing else is left to do (the command)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def barrier(world: World) -> None:
    if world.size > 1:
        _dist().barrier()


def broadcast(world: World, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if world.size == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    _dist().all_gather_object(out, obj)
    return out


def on_main(world: World, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only while the others wait; a user error there is raised on every rank."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except EdgeftError as e:
            error = str(e)
    error = broadcast(world, error)
    if error is not None:
        raise EdgeftError(error)
    return result


def broadcast_params(world: World, params: Sequence[Any]) -> None:
    """Overwrite every rank's copy of ``params`` with rank 0's."""
    if world.size == 1:
        return
    import torch

    with torch.no_grad():
        for p in params:
            _dist().broadcast(p.data, src=0)


def sum_grads(world: World, params: Sequence[Any], extras: Sequence[float]) -> list[float]:
    """Sum the gradients of ``params`` and the numbers ``extras`` across ranks, in one all-reduce.

    A parameter without a gradient on this rank (it ran no example) counts as zeros.
    """
    if world.size == 1:
        return list(extras)
    import torch

    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]
                     + [torch.tensor(list(extras), dtype=torch.float32, device=device)])
    _dist().all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return flat[offset:].tolist()
