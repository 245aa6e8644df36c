"""onnxruntime sessions for edgeft artifacts: CPU execution provider, threads, optimization.

This module knows how to open an ONNX file with the options that make small models fast
on laptop CPUs (sequential execution, all graph optimizations, a memory arena) and how to
map ONNX type strings to numpy dtypes. It knows nothing about tokens or tasks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeft.errors import EdgeftError

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def default_threads() -> int:
    """Threads for one session: ``$EDGEFT_THREADS``, else the cores this process may use."""
    env = os.environ.get("EDGEFT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise EdgeftError(f"EDGEFT_THREADS must be a whole number, got {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_spin() -> bool:
    """Whether idle pool threads spin: ``$EDGEFT_SPIN=1`` turns it on (off by default).

    Spinning trims a few microseconds off each of the ~300 parallel sections of a decode
    step on an idle machine, but on a busy one (a laptop running anything else, a server
    with several workers) the spinning threads steal the cores the work needs: measured on
    2 shared cores, SmolLM2-135M decoding ran 1.4x faster with spinning off.
    """
    return os.environ.get("EDGEFT_SPIN", "0").strip().lower() in ("1", "true", "yes", "on")


def session_options(threads: int | None = None, inter_op_threads: int = 1, spin: bool | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """Options for one CPU session; ``threads`` is the intra-op pool (None: all usable cores)."""
    if threads is not None and threads < 1:
        raise EdgeftError(f"threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    spin = default_spin() if spin is None else spin
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    so.intra_op_num_threads = threads or default_threads()
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
