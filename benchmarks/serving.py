"""Case ``serving``: many users at once, edgeft serve against llama.cpp's llama-server, same slots, same weights.

    python -m benchmarks.run --cases serving          # ~20 min; BENCH_QUICK=1: 1 request a client, 15 s overload
    BENCH_SERVING_LEVELS=1,8 python -m benchmarks.run --cases serving   # those client counts only
    BENCH_SERVING_REQUESTS=8 ...                                          # requests per client (3)

In a worker process of its own (``measure``): starts every server once, on loopback, one after
another (each healthy before the next loads, so an edgeft server's spin choice sees idle cores; idle
servers sleep), then for each client count (1, 4, 8, 16) takes turns system by system: N
streaming clients each send requests back to back (``/v1/completions``, greedy, 64 new tokens
with ``ignore_eos`` so every request costs the same; each client its own prompt, so no prefix is
shared). Per system and client count: aggregate tokens/s (every completion token / the phase's
wall time) and time to first token p50/p95. Then edgeft alone under overload: 64 streaming chat
clients for 45 s, each retrying 0.2 s after a 429; every status code is counted, and an admitted
request that does not end with ``[DONE]`` and all its tokens is a failure.

edgeft runs the suite's int8 artifact and its int8-dynamic one (``-q int8 --int8-mode dynamic``: int8
activations, onnxruntime's u8s8 kernels; ``BENCH_SERVING_ARTIFACTS=int8`` serves the first alone) with
their defaults and ``--parallel 8`` (threads: all cores), each again with ``--speculate off`` (prompt-lookup
drafts speed a lone client up and are never verified beside other rows, so the N-clients-over-one ratio
is given both ways);
llama-server (the native build of ``benchmarks.llamacpp``; without one its rows are skipped with
the reason) runs ``-np 8 -c 8*SLOT`` and its own default thread count, as its users do, with idle
threads sleeping (``--poll 0``, ``OMP_WAIT_POLICY=PASSIVE``, as for every system in benchmarks/;
``BENCH_LLAMA_POLL=default`` keeps its own polling), on the Q8_0 re-encoding of the shipped Q4_1
GGUF and on the Q4_1 itself. Goals are in ``benchmarks.headline``. Earlier runs of the script this
case replaces are kept as written: ``results/serving-2026-12-02*.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from benchmarks import llamacpp, prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "serving"
REPO = prepare.REPO
LEVELS, NP, NEW_TOKENS, OVERLOAD_CLIENTS = (1, 4, 8, 16), 8, 64, 64
# edgeft a second time without prompt-lookup drafts: they speed a lone client up and never run beside
# other rows, so the N-clients-over-one ratio is shown with and without them
SPECULATE_OFF = ("--speculate", "off")
SLOT = 512  # tokens per slot: prompt (~40) + new tokens, with room
# the artifacts edgeft serves (``lm_artifact``'s names): weight-only int8, whose 8-bit block kernel costs
# about 3x a lone row's time at 8 rows, and int8-dynamic, whose u8s8 kernel costs about 1.5x
ARTIFACTS = ("int8", "int8-dynamic")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    """``n`` different prompts cut from the sonnets (about 40 tokens each), none a prefix of another."""
    lines = [ln.strip() for ln in (REPO / "demo" / "sonnets.txt").read_text().splitlines() if len(ln.strip()) > 20]
    out = []
    for i in range(n):
        out.append(f"Sonnet {i + 1}. " + " ".join(lines[(7 * i) % (len(lines) - 4):][:4]))
    return out


# ---------------------------------------------------------------- servers


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = prepare.WORK / "logs" / f"serving-{name.replace(' ', '_')}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=REPO)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def edgeft_server(artifact: Path, np_: int, flags: tuple[str, ...] = (), quant: str = "int8") -> Server:
    """``edgeft serve`` on ``artifact``; named "edgeft" (the int8 artifact) or "edgeft QUANT", then its flags."""
    port = _free_port()
    exe = Path(sys.executable).with_name("edgeft")
    cmd = [str(exe), "serve", str(artifact), "--name", "bench", "--port", str(port), "--parallel", str(np_),
           "--ctx-size", str(np_ * SLOT), "--log-level", "info", *flags]  # info: its load line says if threads spin
    return Server(" ".join(["edgeft" if quant == "int8" else f"edgeft {quant}", *flags]), cmd, port)


def llama_server(bin_dir: Path, gguf: Path, np_: int, tag: str) -> Server:
    port = _free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--port", str(port), "-np", str(np_),
           "-c", str(np_ * SLOT), "--host", "127.0.0.1", "--no-webui"]
    if os.environ.get("BENCH_LLAMA_POLL") == "default":
        # llama.cpp exactly as its users run it: its own default (spinning) thread polling.
        return Server(f"llama-server {tag}", cmd, port)
    # Idle threads sleep, as for every system in benchmarks/ (README, Method): on a loaded machine
    # llama-server's default polling threads decoded at about 1 token/s here.
    return Server(f"llama-server {tag}", cmd + ["--poll", "0"], port, env={"OMP_WAIT_POLICY": "PASSIVE"})


# ---------------------------------------------------------------- clients


async def one_request(client: httpx.AsyncClient, route: str, body: dict) -> dict:
    """One streamed request: status, seconds to the first token, tokens, whether it ended with [DONE]."""
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "seconds": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                for ch in ev.get("choices") or ():
                    text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                    if text:
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - t0
                usage = ev.get("usage")
                if usage and usage.get("completion_tokens"):
                    tokens = max(tokens, usage["completion_tokens"])
                if ev.get("timings", {}).get("predicted_n"):  # llama-server's own count
                    tokens = max(tokens, ev["timings"]["predicted_n"])
    except httpx.HTTPError as exc:
        return {"status": -1, "error": type(exc).__name__, "seconds": time.perf_counter() - t0}
    return {"status": 200, "ttft": first, "tokens": tokens, "done": done, "seconds": time.perf_counter() - t0}


def completion_body(prompt: str, new_tokens: int) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def phase(url: str, clients: int, per_client: int, new_tokens: int, texts: list[str]) -> dict:
    """``clients`` streaming clients, ``per_client`` requests each back to back: aggregate tok/s, TTFT."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        async def worker(i: int) -> list[dict]:
            return [await one_request(c, "/v1/completions", completion_body(texts[(i + k * clients) % len(texts)],
                                                                            new_tokens)) for k in range(per_client)]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(i) for i in range(clients)]) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and r.get("ttft") is not None]
    ttfts = sorted(r["ttft"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "ok": len(ok), "wall_s": wall, "tokens": tokens,
            "aggregate_tok_s": tokens / wall, "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95),
            "statuses": _count(r["status"] for r in results), "load_avg_before": load0,
            "load_avg_after": os.getloadavg()}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in items:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


async def overload(url: str, clients: int, seconds: float, new_tokens: int) -> dict:
    """``clients`` streaming chat clients for ``seconds``: every status; admitted requests must complete."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            while time.perf_counter() < stop_at:
                body = {"model": "bench", "messages": [{"role": "user", "content": f"Write line {i} of a sonnet."}],
                        "max_tokens": new_tokens, "stream": True, "ignore_eos": True,
                        "stream_options": {"include_usage": True}}
                r = await one_request(c, "/v1/chat/completions", body)
                results.append(r)
                if r["status"] == 429:
                    await asyncio.sleep(0.2)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(i) for i in range(clients)])
        wall = time.perf_counter() - t0
    admitted = [r for r in results if r["status"] == 200]
    incomplete = [r for r in admitted if not r.get("done") or r.get("tokens", 0) < new_tokens]
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(results),
            "statuses": _count(r["status"] for r in results), "admitted": len(admitted),
            "admitted_incomplete": len(incomplete), "server_errors": sum(1 for r in results if r["status"] >= 500),
            "transport_errors": sum(1 for r in results if r["status"] == -1),
            "tokens": sum(r.get("tokens", 0) for r in admitted),
            "load_avg_before": load0, "load_avg_after": os.getloadavg()}


# ---------------------------------------------------------------- the case


def measure(spec: dict) -> dict:
    """Every phase against servers this (worker) process starts and stops."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    starts: list[Callable[[], Server]] = [partial(edgeft_server, Path(path), spec["np"], flags, quant)
                                          for quant, path in spec["artifacts"].items()
                                          for flags in ((), SPECULATE_OFF)]
    if spec.get("llama_bin"):
        starts += [partial(llama_server, Path(spec["llama_bin"]), Path(spec["gguf"][tag]), spec["np"], tag)
                   for tag in ("Q8_0", "Q4_1")]
    texts = prompts(max(spec["levels"]) * spec["per_client"])
    servers: list[Server] = []
    result: dict = {"rows": {}, "servers": {}}
    try:
        # one at a time, each healthy before the next starts: an edgeft server decides at load whether its
        # threads spin from how busy the cores are, which another server's loading would make them
        for start in starts:
            servers.append(s := start())
            s.wait()
            asyncio.run(phase(s.url, 1, 1, 8, texts))  # warm-up
            result["rows"][s.name], result["servers"][s.name] = {}, s.cmd
            time.sleep(1.0)  # the warm-up's busy cores out of the next load's sample
        for c in spec["levels"]:
            for s in servers:
                result["rows"][s.name][c] = asyncio.run(phase(s.url, c, spec["per_client"], spec["new_tokens"], texts))
        for s in servers[1:]:
            s.stop()
        if spec["overload_seconds"] > 0:
            result["overload"] = asyncio.run(overload(servers[0].url, spec["overload_clients"],
                                                      spec["overload_seconds"], spec["new_tokens"]))
        metrics = httpx.get(servers[0].url + "/metrics", timeout=10).text
        result["edgeft_metrics"] = [ln for ln in metrics.splitlines()
                                    if ln.startswith(("edgeft_decode_batch_size_sum", "edgeft_decode_batch_size_count",
                                                      "edgeft_queue_wait_seconds_sum", "edgeft_rejected_total",
                                                      "edgeft_queue_wait_seconds_count"))]
    finally:
        for s in servers:
            s.stop()
    # each edgeft server's load line: whether its threads spin, and what the machine showed then
    result["spin"] = {s.name: m.group(0) for s in servers if s.name.startswith("edgeft")
                      and (m := re.search(r"threads (spin|sleep) \((?:[^()]|\([^)]*\))*\)", s.log.read_text(errors="replace")))}
    return result


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, lm_artifact

    levels = [int(c) for c in os.environ.get("BENCH_SERVING_LEVELS", ",".join(map(str, LEVELS))).split(",") if c]
    quants = [q for q in os.environ.get("BENCH_SERVING_ARTIFACTS", ",".join(ARTIFACTS)).split(",") if q]
    spec = {"artifacts": {q: str(lm_artifact(ctx, q)) for q in quants}, "np": NP, "levels": levels, "new_tokens": NEW_TOKENS,
            "per_client": 1 if ctx.quick else int(os.environ.get("BENCH_SERVING_REQUESTS", 3)),
            "overload_clients": OVERLOAD_CLIENTS,
            "overload_seconds": 15.0 if ctx.quick else 45.0}
    try:
        spec["llama_bin"] = str(prepare.llama_bin())
        ctx.res.notes.append(llamacpp.build_note(Path(spec["llama_bin"])))
        spec["gguf"] = {tag: str(prepare.ensure_gguf(tag)) for tag in ("Q8_0", "Q4_1")}
    except prepare.Unavailable as exc:
        spec["llama_bin"] = None
        for tag in ("Q8_0", "Q4_1"):
            ctx.res.skip(CASE, f"llama-server {tag}", str(exc))
    try:
        r = ctx.measure(CASE, timeout=3600, **spec)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    poll = "its own default polling" if os.environ.get("BENCH_LLAMA_POLL") == "default" else "--poll 0"
    for name, tab in r["rows"].items():
        quant = next((q for q in quants if q != "int8" and q in name.split()), "int8")
        flags = " ".join(w for w in name.split()[1:] if w != quant)
        note = (f"{name}: `{' '.join(r['servers'][name][1:])}`" if not name.startswith("edgeft") else
                f"{name}: `edgeft serve --parallel {NP}{' ' + flags if flags else ''}` on the {quant} artifact, "
                "threads: all cores")
        for c, row in tab.items():
            c = int(c)
            ctx.add(CASE, name, "aggregate_tps", row["aggregate_tok_s"], "tok/s", clients=c,
                    note=note + (f"; llama-server with {poll}" if not name.startswith("edgeft") else ""))
            for q in ("p50", "p95"):
                if row[f"ttft_{q}_s"] is not None:
                    ctx.add(CASE, name, f"ttft_{q}_ms", 1000 * row[f"ttft_{q}_s"], "ms", higher=False, clients=c)
            ctx.add(CASE, name, "ok_share", row["ok"] / max(row["requests"], 1), "share", clients=c)
            ctx.add(CASE, name, "load_1m", row["load_avg_before"][0], "load", higher=False, clients=c)
    o = r.get("overload")
    if o:
        system = f"edgeft, {o['clients']} clients for {o['seconds']:.0f} s"
        ctx.add(CASE, system, "requests", o["requests"], "requests",
                note=f"{system}: streaming chat clients retrying 0.2 s after a 429; statuses {o['statuses']}")
        for metric in ("admitted", "admitted_incomplete", "server_errors", "transport_errors", "tokens"):
            ctx.add(CASE, system, metric, o[metric], "count", higher=metric in ("admitted", "tokens"))
    if r.get("spin"):
        ctx.res.notes.append(f"{CASE}: edgeft's threads at load: " + "; ".join(f"{k}: {v}" for k, v in r["spin"].items()))
    if r.get("edgeft_metrics"):
        ctx.res.notes.append(f"{CASE}: edgeft's /metrics after the run: {'; '.join(r['edgeft_metrics'])}")
