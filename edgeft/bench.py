"""Measuring one thing well: timing statistics, memory bandwidth, and one artifact alone.

What ``edgeft bench ARTIFACT`` runs, and the building blocks ``benchmarks/`` (the suite
that compares edgeft with the alternatives) reuses:

- ``Stat`` / ``summarize`` / ``timeit``: every figure is a median of several runs after a
  warm-up, reported with its spread (quartiles, min, max).
- ``memory_bandwidth``: this machine's memory read bandwidth (numpy max-reductions over a large
  array, one slice per thread), the physical limit for decoding.
- ``bench_generator`` / ``bench_classifier``: decode and prefill tokens/s, time to first
  token; classification throughput and latency percentiles per batch size.
- ``onnx_weight_bytes``: bytes of weights a decoder reads per generated token.
- ``peak_rss_mib``: the process's peak resident memory.
- ``cpu_name`` / ``cpu_isa``: which CPU and instruction sets (AVX2, AVX-512, VNNI, AMX...)
  the figures were measured on, so results from different machines can be told apart.

It knows nothing of torch or of the other systems the suite compares against; it imports
only numpy and the standard library at import time, and ``edgeft.runtime`` inside
functions, so it runs where only the runtime extra is installed.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.artifact import Task
from edgeft.bench_config import BenchConfig
from edgeft.errors import EdgeftError


@dataclass(frozen=True)
class Stat:
    """The median of ``n`` measurements with its spread."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def scaled(self, factor: float) -> "Stat":
        """The same figures multiplied by ``factor`` (for unit changes)."""
        return Stat(self.median * factor, self.q1 * factor, self.q3 * factor,
                    self.min * factor, self.max * factor, self.n)

    def inverse(self, numerator: float = 1.0) -> "Stat":
        """``numerator / x`` for each figure (seconds -> rate); quartiles and extremes swap."""
        f = lambda x: numerator / x if x > 0 else float("inf")  # noqa: E731
        return Stat(f(self.median), f(self.q3), f(self.q1), f(self.max), f(self.min), self.n)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stat":
        return cls(**{k: d[k] for k in ("median", "q1", "q3", "min", "max", "n")})

    def __str__(self) -> str:
        return f"{self.median:.4g} (IQR {self.q1:.4g}-{self.q3:.4g}, n={self.n})"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> Stat:
    """Median, quartiles and extremes of the measurements."""
    if not values:
        raise ValueError("cannot summarize no measurements")
    return Stat(statistics.median(values), percentile(values, 25), percentile(values, 75),
                min(values), max(values), len(values))


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Run ``fn`` ``warmup`` times unmeasured, then ``repeats`` times; return seconds per run."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "bmi", "vnni", "vaes", "vpclmulqdq", "sha_ni")


