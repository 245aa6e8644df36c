"""onnxruntime sessions for edgeft artifacts: CPU execution provider, threads, optimization.

This module knows how to open an ONNX file with the options that make small models fast
on laptop CPUs (sequential execution, all graph optimizations, a memory arena), whether the
pool's idle threads spin or sleep (chosen from what the machine shows when a model loads:
usable cores, their busy time, a cgroup quota), and how to map ONNX type strings to numpy
dtypes. It knows nothing about tokens or tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeft.errors import EdgeftError
from edgeft.runtime.params import Spin

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,  # an 8-bit KV cache (--kv-cache int8)
    "tensor(bool)": np.bool_,
}


def default_threads() -> int:
    """Threads for one session when none are given: the cores this process may use.

    (``EDGEFT_THREADS`` is read where a command's flags are, ``--threads``, not here.)"""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


SPIN_SLACK = 0.25  # cores: the idle count is sampled, so a pool within this of fitting still spins


@dataclass(frozen=True)
class Cores:
    """What the machine shows at load: cores this process may use and how many other work keeps busy."""

    usable: float  # the affinity mask, capped by a cgroup CPU quota
    busy: float  # cores of those that other work kept busy (``machine_cores``)

    def spare(self) -> float:
        return max(0.0, self.usable - self.busy)


def choose_spin(threads: int, reserve: float = 0.0, cores: Cores | None = None) -> tuple[bool, str]:
    """Spin when the cores ``threads`` pool threads (plus ``reserve`` for other work of ours) need are idle.

    Spinning saves each of a decode step's ~300 parallel sections a wake-up; but a spinning
    thread on a core that other work needs steals it, and the step then waits at every barrier
    for a descheduled thread (benchmarks/results/2026-12-02-thread-policy.md has both sides
    measured). The cost of a wrong "on"
    is larger than that of a wrong "off", so the rule asks for the whole pool's cores free,
    with a quarter core of slack for the sampling noise.
    """
    cores = cores or machine_cores()
    need = threads + reserve
    spin = cores.spare() + SPIN_SLACK >= need
    why = (f"{cores.spare():.1f} of {cores.usable:g} usable cores idle, {need:g} needed "
           f"({threads} threads{f' + {reserve:g} reserved' if reserve else ''}, {SPIN_SLACK:g} core of slack)")
    return spin, why


SPLIT_SLEEPS = "a split artifact's trunk and top take turns on every call: a spinning pool would hold the cores the other needs"


def resolve_spin(spin: Spin | bool | None, threads: int, reserve: float = 0.0,
                 split: bool = False) -> tuple[bool, str]:
    """The spin setting for one session: an explicit one, else (None or auto) ``choose_spin``.

    ``split``: the session is one part of a split artifact (``edgeft.runtime.trunks``), whose trunk
    and top run one after the other on every call: then auto sleeps (an idle spinning pool of one
    part steals the cores the other part needs: benchmarks/results/2026-12-06-multi-classifier.md).
    (``EDGEFT_SPIN`` is read where a command's flags are, ``--spin``, not here.)"""
    if isinstance(spin, bool):
        return spin, "set by the caller"
    policy = Spin(spin) if spin is not None else Spin.auto
    if policy is Spin.auto:
        return (False, SPLIT_SLEEPS) if split else choose_spin(threads, reserve)
    return policy is Spin.on, f"--spin {policy.value}"


_SAMPLE_S = 0.2
_READ: dict[str, tuple[float, Cores]] = {}  # the last reading, reused for a few seconds (several sessions at once)


def machine_cores(sample_s: float = _SAMPLE_S, max_age_s: float = 2.0) -> Cores:
    """Usable cores (affinity, cgroup quota) and those other work keeps busy, read over ``sample_s``.

    The busy figure is the sampled CPUs' busy time less this process's own; the 1-minute load
    average, which also remembers this process's recent work (a benchmark's previous run),
    only overrides it when the machine has been oversubscribed for the last minute.
    """
    last = _READ.get("cores")
    if last and time.monotonic() - last[0] < max_age_s:
        return last[1]
    cpus = _affinity()
    usable = float(len(cpus))
    quota = _cgroup_quota()
    if quota is not None:
        usable = min(usable, quota)
    before, own0, t0 = _cpu_times(cpus), _own_cpu_s(), time.perf_counter()
    time.sleep(sample_s)
    after, own1, t1 = _cpu_times(cpus), _own_cpu_s(), time.perf_counter()
    busy = 0.0
    if before is not None and after is not None:
        total = sum(a[0] - b[0] for a, b in zip(after, before))
        idle = sum(a[1] - b[1] for a, b in zip(after, before))
        if total > 0:  # jiffies: the busy share of the sampled CPUs, as cores, less what we used ourselves
            busy = (1 - idle / total) * len(cpus) - (own1 - own0) / max(t1 - t0, 1e-6)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] - 1.0 > usable:  # less one: ourselves
        busy = usable
    cores = Cores(usable, max(0.0, min(busy, usable)))
    _READ["cores"] = (time.monotonic(), cores)
    return cores


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 CFS quota under ``root``; None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: list[int]) -> list[tuple[int, int]] | None:
    """(total, idle) jiffies of each CPU in ``cpus`` from /proc/stat (steal counts as busy); None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    out = []
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            vals = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            out.append((sum(vals), vals[3] + vals[4]))
    return out or None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def session_options(threads: int | None = None, inter_op_threads: int = 1, spin: Spin | bool | None = None,
                    reserve: float = 0.0, profile_prefix: str | None = None) -> ort.SessionOptions:
    """Options for one CPU session; ``threads`` is the intra-op pool (None: all usable cores).

    ``spin``: True/False, a ``Spin`` policy, or None (decided from the machine, ``resolve_spin``;
    ``reserve`` cores are kept for other work of the caller's)."""
    if threads is not None and threads < 1:
        raise EdgeftError(f"threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    threads = threads or default_threads()
    spinning, _ = resolve_spin(spin, threads, reserve)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = max(1, inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    so.log_severity_level = 3  # errors only: the builder's graphs warn about unused initializers
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def open_session(path: Path, threads: int | None = None, **kw) -> ort.InferenceSession:
    """An ``InferenceSession`` on the CPU execution provider, with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"{path} is missing: the artifact is incomplete")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, **kw),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise EdgeftError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0]}") from None


def input_dtypes(session: ort.InferenceSession) -> dict[str, type]:
    """Graph input name -> numpy dtype."""
    return {i.name: ONNX_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}


def output_dtypes(session: ort.InferenceSession) -> dict[str, type]:
    """Graph output name -> numpy dtype."""
    return {o.name: ONNX_TO_NUMPY.get(o.type, np.float32) for o in session.get_outputs()}
