"""The server's overhead per generated token, against in-process generation on the same artifact.

    .venv/bin/python benchmarks/server_overhead.py ARTIFACT [--threads 2] [--runs 5]

For the same greedy prompt, times ``Generator.generate`` in this process and the same
request through ``edgeft serve`` (a subprocess on loopback) as one JSON response and as a
server-sent-event stream, at two lengths (``--short`` and ``--long`` new tokens). The slope
between the two lengths is the cost per token; its difference between HTTP and in-process
is the server's per-token overhead, the intercept difference its fixed cost per request.
Each is measured in wall time and in CPU time (this process for in-process, the server
process for HTTP): on a shared, loaded machine the CPU time is the steadier of the two.
Both sides use the same thread count and take turns request by request, never at once. Writes
``benchmarks/work/server_overhead.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def measure(paths: dict, lengths: tuple[int, int], runs: int) -> dict[str, dict[str, list[tuple[float, int]]]]:
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
    raise SystemExit("the server did not become healthy")


def fit(short: tuple[float, int], long: tuple[float, int]) -> tuple[float, float]:
    """(seconds per token, fixed seconds) through the two (time, tokens) points."""
    (t1, n1), (t2, n2) = short, long
    per_token = (t2 - t1) / (n2 - n1)
    return per_token, t1 - per_token * n1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=96)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "server_overhead.json")
    a = ap.parse_args()

    import psutil

    proc, url = start_server(a.artifact, a.threads)
    server = psutil.Process(proc.pid)
    server_cpu = lambda: sum(server.cpu_times()[:2])  # noqa: E731 (all the server's threads)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            paths = {"in-process": (in_process(a.artifact, a.threads), time.process_time),
                     "HTTP JSON": (over_http(client, stream=False), server_cpu),
                     "HTTP SSE stream": (over_http(client, stream=True), server_cpu)}
            rows = measure(paths, (a.short, a.long), a.runs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    tokens = {k: [n for _, n in v["wall"]] for k, v in rows.items()}
    if len({tuple(t) for t in tokens.values()}) != 1:
        raise SystemExit(f"the paths generated different token counts: {tokens}")
    result = {"artifact": str(a.artifact), "threads": a.threads, "runs": a.runs, "prompt": PROMPT,
              "tokens": tokens["in-process"], "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
              "paths": {}}
    for kind in ("wall", "cpu"):
        base_tok, base_fixed = fit(*rows["in-process"][kind])
        print(f"\n{kind} time: {'path':<16} {'ms/token':>9} {'fixed ms':>9} {'overhead ms/token':>18}"
              f" {'overhead %':>10} {'fixed overhead ms':>18}")
        for name, pts in rows.items():
            per_tok, fixed = fit(*pts[kind])
            d = {"seconds": [t for t, _ in pts[kind]], "ms_per_token": per_tok * 1e3, "fixed_ms": fixed * 1e3,
                 "overhead_ms_per_token": (per_tok - base_tok) * 1e3,
                 "overhead_pct": 100 * (per_tok - base_tok) / base_tok,
                 "fixed_overhead_ms": (fixed - base_fixed) * 1e3}
            result["paths"].setdefault(name, {})[kind] = d
            print(f"{'':<11}{name:<16} {d['ms_per_token']:9.3f} {d['fixed_ms']:9.2f} "
                  f"{d['overhead_ms_per_token']:18.3f} {d['overhead_pct']:10.1f} {d['fixed_overhead_ms']:18.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tokens generated per request: {tokens['in-process']}; written {a.out}")


if __name__ == "__main__":
    main()