def cpu_flags() -> list[str]:
    """The CPU's flags as Linux's /proc/cpuinfo lists them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cpu_isa(flags: Sequence[str] | None = None) -> list[str]:
    """The instruction-set flags among ``flags`` (default: this CPU's): SSE, AVX*, FMA, F16C, AMX..."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in flags if f.startswith(ISA_PREFIXES))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_summary(isa: Sequence[str]) -> str:
    """A short label of the widest vector extensions in ``isa``: 'AVX-512 (VNNI, BF16)', 'AVX2', ..."""
    have = set(isa)
    if "avx512f" in have:
        extra = [n for f, n in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX")) if f in have]
        return "AVX-512" + (f" ({', '.join(extra)})" if extra else "")
    if "avx2" in have:
        return "AVX2" + (" (AVX-VNNI)" if "avx_vnni" in have else "")
    return "AVX" if "avx" in have else ("SSE" if any(f.startswith("sse") for f in have) else "unknown")


def memory_bandwidth(threads: int = 2, mib: int = 1024, repeats: int = 5) -> Stat:
    """Memory read bandwidth in GB/s: ``threads`` threads each reading their slice of one array.

    Each thread takes the ``max`` of its slice: a SIMD reduction that runs at memory speed
    (a float ``sum`` is pairwise and compute-bound, which understates bandwidth by about 2x).
    numpy releases the GIL inside the reduction, so the threads read memory in parallel.
    The array (``mib`` MiB of float32) is far larger than any CPU cache.
    """
    data = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    sink = [0.0] * threads

    def read_all() -> None:
        def work(i: int) -> None:
            sink[i] = float(parts[i].max())

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    secs = timeit(read_all, repeats=repeats, warmup=1)
    return summarize(secs).inverse(data.nbytes / 1e9)


# ---------------------------------------------------------------- weights read per token


def onnx_weight_bytes(model_file: Path) -> int:
    """Bytes of initializers a decode step reads: all of them except lookup-only tables.

    An initializer that only feeds ``Gather`` nodes (an embedding table) costs one row per
    token, not its whole size. Needs the ``onnx`` package; external data is not loaded.
    """
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in _all_nodes(model.graph):
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        total += _tensor_bytes(init)
    return total


def _all_nodes(graph):  # onnx types
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _all_nodes(attr.g)


def _tensor_bytes(t) -> int:
    import onnx

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


def artifact_weight_bytes(folder: Path, graph_file: str) -> int:
    """Bytes read per token for an artifact's graph; total weight file size without ``onnx``."""
    path = Path(folder) / graph_file
    try:
        return onnx_weight_bytes(path)
    except ImportError:
        return sum(p.stat().st_size for p in Path(folder).iterdir()
                   if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))


# ---------------------------------------------------------------- one artifact alone


@dataclass(frozen=True)
class GenerationFigures:
    """What a generation benchmark reports for one system."""

    decode_tps: Stat  # tokens/s while decoding (after the first token)
    ttft_s: Stat  # seconds from call to first token, prompt of ``prompt_tokens``
    prefill_tps: dict[int, Stat]  # prompt length -> prompt tokens/s
    new_tokens: int  # tokens generated per decode run (median)
    prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"decode_tps": self.decode_tps.to_dict(), "ttft_s": self.ttft_s.to_dict(),
                "prefill_tps": {str(k): v.to_dict() for k, v in self.prefill_tps.items()},
                "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens}


def prompt_ids(encode: Callable[[str], list[int]], text: str, length: int) -> list[int]:
    """Exactly ``length`` token ids taken from ``text`` (repeated if it is too short)."""
    ids = encode(text)
    if not ids:
        raise EdgeftError("the prompt text encodes to no tokens")
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


OnToken = Callable[[], None]
Runner = Callable[[list[int], int, OnToken], None]  # run(prompt ids, new tokens, called per token)


def bench_generation(
    run: Runner,
    decode_prompt: list[int],
    prefill_prompts: dict[int, list[int]],
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
) -> GenerationFigures:
    """Time any system given as ``run(ids, max_new_tokens, on_token)``.

    ``run`` must call ``on_token()`` as each new token becomes available. Decode rate is
    (tokens after the first) / (time after the first), so prefill does not count; time to
    first token uses ``decode_prompt``; prefill rate at length L is L / (time to the first
    token with an L-token prompt).
    """
    decode, ttft, counts = [], [], []
    for i in range(warmup + repeats):
        stamps: list[float] = []
        t0 = time.perf_counter()
        run(decode_prompt, new_tokens, lambda s=stamps: s.append(time.perf_counter()))
        if i >= warmup and len(stamps) >= 2:
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            ttft.append(stamps[0] - t0)
            counts.append(len(stamps))
    if not decode:
        raise EdgeftError("the model stopped after one token in every run; cannot time decoding")
    prefill = {}
    for length, ids in prefill_prompts.items():
        secs = []
        for i in range(warmup + repeats):
            stamps = []
            t0 = time.perf_counter()
            run(ids, 1, lambda s=stamps: s.append(time.perf_counter()))
            if i >= warmup and stamps:
                secs.append(stamps[0] - t0)
        prefill[length] = summarize(secs).inverse(length)
    return GenerationFigures(summarize(decode), summarize(ttft), prefill,
                             int(statistics.median(counts)), len(decode_prompt))


def edgeft_runner(gen, speculate: str = "off") -> Runner:  # runtime.Generator
    """``run(ids, n, on_token)`` over edgeft's runtime, greedy, not stopping at end-of-sequence.

    Benchmarks need the same token count from every system: ``ignore_eos`` keeps decoding
    past end-of-sequence tokens. Prompt-lookup speculation is off unless asked for, so decode
    speed compares like with like against peers that decode one token per step.
    """
    from edgeft.runtime import SamplingParams

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, speculate=speculate)
        for _ in gen.stream(list(ids), params):
            on_token()

    return run


@dataclass(frozen=True)
class ClassifyFigures:
    """Throughput and latency of a classifier at one batch size."""

    batch: int
    throughput: float  # texts/s over all measured batches
    p50_ms: float
    p95_ms: float
    latency_ms: Stat

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = self.latency_ms.to_dict()
        return d


def bench_batches(predict: Callable[[list[str]], Any], texts: list[str], batch: int,
                  batches: int, warmup: int = 2) -> ClassifyFigures:
    """Call ``predict`` on ``batches`` consecutive batches of ``batch`` texts (after warm-up)."""
    if len(texts) < batch:
        raise EdgeftError(f"need at least {batch} texts, got {len(texts)}")
    chunks = [texts[(i * batch) % (len(texts) - batch + 1):][:batch] for i in range(warmup + batches)]
    for c in chunks[:warmup]:
        predict(c)
    lat = []
    for c in chunks[warmup:]:
        t0 = time.perf_counter()
        predict(c)
        lat.append((time.perf_counter() - t0) * 1000)
    return ClassifyFigures(batch, batch * len(lat) / (sum(lat) / 1000), percentile(lat, 50),
                           percentile(lat, 95), summarize(lat))


