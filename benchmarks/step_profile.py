"""Where a batched decode step spends its time: onnxruntime's own call against everything around it.

    python -m benchmarks.step_profile                      # 8 rows and 1 in turn, greedy and sampled; the ratio
    python -m benchmarks.step_profile --rows 8 --mode greedy --repeat 3 --cprofile 20   # and the top 20 of cProfile

Builds what ``edgeft serve`` builds for a generation model (``edgeft.runtime.load`` with the
server's spin reserve, one ``Engine`` with its metrics observer) on the suite's SmolLM2 int8
artifact, and submits ``--rows`` prompts of ``--new`` tokens each (``ignore_eos``, as the serving
benchmark) at once, their chunks handed to an asyncio loop on the main thread as the server's
``Choice`` does. Every iteration of the engine's thread is timed with ``time.perf_counter``, split
into: the graph call (``run_with_iobinding``), the rest of the slots' ``decode`` (mask, binding,
the logits rows copied out), the sampler (chain and pick), detokenizing, stop strings and
the rest of ``SequenceOutput.advance``, the chunk handed to the loop (``on_chunk``), and what is
left (planning, metrics, locks). Only steady iterations count: every row decoding, no prefill.
The instrumentation wraps methods of this process's classes; it changes nothing in edgeft.

The engines for every ``--rows`` are built first and the runs take turns between them; at the end
the script prints the tokens/s ratio of the first ``--rows`` to the last, by the median step's wall
time and by the process's CPU time per generated token (every thread's, onnxruntime's pool
included), which a loaded machine disturbs less. On a loaded machine the absolute times are noise;
the share of a step outside onnxruntime and the per-call costs are what to read, repeated
(``--repeat``) to see that they hold.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import os
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

ARTIFACT = Path(__file__).resolve().parent / "work" / "artifacts" / "smollm2-base-int8"
PROMPTS = ["Write a short poem about the sea.", "Explain how a bicycle works.", "List three uses of copper.",
           "What is the capital of France, and why?", "Describe a rainy afternoon in a city.",
           "Give advice to a new gardener.", "Summarize the plot of a detective story.",
           "Why do leaves change colour in autumn?"]


class Clock:
    """Seconds per category within the current engine iteration, and the finished iterations."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        acc = self.now

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] += time.perf_counter() - t0
        setattr(owner, name, timed)


def instrument_classes(clock: Clock) -> None:
    """Time the per-sequence parts, once per process (they are wrapped on the classes)."""
    from edgeft.runtime import generate
    from edgeft.runtime.detok import IncrementalDetokenizer
    from edgeft.runtime.sampling import Sampler
    from edgeft.runtime.serve import generation

    clock.wrap(generate.SequenceOutput, "advance", "advance")
    clock.wrap(Sampler, "pick", "sample")
    clock.wrap(IncrementalDetokenizer, "add", "detok")
    clock.wrap(generation.Choice, "on_chunk", "deliver")


def instrument(clock: Clock, engine, prof: list) -> None:
    """Time the engine's iteration and its parts (by wrapping methods; see the module docstring).

    ``prof``: a ``cProfile.Profile`` to run on the engine's thread during each iteration (or empty)."""
    clock.wrap(engine.gen.engine, "run", "ort")
    clock.wrap(engine.kv, "decode", "decode")
    clock.wrap(engine.kv, "prefill", "prefill")
    if hasattr(engine.kv, "verify"):
        clock.wrap(engine.kv, "verify", "verify")
    loop_body = engine._decode_step
    prepare = engine._prepare
    report = engine._report

    def step():
        t0 = time.perf_counter()
        loop_body()
        clock.now["step"] += time.perf_counter() - t0

    def prep():
        clock.now.clear()
        if prof:
            prof[0].enable()
        t0 = time.perf_counter()
        prepare()
        clock.now["prepare"] += time.perf_counter() - t0

    def rep():
        t0 = time.perf_counter()
        report()
        clock.now["report"] += time.perf_counter() - t0
        if prof:
            prof[0].disable()
        clock.now["rows"] = engine.stats.last_batch
        clock.steps.append(dict(clock.now))
    engine._decode_step, engine._prepare, engine._report = step, prep, rep


def split(it: dict[str, float]) -> dict[str, float]:
    """One iteration's seconds by what spent them (the parts add up to the iteration)."""
    ort, decode, advance = it.get("ort", 0.0), it.get("decode", 0.0), it.get("advance", 0.0)
    sample, detok = it.get("sample", 0.0), it.get("detok", 0.0)
    deliver = it.get("deliver", 0.0)
    total = it.get("prepare", 0.0) + it.get("step", 0.0) + it.get("report", 0.0)
    return {"total": total, "ort": ort, "decode_rest": decode - ort, "sample": sample, "detok": detok,
            "advance_rest": advance - sample - detok, "deliver": deliver,
            "other": total - decode - advance - deliver}


