"""Memory only, of ``multi_decoder``'s servers: N int8 models over one trunk against one alone, and one more loaded.

    python -m benchmarks.trunk_memory                 # 8 models (their artifacts cached by multi_decoder)
    python -m benchmarks.trunk_memory --models 4 --no-load

The case's own servers (``--parallel 8 --ctx-size 4096 --speculate off``), none of its speed rounds.
VmRSS of each server after loading, after a warm-up (one short request per model, as the case) and
after a burst (``--burst`` x N requests at once, 32 new tokens each, spread over the server's models: the
same requests to one model alone as to N);
then ``POST /v1/models/load`` of the last model into a server of the others, warm (``add``), and into
a server of the first model's fp32 artifact (another trunk, ``alone``), as the case's ``load`` side.
Artifacts must already be exported (``BENCH_PREPARE_ONLY=1 python -m benchmarks.run --cases
multi_decoder``): this script makes none. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from benchmarks import multi_decoder as md
from benchmarks import prepare


def _arts(n: int, q: str) -> list[tuple[str, Path]]:
    out = []
    for name in md.names(n):
        folder = prepare.WORK / "artifacts" / f"smollm2-{name}-top{md.TOP}-{md.STEPS}-split{md.TRUNK_BLOCKS}-{q}"
        if not (folder / "manifest.json").is_file():
            raise SystemExit(f"{folder} is not exported: run multi_decoder with BENCH_PREPARE_ONLY=1 first")
        out.append((name, folder))
    return out


def _burst(url: str, models: list[str], total: int) -> None:
    """``total`` requests at once (32 new tokens each), spread over ``models`` in turn."""
    from benchmarks.serving import prompts

    texts = prompts(total)
    asyncio.run(md.completions_at_once(url, [(models[i % len(models)], t) for i, t in enumerate(texts)], 32, None))


def serve_rss(tag: str, arts: list[tuple[str, Path]], threads: int, burst: int) -> dict:
    """VmRSS of a server of ``arts`` after loading, after the warm-up and after a burst of ``burst`` requests."""
    s = md.server(tag, arts, threads)
    try:
        s.wait()
        out = {"loaded_mib": md.rss_mib(s.proc.pid)}
        md._warm_up(s.url, [n for n, _ in arts])
        out["warm_mib"] = md.rss_mib(s.proc.pid)
        if burst:
            _burst(s.url, [n for n, _ in arts], burst)
            out["burst_mib"] = md.rss_mib(s.proc.pid)
    finally:
        s.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--burst", type=int, default=8, help="concurrent requests per model after the warm-up (0: none)")
    p.add_argument("--no-load", action="store_true", help="skip the load-one-more measurement")
    p.add_argument("--only", choices=["one", "many", "load"], help="measure that server (or the loads) only")
    a = p.parse_args()
    arts = _arts(a.models, "int8")
    out: dict = {"models": a.models, "threads": a.threads, "burst": a.burst}
    if a.only in (None, "one"):
        out["one"] = serve_rss("mem-one", arts[:1], a.threads, a.burst * a.models)
    if a.only in (None, "many"):
        out["many"] = serve_rss("mem-many", arts, a.threads, a.burst * a.models)
    if "one" in out and "many" in out:
        out["ratio"] = {k: out["many"][k] / out["one"][k] for k in out["one"]}
    if not a.no_load and a.only in (None, "load"):
        name, path = arts[-1]
        md._read_files(path)
        fp32 = _arts(1, "fp32")
        out["load_alone"] = md._load_into("mem-load-alone", [(f"{fp32[0][0]}-fp32", fp32[0][1])], name, path,
                                          a.threads)
        out["load_add"] = md._load_into("mem-load-add", arts[:-1], name, path, a.threads)
        out["load_ratio"] = out["load_add"]["rss_added_mib"] / out["load_alone"]["rss_added_mib"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
