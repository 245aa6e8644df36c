"""Serving many users at once: edgeft serve against llama.cpp's llama-server, same slots, same weights.

    .venv/bin/python -m benchmarks.serving --llama-bin DIR [--clients 1,4,8,16] [--np 8] [--quick]

Starts every server once, side by side on loopback (idle ones sleep), then for each client
count takes turns system by system: N streaming clients each send requests back to back
(``/v1/completions``, greedy, ``max_tokens`` new tokens with ``ignore_eos`` so every request
costs the same; each client its own prompt, so no prefix is shared). Per system and client
count: aggregate tokens/s (every completion token / the phase's wall time) and time to first
token p50/p95. Then edgeft alone under overload: 64 streaming chat clients for 45 s, each
retrying 0.2 s after a 429; every status code is counted, and an admitted request that does
not end with ``[DONE]`` and all its tokens is a failure.

edgeft runs its defaults with ``--parallel NP`` (threads: all cores); llama-server runs
``-np NP -c NP*SLOT`` and its own default thread count, as its users do (idle threads
sleep: ``--poll 0``, ``OMP_WAIT_POLICY=PASSIVE``, as for every system in benchmarks/), on the Q8_0
re-encoding of the shipped Q4_1 GGUF (``llama-quantize``) and on the Q4_1 itself. Writes
``benchmarks/results/serving-DATE.json`` and ``.md`` with the CPU's flags and the load
average around every phase (the machine may be shared: the file says so).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks import prepare

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SLOT = 512  # tokens per slot: prompt (~40) + new tokens, with room


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_flags() -> list[str]:
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in wanted if f in have]


def cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def prompts(n: int) -> list[str]:
    """``n`` different prompts cut from the sonnets (about 40 tokens each), none a prefix of another."""
    lines = [ln.strip() for ln in prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text().splitlines()
             if len(ln.strip()) > 20]
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
                raise SystemExit(f"{self.name} exited {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} not healthy after {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def edgeft_server(artifact: Path, np_: int) -> Server:
    port = _free_port()
    exe = Path(sys.executable).with_name("edgeft")
    cmd = [str(exe), "serve", str(artifact), "--name", "bench", "--port", str(port), "--parallel", str(np_),
           "--ctx-size", str(np_ * SLOT), "--log-level", "warning"]
    return Server("edgeft", cmd, port)


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


# ---------------------------------------------------------------- the run


def goals(rows: dict[str, dict[int, dict]], np_: int) -> list[dict]:
    ed = rows["edgeft"]
    out = []
    if 1 in ed and np_ in ed:
        r = ed[np_]["aggregate_tok_s"] / ed[1]["aggregate_tok_s"]
        out.append({"goal": f"edgeft at {np_} clients >= 3x its own single client", "value": r, "target": 3.0,
                    "met": r >= 3.0})
    for name, tab in rows.items():
        if name == "edgeft" or np_ not in tab or np_ not in ed:
            continue
        r = ed[np_]["aggregate_tok_s"] / tab[np_]["aggregate_tok_s"]
        out.append({"goal": f"edgeft at {np_} clients >= 1.3x {name} -np {np_}", "value": r, "target": 1.3,
                    "met": r >= 1.3})
        a, b = ed[np_]["ttft_p50_s"], tab[np_]["ttft_p50_s"]
        if a is not None and b is not None:
            out.append({"goal": f"TTFT p50 at {np_} clients <= {name}'s", "value": a / b, "target": 1.0,
                        "met": a <= b, "edgeft_s": a, "peer_s": b})
    return out


def write_md(res: dict, path: Path) -> None:
    lines = [f"# Serving: edgeft serve vs llama-server ({res['date']})", "",
             f"Made by `{res['command']}`.", "",
             f"Machine: {res['cpu']} ({os.cpu_count()} logical CPUs; flags: {', '.join(res['cpu_flags'])}). "
             "**Shared machine**: other jobs ran at the same time (load average per phase below), so the "
             "absolute figures are lower and noisier than on an idle machine; the systems took turns at each "
             "client count so drift hits all alike.", "",
             f"Model: SmolLM2-135M-Instruct. edgeft: `{res['artifact']}` (int8), `--parallel {res['np']}`, "
             f"threads = all cores. llama-server: `-np {res['np']} -c {res['np'] * SLOT} --poll 0`, default threads, "
             "Q8_0 (re-encoded from the shipped Q4_1 by llama-quantize) and the shipped Q4_1.", "",
             f"Each client streams `/v1/completions` requests back to back ({res['per_client']} each, "
             f"{res['new_tokens']} new tokens, greedy, ignore_eos). Aggregate tok/s = completion tokens of "
             "all requests / the phase's wall time (prefill included).", "",
             "| system | clients | aggregate tok/s | TTFT p50 s | TTFT p95 s | requests ok | load avg (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for name, tab in res["rows"].items():
        for c, r in sorted(tab.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {name} | {c} | {r['aggregate_tok_s']:.1f} | {_f(r['ttft_p50_s'])} | "
                         f"{_f(r['ttft_p95_s'])} | {r['ok']}/{r['requests']} | {r['load_avg_before'][0]:.1f} |")
    lines += ["", "## Goals (from issue #12; computed, never rounded)", ""]
    for g in res["goals"]:
        lines.append(f"- {'met' if g['met'] else 'MISSED'}: {g['goal']}: {g['value']:.2f} (target {g['target']})")
    o = res.get("overload")
    if o:
        lines += ["", f"## Overload: {o['clients']} streaming chat clients for {o['seconds']:.0f} s (edgeft)", "",
                  f"Statuses: {o['statuses']}; admitted {o['admitted']}, of which incomplete "
                  f"{o['admitted_incomplete']}; 5xx: {o['server_errors']}; transport errors: "
                  f"{o['transport_errors']}; tokens streamed: {o['tokens']}; load avg "
                  f"{o['load_avg_before'][0]:.1f} -> {o['load_avg_after'][0]:.1f}."]
    path.write_text("\n".join(lines) + "\n")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, default=None, help="Folder with llama-server and llama-quantize.")
    ap.add_argument("--artifact", type=Path, default=None, help="edgeft int8 artifact [default: export SmolLM2].")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--np", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--overload-clients", type=int, default=64)
    ap.add_argument("--overload-seconds", type=float, default=45.0)
    ap.add_argument("--quick", action="store_true", help="1 request per client, a 15 s overload.")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if a.quick:
        a.per_client, a.overload_seconds = 1, 15.0
    levels = [int(x) for x in a.clients.split(",")]
    artifact = a.artifact or prepare.ensure_exported(
        "smollm2-base-int8", prepare.LM, "int8",
        ["--task", "causal-lm", "--eval-data", str(prepare.data_file("instruct", "alpaca_small_2k.json"))])
    servers = [edgeft_server(artifact, a.np)]
    if a.llama_bin is not None:
        q41 = prepare.shipped_gguf()
        q80 = q41.with_name("SmolLM2-135M-Instruct.Q8_0.gguf")
        if not q80.is_file():
            subprocess.run([str(a.llama_bin / "llama-quantize"), "--allow-requantize", str(q41), str(q80), "Q8_0"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers += [llama_server(a.llama_bin, q80, a.np, "Q8_0"), llama_server(a.llama_bin, q41, a.np, "Q4_1")]
    texts = prompts(max(levels) * a.per_client)
    rows: dict[str, dict[int, dict]] = {s.name: {} for s in servers}
    result: dict = {}
    try:
        for s in servers:
            s.wait()
            asyncio.run(phase(s.url, 1, 1, 8, texts))  # warm-up
        for c in levels:
            for s in servers:
                r = asyncio.run(phase(s.url, c, a.per_client, a.new_tokens, texts))
                rows[s.name][c] = r
                print(f"{s.name:<22} clients {c:>3}: {r['aggregate_tok_s']:7.1f} tok/s, TTFT p50 "
                      f"{_f(r['ttft_p50_s'])} s, p95 {_f(r['ttft_p95_s'])} s, ok {r['ok']}/{r['requests']}, "
                      f"load {r['load_avg_before'][0]:.1f}", flush=True)
        for s in servers[1:]:
            s.stop()
        if a.overload_seconds > 0:
            result["overload"] = asyncio.run(overload(servers[0].url, a.overload_clients, a.overload_seconds,
                                                      a.new_tokens))
            print("overload:", json.dumps(result["overload"]), flush=True)
        metrics = httpx.get(servers[0].url + "/metrics", timeout=10).text
        result["edgeft_metrics"] = [ln for ln in metrics.splitlines()
                                    if ln.startswith(("edgeft_decode_batch_size_sum", "edgeft_decode_batch_size_count",
                                                      "edgeft_queue_wait_seconds_sum", "edgeft_rejected_total",
                                                      "edgeft_queue_wait_seconds_count"))]
    finally:
        for s in servers:
            s.stop()
    date = datetime.date.today().isoformat()
    result.update({"date": date, "command": "python -m benchmarks.serving " + " ".join(sys.argv[1:]),
                   "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
                   "shared_machine": True, "artifact": str(artifact), "np": a.np, "per_client": a.per_client,
                   "new_tokens": a.new_tokens, "servers": {s.name: s.cmd for s in servers},
                   "rows": rows, "goals": goals(rows, a.np)})
    out = a.out or RESULTS / f"serving-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_md(result, out.with_suffix(".md"))
    for g in result["goals"]:
        print(f"{'met' if g['met'] else 'MISSED'}: {g['goal']}: {g['value']:.2f} (target {g['target']})")
    print(f"written {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