DEFAULT_TEXT = (
    "From fairest creatures we desire increase, that thereby beauty's rose might never die, "
    "but as the riper should by time decease, his tender heir might bear his memory: but thou, "
    "contracted to thine own bright eyes, feed'st thy light's flame with self-substantial fuel, "
    "making a famine where abundance lies, thyself thy foe, to thy sweet self too cruel. "
)


def bench_artifact(config: BenchConfig) -> dict[str, Any]:
    """Measure one artifact alone with edgeft's runtime; a JSON-ready dict."""
    from edgeft import runtime

    threads = config.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    model = runtime.load(config.artifact, threads=threads, spin=config.spin)
    load_s = time.perf_counter() - t0
    m = model.manifest
    isa = cpu_isa()
    out: dict[str, Any] = {"artifact": str(config.artifact), "task": m.task.value, "threads": threads,
                           "quantization": m.quantization.scheme, "load_s": load_s,
                           "repeats": config.repeats, "cpu": cpu_name(), "isa": isa, "isa_summary": isa_summary(isa)}
    if m.task is Task.causal_lm:
        out["spin"], out["spin_reason"] = model.spinning, model.spin_reason
        lengths = [n for n in config.prompt_lengths if n + config.new_tokens <= m.decoder.context_length]
        fig = bench_generation(edgeft_runner(model), prompt_ids(model.encode, DEFAULT_TEXT, 32),
                               {n: prompt_ids(model.encode, DEFAULT_TEXT, n) for n in lengths},
                               config.new_tokens, config.repeats, config.warmup)
        out["generation"] = fig.to_dict()
        folder = Path(getattr(model, "folder", config.artifact))
        try:
            out["weight_mib_per_token"] = artifact_weight_bytes(folder, m.graph.file) / 2**20
        except OSError:
            pass
        if config.bandwidth and "weight_mib_per_token" in out:
            out.update(bandwidth_share(fig.decode_tps.median, out["weight_mib_per_token"] * 2**20, threads))
    else:
        texts = [s.strip() for s in DEFAULT_TEXT.replace(":", ",").split(",") if s.strip()]
        texts = (texts * (max(config.batch_sizes) // len(texts) + 2))
        out["classification"] = [
            bench_batches(lambda b: model.predict_proba(b, batch_size=len(b)), texts, b,
                          batches=max(config.repeats, 3), warmup=config.warmup).to_dict()
            for b in config.batch_sizes
        ]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def bandwidth_share(decode_tps: float, weight_bytes: float, threads: int, mib: int = 1024,
                    repeats: int = 5) -> dict[str, float]:
    """Read bandwidth measured as the suite measures it, the decode limit it sets, and the share reached.

    The limit is bandwidth / bytes of weights read per token: no decoder that reads every
    weight once per token can go faster on this machine.
    """
    bw = memory_bandwidth(threads, mib, repeats).median
    limit = bw * 1e9 / weight_bytes
    return {"read_gbps": bw, "limit_tps": limit, "bandwidth_share": decode_tps / limit}


def format_report(r: dict[str, Any]) -> str:
    """The human-readable lines ``edgeft bench`` prints."""
    lines = [f"{r['artifact']}: {r['task']}, {r.get('quantization')}, {r['threads']} threads, "
             f"loaded in {r['load_s']:.2f}s, median of {r['repeats']} runs [IQR]"]
    if r.get("cpu"):
        lines.append(f"  cpu      {r['cpu']} ({r.get('isa_summary', '?')})")
    if "spin" in r:
        lines.append(f"  threads  {'spin' if r['spin'] else 'sleep'} when idle ({r.get('spin_reason', '')})")
    g = r.get("generation")
    if g:
        d, t = Stat.from_dict(g["decode_tps"]), Stat.from_dict(g["ttft_s"]).scaled(1000)
        lines.append(f"  decode   {d.median:8.1f} tok/s  [{d.q1:.1f}-{d.q3:.1f}]  ({g['new_tokens']} new tokens)")
        lines.append(f"  ttft     {t.median:8.1f} ms     [{t.q1:.1f}-{t.q3:.1f}]  ({g['prompt_tokens']}-token prompt)")
        for n, st in g["prefill_tps"].items():
            p = Stat.from_dict(st)
            lines.append(f"  prefill  {p.median:8.1f} tok/s  [{p.q1:.1f}-{p.q3:.1f}]  ({n}-token prompt)")
        if "weight_mib_per_token" in r:
            lines.append(f"  weights read per token: {r['weight_mib_per_token']:.1f} MiB")
        if "bandwidth_share" in r:
            lines.append(f"  read bandwidth {r['read_gbps']:.1f} GB/s -> limit {r['limit_tps']:.0f} tok/s; "
                         f"decode reaches {r['bandwidth_share']:.2f} of it")
    for c in r.get("classification", []):
        lines.append(f"  batch {c['batch']:>3}: {c['throughput']:8.1f} texts/s   p50 {c['p50_ms']:.1f} ms"
                     f"   p95 {c['p95_ms']:.1f} ms")
    lines.append(f"  peak memory {r['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)
