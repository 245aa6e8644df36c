"""llama.cpp built natively on this machine, the way its users build it, cached per CPU and version.

    python -m benchmarks.llamacpp                 # build (or reuse) and print the bin folder
    python -m benchmarks.llamacpp --seed DIR      # copy binaries already built in DIR/build/bin
    python -m benchmarks.llamacpp --fallback      # the portable build (see FALLBACK_FLAGS)
    python -m benchmarks.llamacpp --key           # the cache key of this CPU and version

The source is llama.cpp as vendored in the ``llama-cpp-python`` sdist (``pip download
--no-binary :all: --no-deps llama-cpp-python==VERSION``), so the version is pinned by a
registry package. It is built with CMake exactly as llama.cpp's README tells a user to
(``GGML_NATIVE=ON``: every instruction set the compiler sees on this CPU), only the four
tools the suite runs, and cached in ``benchmarks/work/llama.cpp/<key>/bin`` where ``key``
hashes the CPU's instruction-set flags and the llama.cpp version: a cache made on an
AVX2 machine is never used on an AVX-512 one.

Some VMs report instructions they cannot run, or that ggml's kernels for them crash on
(AMX on a guest where ggml's ``tilezero`` path died with SIGILL); a native build then dies.
Every build is smoke-tested by decoding a few tokens with ``llama-bench``, and the builds are
tried as a user on this CPU would until one runs: ``native``; then, when the CPU reports
AMX, ``native-noamx`` (the same native flags with ggml's AMX kernels off, reconfigured in the
native build's own tree, so only what the flags change is compiled again); then the portable
``fallback`` (``GGML_NATIVE=OFF`` with AVX, AVX2, FMA and F16C named explicitly, plus the
AVX-512 flags this CPU reports, unless ``--fallback avx2``). ``build.json`` records the flags
and why each earlier flavour was passed over; ``build_note()`` is that line for a results file.

It knows nothing about edgeft or the suite's cases; ``benchmarks.prepare`` and the
workers call ``ensure_binaries`` and run the tools.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.data import REPO
from edgeft.bench import cpu_flags
from edgeft.bench import cpu_isa as isa_flags

WORK = Path(os.environ.get("BENCH_WORK", REPO / "benchmarks" / "work"))
CACHE = WORK / "llama.cpp"
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
TOOLS = ("llama-bench", "llama-server", "llama-quantize", "llama-perplexity")
COMMON_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF")
NATIVE_FLAGS = ("-DGGML_NATIVE=ON",)
# The portable build for a CPU that reports instructions it cannot run: nothing detected, x86-64
# AVX2-era instructions named explicitly, AMX always off.
FALLBACK_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                  "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
# Tried in this order until one runs; native-noamx only where the CPU reports AMX.
FLAVOURS = ("native", "native-noamx", "fallback")
AVX512_FALLBACK = {"avx512f": "-DGGML_AVX512=ON", "avx512vbmi": "-DGGML_AVX512_VBMI=ON",
                   "avx512_vnni": "-DGGML_AVX512_VNNI=ON", "avx512_bf16": "-DGGML_AVX512_BF16=ON",
                   "avx_vnni": "-DGGML_AVX_VNNI=ON"}


class BuildFailed(Exception):
    """llama.cpp could not be built or run here; the message says why."""


def cache_key(flags: list[str], version: str = LLAMA_CPP_PYTHON, flavour: str = "native") -> str:
    """12 hex digits from the instruction sets, the llama.cpp version and the build flavour."""
    text = json.dumps({"isa": isa_flags(flags), "llama-cpp-python": version, "flavour": flavour}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_flags(flavour: str, flags: list[str] | None = None) -> list[str]:
    """CMake flags of a flavour: ``native``, ``native-noamx``, ``fallback`` (AVX2 + this CPU's AVX-512) or ``avx2``."""
    if flavour == "native":
        return [*COMMON_FLAGS, *NATIVE_FLAGS]
    if flavour == "native-noamx":
        return [*COMMON_FLAGS, *NATIVE_FLAGS, *AMX_OFF]
    if flavour not in ("fallback", "avx2"):
        raise ValueError(f"unknown build flavour {flavour!r} (native, native-noamx, fallback or avx2)")
    have = set(cpu_flags() if flags is None else flags)
    extra = [] if flavour == "avx2" else [v for k, v in AVX512_FALLBACK.items() if k in have]
    return [*COMMON_FLAGS, *FALLBACK_FLAGS, *extra]


def bin_dir(flavour: str = "native") -> Path:
    return CACHE / cache_key(cpu_flags(), flavour=flavour) / "bin"


def cached(flavour: str = "native") -> Path | None:
    """The cached bin folder of this CPU and version when every tool is there and it ran."""
    folder = bin_dir(flavour)
    info = folder.parent / "build.json"
    if all((folder / t).is_file() for t in TOOLS) and info.is_file() and json.loads(info.read_text()).get("smoke_ok"):
        return folder
    return None


def source_dir() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist, downloaded and unpacked once."""
    dest = CACHE / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tree = dest / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    dl = CACHE / "src" / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("llama_cpp_python-*.tar.gz")):
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(dl),
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], CACHE / "logs" / "pip-download.log", "pip download")
    sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(dest.parent, filter="data")
    if not (tree / "CMakeLists.txt").is_file():
        raise BuildFailed(f"{sdist.name} has no vendor/llama.cpp")
    return tree


def _run(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        raise BuildFailed(f"{what} failed (exit {rc}; log: {log})")


def smoke_test(folder: Path, gguf: Path | None) -> tuple[bool, str]:
    """Decode a few tokens with ``llama-bench`` (SIGILL here means the build uses what the CPU lacks)."""
    if gguf is None or not Path(gguf).is_file():
        res = subprocess.run([str(folder / "llama-bench"), "--help"], capture_output=True, text=True)
        return res.returncode == 0, "llama-bench --help (no model to decode with)"
    res = subprocess.run([str(folder / "llama-bench"), "-m", str(gguf), "-p", "8", "-n", "4", "-r", "1", "-o", "json"],
                         capture_output=True, text=True)
    if res.returncode < 0:
        return False, f"llama-bench died with signal {-res.returncode} (SIGILL=4: an instruction this CPU cannot run)"
    return res.returncode == 0, f"llama-bench -p 8 -n 4: exit {res.returncode}"


def _record(folder: Path, flavour: str, flags: list[str], how: str, gguf: Path | None, seconds: float,
            passed_over: tuple[str, ...] = ()) -> None:
    ok, smoke = smoke_test(folder, gguf)
    version = subprocess.run([str(folder / "llama-bench"), "--version"], capture_output=True, text=True)
    info = {"llama-cpp-python": LLAMA_CPP_PYTHON, "flavour": flavour, "cmake_flags": flags, "made_by": how,
            "build_seconds": round(seconds, 1), "isa": isa_flags(), "version": (version.stdout + version.stderr).strip(),
            "smoke": smoke, "smoke_ok": ok, "passed_over": list(passed_over),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (folder.parent / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    if not ok:
        raise BuildFailed(f"the {flavour} build does not run here: {smoke}")


def build(flavour: str = "native", gguf: Path | None = None, jobs: int = 2, tree: Path | None = None,
          passed_over: tuple[str, ...] = ()) -> Path:
    """Configure and build the tools, copy them into the cache and smoke-test them.

    ``tree``: an already configured build folder to reconfigure in place (CMake then compiles
    only what the changed flags touch); by default a fresh one beside the cache entry. The
    folder is kept when the smoke test fails, so the next flavour can reuse it."""
    src = source_dir()
    flags = build_flags(flavour)
    out = bin_dir(flavour)
    build_tree = tree or out.parent / "build"
    if tree is None:
        shutil.rmtree(build_tree, ignore_errors=True)
    log = out.parent / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    t0 = time.perf_counter()
    _run(["cmake", "-S", str(src), "-B", str(build_tree), *flags], log, "cmake configure")
    _run(["cmake", "--build", str(build_tree), f"-j{jobs}", "--target", *TOOLS], log, "cmake build")
    _install(build_tree / "bin", out)
    how = "built here by benchmarks.llamacpp" + (f", reconfiguring {build_tree}" if tree else "")
    _record(out, flavour, flags, how, gguf, time.perf_counter() - t0, passed_over)
    shutil.rmtree(build_tree, ignore_errors=True)
    return out


def flavours_to_try(flags: list[str]) -> tuple[str, ...]:
    """The build flavours a user on this CPU would try, in order (AMX off only matters where AMX is reported)."""
    return tuple(f for f in FLAVOURS if f != "native-noamx" or any(x.startswith("amx") for x in flags))


def current() -> Path | None:
    """The bin folder ``ensure_binaries`` would return now, without building anything."""
    return next((f for flavour in flavours_to_try(cpu_flags()) if (f := cached(flavour)) is not None), None)


def build_note(folder: Path) -> str:
    """One line for a results file: which llama.cpp build ran, with what flags, and why others did not."""
    info_path = Path(folder).parent / "build.json"
    if not info_path.is_file():
        return f"llama.cpp: binaries in {folder} (no build.json)"
    info = json.loads(info_path.read_text())
    why = "; ".join(info.get("passed_over") or [])
    flags = " ".join(f for f in info.get("cmake_flags", []) if f.startswith("-DGGML_"))
    return (f"llama.cpp {info.get('llama-cpp-python')} built '{info.get('flavour')}' ({flags})"
            + (f"; passed over: {why}" if why else ""))


def _install(built: Path, out: Path) -> None:
    missing = [t for t in TOOLS if not (built / t).is_file()]
    if missing:
        raise BuildFailed(f"{built} lacks {', '.join(missing)}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for t in TOOLS:
        shutil.copy2(built / t, tmp / t)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def seed(tree: Path, gguf: Path | None = None) -> Path:
    """Copy binaries built elsewhere with the native flags (``tree/build/bin``) into the cache."""
    tree = Path(tree)
    built = tree / "build" / "bin" if (tree / "build" / "bin").is_dir() else tree
    out = bin_dir("native")
    _install(built, out)
    _record(out, "native", [*COMMON_FLAGS, *NATIVE_FLAGS], f"copied from {built} (built with these flags)", gguf, 0.0)
    return out


def ensure_binaries(gguf: Path | None = None, allow_build: bool = True) -> Path:
    """The bin folder of a llama.cpp that runs on this CPU: the first flavour of ``flavours_to_try`` that runs."""
    order = flavours_to_try(cpu_flags())
    for flavour in order:
        if (folder := cached(flavour)) is not None:
            return folder
    if not allow_build:
        raise BuildFailed("no llama.cpp build for this CPU in benchmarks/work/llama.cpp (python -m benchmarks.llamacpp)")
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise BuildFailed("building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    failures: list[str] = []
    native_tree = bin_dir("native").parent / "build"
    for flavour in order:
        reuse = native_tree if flavour == "native-noamx" and native_tree.is_dir() else None
        try:
            return build(flavour, gguf, tree=reuse, passed_over=tuple(failures))
        except BuildFailed as exc:
            failures.append(f"{flavour}: {exc}")
    raise BuildFailed("; ".join(failures))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=Path, help="a llama.cpp tree whose build/bin has the tools (built natively)")
    ap.add_argument("--fallback", nargs="?", const="fallback", choices=("fallback", "avx2"),
                    help="build the portable flavour (avx2: without AVX-512 either)")
    ap.add_argument("--key", action="store_true", help="print this CPU's cache key and instruction sets")
    ap.add_argument("--gguf", type=Path, help="a GGUF model for the smoke test (default: the shipped SmolLM2 Q4_1)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = ap.parse_args(argv)
    if args.key:
        print(cache_key(cpu_flags()), " ".join(isa_flags()))
        return 0
    gguf = args.gguf
    if gguf is None:
        from benchmarks.prepare import shipped_gguf

        gguf = shipped_gguf()
    try:
        if args.seed:
            folder = seed(args.seed, gguf)
        elif args.fallback:
            folder = build(args.fallback, gguf, args.jobs)
        else:
            folder = ensure_binaries(gguf)
    except BuildFailed as exc:
        print(f"llamacpp: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
