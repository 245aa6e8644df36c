"""Case ``server_overhead``: the server's cost per generated token, against in-process generation on the same artifact.

    python -m benchmarks.run --cases server_overhead       # the suite's SmolLM2 int8 artifact

In a worker process of its own (``measure``), for the same greedy prompt: ``Generator.generate``
in that process, and the same request through ``edgeft serve`` (a subprocess on loopback) as
one JSON response and as a server-sent-event stream, at two lengths (16 and 96 new tokens).
The slope between the two lengths is the cost per token; its difference between HTTP and
in-process is the server's per-token overhead, the intercept difference its fixed cost per
request. Each is measured in wall time and in CPU time (the worker for in-process, the server
process for HTTP): on a shared, loaded machine the CPU time is the steadier of the two. Both
sides use the same thread count and take turns request by request, never at once (5 runs
each; a quick run: 2).
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "server_overhead"
SHORT, LONG = 16, 96

PROMPT = "Once upon a time, in a quiet village by the sea, there lived an old lighthouse keeper who"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(artifact: Path, threads: int):
    """A function (new tokens -> tokens generated) running ``Generator.generate`` here."""
    from edgeft.runtime import Generator, SamplingParams

    gen = Generator.open(artifact, threads=threads)
    return lambda n: gen.generate(PROMPT, SamplingParams(max_new_tokens=n)).completion_tokens


def over_http(client: httpx.Client, stream: bool):
    """A function (new tokens -> tokens generated) sending one /v1/completions request."""
    def once(n: int) -> int:
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": n, "temperature": 0}
        if not stream:
            return client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
        usage = None
        with client.stream("POST", "/v1/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"]
    return once


def measure_paths(paths: dict, lengths: tuple[int, int], runs: int) -> dict[str, dict[str, list[tuple[float, int]]]]:
    """Median wall and CPU seconds (with tokens) per path and length.

    ``paths`` maps a name to (generate function, CPU clock of the process doing the work).
    The paths take turns request by request, so a drift in the machine's load hits all alike.
    """
    wall = {(name, n): [] for name in paths for n in lengths}
    cpu = {(name, n): [] for name in paths for n in lengths}
    tokens = {}
    for fn, _ in paths.values():
        for n in lengths:
            fn(n)  # warm-up
    for _ in range(runs):
        for n in lengths:
            for name, (fn, clock) in paths.items():
                c0, t0 = clock(), time.perf_counter()
                tokens[name, n] = fn(n)
                wall[name, n].append(time.perf_counter() - t0)
                cpu[name, n].append(clock() - c0)
    return {name: {kind: [(statistics.median(d[name, n]), tokens[name, n]) for n in lengths]
                   for kind, d in (("wall", wall), ("cpu", cpu))} for name in paths}


def start_server(artifact: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from edgeft.cli import main; main()", "serve", str(artifact),
                             "--name", "bench", "--port", str(port), "--threads", str(threads),
                             "--log-level", "warning"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def fit(short: tuple[float, int], long: tuple[float, int]) -> tuple[float, float]:
    """(seconds per token, fixed seconds) through the two (time, tokens) points."""
    (t1, n1), (t2, n2) = short, long
    per_token = (t2 - t1) / (n2 - n1)
    return per_token, t1 - per_token * n1


def measure(spec: dict) -> dict:
    """Both sides' seconds per path, clock and length, and the fitted per-token and fixed costs."""
    import psutil

    artifact, threads = Path(spec["path"]), spec["threads"]
    proc, url = start_server(artifact, threads)
    server = psutil.Process(proc.pid)
    server_cpu = lambda: sum(server.cpu_times()[:2])  # noqa: E731 (all the server's threads)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            paths = {"in-process": (in_process(artifact, threads), time.process_time),
                     "HTTP JSON": (over_http(client, stream=False), server_cpu),
                     "HTTP SSE stream": (over_http(client, stream=True), server_cpu)}
            rows = measure_paths(paths, (SHORT, LONG), spec["runs"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    tokens = {k: [n for _, n in v["wall"]] for k, v in rows.items()}
    if len({tuple(t) for t in tokens.values()}) != 1:
        raise RuntimeError(f"the paths generated different token counts: {tokens}")
    out: dict = {"tokens": tokens["in-process"], "paths": {}}
    for kind in ("wall", "cpu"):
        base_tok, base_fixed = fit(*rows["in-process"][kind])
        for name, pts in rows.items():
            per_tok, fixed = fit(*pts[kind])
            out["paths"].setdefault(name, {})[kind] = {
                "ms_per_token": per_tok * 1e3, "fixed_ms": fixed * 1e3,
                "overhead_ms_per_token": (per_tok - base_tok) * 1e3,
                "overhead_pct": 100 * (per_tok - base_tok) / base_tok, "fixed_overhead_ms": (fixed - base_fixed) * 1e3}
    return out


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, lm_artifact

    art = lm_artifact(ctx, "int8")
    try:
        r = ctx.measure(CASE, path=str(art), runs=2 if ctx.quick else 5)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    note = (f"{CASE}: edgeft int8, the same greedy prompt in-process and through edgeft serve, "
            f"{r['tokens'][0]} and {r['tokens'][1]} new tokens; per-token = the slope between the two lengths, "
            "fixed = its intercept; wall: wall time, cpu: CPU time of the process doing the work")
    for name, kinds in r["paths"].items():
        for kind, d in kinds.items():
            for metric, value in d.items():
                ctx.add(CASE, name, metric, value, "%" if metric.endswith("pct") else "ms", higher=False, clock=kind,
                        note=note)
