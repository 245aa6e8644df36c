"""``make bench``: run the suite on this machine and write JSON, a Markdown report and PNG charts.

    python -m benchmarks.run                      # every case, ~30-45 min on 2 cores
    BENCH_QUICK=1 python -m benchmarks.run        # fewer repeats/tokens/steps: a few minutes
    python -m benchmarks.run --cases generation,bandwidth
    python -m benchmarks.run --cases tune_minilm_sst2        # any case alone (see benchmarks/README.md)
    python -m benchmarks.run --report benchmarks/results/2026-11-28-host.json   # rewrite md + png

Results go to ``benchmarks/results/<date>-<host>.{json,md}`` and ``...-<chart>.png`` (a run of
other cases than the default set adds their names: ``<date>-<host>-tune_minilm_sst2.json``);
cached work (tuned runs, artifacts, GGUF files, venvs) to ``benchmarks/work/`` (``$BENCH_WORK``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from benchmarks.cases import CASES, DEFAULT_CASES, Context
from benchmarks.prepare import REPO, Unavailable
from benchmarks.report import write_charts, write_markdown
from benchmarks.schema import Environment, SuiteResult
from edgeft.bench import cpu_isa, cpu_name

RESULTS = REPO / "benchmarks" / "results"
VERSIONS = ("edgeft", "onnxruntime", "onnxruntime-genai", "torch", "transformers", "llama-cpp-python",
            "bitsandbytes", "peft", "numpy", "tokenizers")  # the peers' venv adds its own


def environment(threads: int, quick: bool, shared: str) -> Environment:
    from benchmarks import peers

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions.update({f"peers: {k}": v for k, v in peers.versions().items()})
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Environment(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), host=socket.gethostname(),
        cpu=cpu_name(), cores=os.cpu_count() or 1, threads=threads, memory_gib=mem,
        python=platform.python_version(), versions=versions, quick=quick, shared_machine=shared,
        load_average=list(os.getloadavg()), isa=cpu_isa())


def context(res: SuiteResult, quick: bool, threads: int) -> Context:
    if quick:
        return Context(res, threads=threads, quick=True, repeats=3, new_tokens=32, prompt_lengths=(32, 512),
                       batches=5, tune_steps=20)
    return Context(res, threads=threads)


def run_suite(cases: list[str], quick: bool, threads: int, shared: str = "",
              tune_steps: int | None = None, after_case=None,
              into: SuiteResult | None = None) -> SuiteResult:
    """Run ``cases`` in order (adding to ``into`` when given); ``after_case(res)`` runs after each."""
    import benchmarks.prepare as prep

    res = into or SuiteResult(environment(threads, quick, shared))
    before = res.seconds
    ctx = context(res, quick, threads)
    if tune_steps:
        ctx.tune_steps = tune_steps
    if prep.CACHED_ONLY:
        res.notes.append("cached-only run: nothing was tuned or exported; what benchmarks/work/ lacked is skipped")
    t0 = time.perf_counter()
    earlier = {id(m) for m in res.measurements}  # an appended run's figures from before
    for name in cases:
        print(f"[bench] {name} ...", flush=True)
        # an appended re-run of a case replaces its old figures and skips (not those this run made:
        # the quality case records the tune CLI's own figures under "tuning")
        res.skipped = [k for k in res.skipped if k.case != name]
        res.gates = [g for g in res.gates if g.case != name]
        res.measurements = [m for m in res.measurements if m.case != name or id(m) not in earlier]
        t = time.perf_counter()
        try:
            CASES[name](ctx)
        except Unavailable as exc:
            res.skip(name, "(whole case)", str(exc))
        except Exception as exc:  # one broken case must not lose the others' figures
            traceback.print_exc()
            res.skip(name, "(whole case)", f"crashed: {type(exc).__name__}: {exc}")
        print(f"[bench] {name} done in {time.perf_counter() - t:.0f}s", flush=True)
        res.seconds = before + time.perf_counter() - t0
        if after_case is not None:
            after_case(res)
    return res


def write_all(res: SuiteResult, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path = res.save(folder / f"{stem}.json")
    charts = write_charts(res, folder, stem)
    md = write_markdown(res, folder / f"{stem}.md", charts)
    return [json_path, md, *charts]


def result_stem(cases: list[str], quick: bool, append: bool) -> str:
    """``<date>-<host>[-quick]``, plus the case names when they are not the default set (so a case run
    alone does not replace the day's suite file); an --append run adds to the plain file."""
    stem = f"{dt.date.today().isoformat()}-{socket.gethostname()}{'-quick' if quick else ''}"
    if append or set(cases) <= set(DEFAULT_CASES):
        return stem
    return f"{stem}-{'+'.join(cases)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma-separated cases (default: {', '.join(DEFAULT_CASES)}); any of: {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                    help="fewer repeats, tokens and steps (also BENCH_QUICK=1)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)),
                    help="threads every system gets (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--shared-note", default=os.environ.get("BENCH_SHARED_NOTE", ""),
                    help="a note printed with the results when the machine was shared meanwhile")
    ap.add_argument("--cached-only", action="store_true", default=os.environ.get("BENCH_CACHED_ONLY") == "1",
                    help="tune and export nothing: measure what benchmarks/work/ holds, skip the rest "
                         "(also BENCH_CACHED_ONLY=1)")
    ap.add_argument("--append", action="store_true",
                    help="add to today's result file for this host (other cases, later) instead of replacing it")
    ap.add_argument("--tune-steps", type=int, default=None, help="steps per variant in the tuning case")
    ap.add_argument("--report", type=Path, help="only rewrite the Markdown and charts of this JSON result")
    args = ap.parse_args(argv)
    if args.cached_only:
        import benchmarks.prepare as prep

        prep.CACHED_ONLY = True
    if args.report:
        res = SuiteResult.load(args.report)
        paths = write_all(res, args.report.parent, args.report.stem)
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        stem = result_stem(cases, args.quick, args.append)
        prior = args.out / f"{stem}.json"
        into = SuiteResult.load(prior) if args.append and prior.is_file() else None
        res = run_suite(cases, args.quick, args.threads, args.shared_note, args.tune_steps,
                        after_case=lambda r: write_all(r, args.out, stem), into=into)
        paths = write_all(res, args.out, stem)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