async def run_once(engine, gen, rows: int, new: int, params) -> float:
    """``rows`` sequences submitted at once; their chunks delivered to this loop as the server's ``Choice``."""
    from edgeft.runtime.serve.generation import Choice

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    choices = [Choice(i, loop, events) for i in range(rows)]
    ids = [gen.encode(PROMPTS[i % len(PROMPTS)]) for i in range(rows)]
    t0 = time.perf_counter()
    for c, p in zip(choices, ids):
        c.seq = engine.submit(p, params, c.on_chunk)
    left = rows
    while left:
        _, chunk = await events.get()
        if isinstance(chunk, BaseException):
            raise chunk
        left -= chunk.finish_reason is not None
    return time.perf_counter() - t0


async def clients(engine, gen, rows: int, per: int, new: int, params) -> float:
    """As the serving benchmark: ``rows`` clients, each sending ``per`` requests back to back, a new prompt each."""
    from benchmarks.serving import prompts
    from edgeft.runtime.serve.generation import Choice

    loop = asyncio.get_running_loop()
    texts = prompts(rows * per)

    async def client(i: int) -> None:
        for k in range(per):
            events: asyncio.Queue = asyncio.Queue()
            c = Choice(0, loop, events)
            c.seq = engine.submit(gen.encode(texts[i * per + k]), params, c.on_chunk)
            while True:
                _, chunk = await events.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk.finish_reason is not None:
                    break
    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(rows)])
    return time.perf_counter() - t0


def serving_shares(clock: Clock) -> str:
    """Where the engine thread's time went over a back-to-back run: prefill, decode, verify calls and the rest."""
    tot = collections.Counter()
    for it in clock.steps:
        tot.update({k: it.get(k, 0.0) for k in ("prefill", "decode", "verify", "advance", "deliver")})
        tot["total"] += it.get("prepare", 0.0) + it.get("step", 0.0) + it.get("report", 0.0)
    clock.steps.clear()
    t = tot["total"] or 1.0
    rest = t - tot["prefill"] - tot["decode"] - tot["verify"]
    return (f"prefill calls {100 * tot['prefill'] / t:.1f}%, decode calls {100 * tot['decode'] / t:.1f}%, "
            f"verify calls {100 * tot['verify'] / t:.1f}%, everything else {100 * rest / t:.1f}% "
            f"(of which sampling/detok/stops {100 * tot['advance'] / t:.1f}%, handing chunks over "
            f"{100 * tot['deliver'] / t:.1f}%)")


def build(artifact: Path, rows: int, spin):
    """A Generator and Engine as ``edgeft serve --parallel rows`` builds them."""
    from edgeft.runtime import load
    from edgeft.runtime.engine import Engine
    from edgeft.runtime.serve.metrics import Registry, engine_observer

    gen = load(artifact, spin=spin, reserve=1.0 if rows > 1 else 0.0)
    engine = Engine(gen, parallel=rows, ctx_size=rows * 512, queue_size=8 * rows, prefix_cache=0,
                    observe=engine_observer(Registry(), "bench"))
    return gen, engine


def summarize(clock: Clock, rows: int) -> dict[str, float]:
    steady = [split(s) for s in clock.steps if s.get("rows") == rows and not s.get("prefill")]
    clock.steps.clear()
    keys = ["total", "ort", "decode_rest", "sample", "detok", "advance_rest", "deliver", "other"]
    med = {k: statistics.median(s[k] for s in steady) for k in keys} if steady else {}
    tot = sum(s["total"] for s in steady) or 1.0
    shares = {k: sum(s[k] for s in steady) / tot for k in keys[1:]}
    tail = {"ms_deliver_p90": 1e3 * statistics.quantiles([s["deliver"] for s in steady], n=10)[-1]} if len(steady) > 1 else {}
    return {"steps": len(steady), **{f"ms_{k}": 1e3 * v for k, v in med.items()}, **tail,
            **{f"share_{k}": v for k, v in shares.items()}}


def report_line(label: str, s: dict[str, float]) -> str:
    parts = [f"{label}: {s['steps']} steady steps", f"step {s.get('ms_total', 0):.2f} ms",
             f"outside onnxruntime {100 * (1 - s.get('share_ort', 0)):.1f}%"]
    parts += [f"{k} {s.get('ms_' + k, 0):.3f} ms ({100 * s.get('share_' + k, 0):.1f}%)"
              for k in ("decode_rest", "sample", "detok", "advance_rest", "deliver", "other")]
    parts.append(f"deliver p90 {s.get('ms_deliver_p90', 0):.3f} ms")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=ARTIFACT)
    ap.add_argument("--rows", type=int, nargs="*", default=[8, 1])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--mode", choices=["greedy", "sample", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--spin", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--serving", type=int, default=0, metavar="N",
                    help="instead: each of --rows clients sends N requests back to back (the serving benchmark's "
                         "prompts, greedy, speculation as the server's default)")
    ap.add_argument("--speculate", choices=["auto", "on", "off"], default="auto", help="with --serving")
    ap.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by own time")
    a = ap.parse_args()
    from edgeft.runtime.params import Spin

    print(f"load average {os.getloadavg()}")
    clock = Clock()
    instrument_classes(clock)
    built = {}
    for rows in a.rows:  # every engine first, so that the runs alternate between them
        gen, engine = build(a.artifact, rows, Spin(a.spin))
        print(f"rows {rows}: threads spin={gen.spinning} ({gen.spin_reason})")
        prof: list = []
        instrument(clock, engine, prof)
        built[rows] = (gen, engine, prof)
    if a.serving:
        seen = collections.defaultdict(list)
        for r in range(a.repeat):
            for rows, (gen, engine, _) in built.items():
                seen[rows].append(serve_run(a, engine, gen, rows, clock, r))
        hi, lo = a.rows[0], a.rows[-1]
        if hi != lo:
            rate = {n: statistics.median(x for x, _ in seen[n]) for n in (hi, lo)}
            cpu = {n: statistics.median(y for _, y in seen[n]) for n in (hi, lo)}
            print(f"serving shape: tokens/s, {hi} clients against {lo}: {rate[hi] / rate[lo]:.2f}x by wall time, "
                  f"{cpu[lo] / cpu[hi]:.2f}x by process CPU per token")
    else:
        decode_runs(a, built, clock)
    for _, engine, _ in built.values():
        engine.close()


def decode_runs(a, built: dict, clock: Clock) -> None:
    """``--repeat`` rounds of every mode on every engine in turn; then the tokens/s ratios of the first rows to the last."""
    from edgeft.runtime.params import SamplingParams

    modes = ["greedy", "sample"] if a.mode == "both" else [a.mode]
    seen: dict[tuple[int, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for r in range(a.repeat):
        for mode in modes:
            params = SamplingParams(max_new_tokens=a.new, ignore_eos=True, speculate="off",
                                    **({"temperature": 0.0} if mode == "greedy" else {"temperature": 1.0, "seed": 7}))
            for rows, (gen, engine, prof) in built.items():
                prof[:] = [cProfile.Profile()] if a.cprofile and r == a.repeat - 1 else []
                cpu0 = time.process_time()
                wall = asyncio.run(run_once(engine, gen, rows, a.new, params))
                cpu = time.process_time() - cpu0
                s = summarize(clock, rows)
                seen[rows, mode].append((s.get("ms_total", 0.0), 1e3 * cpu / (rows * a.new)))
                print(report_line(f"rows {rows} {mode} run {r}{' (cProfile on)' if prof else ''}", s)
                      + f"; wall {wall:.2f} s; process CPU {seen[rows, mode][-1][1]:.2f} ms per token")
                if prof:
                    out = io.StringIO()
                    pstats.Stats(prof[0], stream=out).sort_stats("tottime").print_stats(a.cprofile)
                    print(out.getvalue())
                    prof.clear()
    hi, lo = a.rows[0], a.rows[-1]
    for mode in modes if hi != lo else ():
        step = {n: statistics.median(x for x, _ in seen[n, mode]) for n in (hi, lo)}
        cpu = {n: statistics.median(y for _, y in seen[n, mode]) for n in (hi, lo)}
        print(f"{mode}: steady decode tokens/s, {hi} rows against {lo}: {(hi / step[hi]) / (lo / step[lo]):.2f}x "
              f"by the median step's wall time, {cpu[lo] / cpu[hi]:.2f}x by process CPU per token")


def serve_run(a, engine, gen, rows: int, clock: Clock, r: int) -> tuple[float, float]:
    """One back-to-back run (``--serving``): tokens/s, CPU ms per token (returned) and where the engine thread's
    time went (printed)."""
    from edgeft.runtime.params import SamplingParams

    params = SamplingParams(max_new_tokens=a.new, ignore_eos=True, temperature=0.0, speculate=a.speculate)
    cpu0 = time.process_time()
    wall = asyncio.run(clients(engine, gen, rows, a.serving, a.new, params))
    cpu = time.process_time() - cpu0
    n = rows * a.serving * a.new
    print(f"rows {rows} serving run {r}: {n} tokens, {n / wall:.1f} tok/s, process CPU "
          f"{1e3 * cpu / n:.2f} ms per token; engine thread: {serving_shares(clock)}")
    return n / wall, 1e3 * cpu / n


if __name__ == "__main__":
    main()
