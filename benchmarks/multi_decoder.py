"""Case ``multi_decoder``: eight SmolLM2 decoders tuned from one base, served together over one shared trunk.

    python -m benchmarks.run --cases multi_decoder                  # eight models; tuning and exports cached
    BENCH_QUICK=1 python -m benchmarks.run --cases multi_decoder    # a smoke run: three models, 16 tokens, 2 rounds
    BENCH_PREPARE_ONLY=1 python -m benchmarks.run --cases multi_decoder   # tune and export only (cached for the run)
    BENCH_MULTI_EXACT=3 python -m benchmarks.run --cases multi_decoder    # fp32 exports (the exactness check) for 3

The first run tunes 8 runs and makes 16 gated exports (on 2 cores under a load average of 5-11:
3-7 min a tune, 6-10 min an export); the measuring itself is three workers of a few minutes each.

Eight SmolLM2-135M-Instruct runs, each ``edgeft tune -n 4`` (top 4 of 30 blocks over the int8
base) on a different data set from ``../shared/data`` (``DATASETS``: the sonnets, tiny-shakespeare,
Alpaca instructions as chat rows, Alpaca answers as prose, TREC questions with their coarse and
with their fine class, SST-2 reviews with their sentiment, SST-2's unlabelled test sentences).
The tuning is short (``STEPS`` steps of 8 blocks of 64 tokens): quality is not the point, only
that each model has weights of its own above a frozen base. Each run is exported split at
``--trunk-blocks 26`` (the freeze boundary), int8 (weight-only) and fp32 (``-q none``), so the
eight int8 trunks are byte-identical, and so are the eight fp32 ones. ``BENCH_MULTI_MODELS`` sets
how many models (a quick run: 3); runs and artifacts are cached under ``benchmarks/work``.

Three worker processes, each starting ``edgeft serve`` processes on loopback (``--parallel 8
--ctx-size 4096 --speculate off``, ``--threads`` the suite's, the rest at their defaults):

- ``serve``: one server with all the int8 models (``eight``) and one with the first alone
  (``one``). Resident memory (VmRSS of the server process) after loading and after a warm-up
  (one short request per model); goal: eight <= 1.5x one. Greedy text of every model as served
  beside the others (the models' requests sent at once, prompt by prompt) against the same
  artifact opened alone in the worker (``Generator``, nothing else loaded): equal, and the gap
  between their log-probabilities. Then alternating rounds (the order flips each round, the
  1-minute load average sampled before every phase): N streaming clients each on a different
  model against N clients on the one model (N = the model count, every request 64 new tokens
  with ``ignore_eos``, each client its own prompt); aggregate tokens/s; goal: >= 0.85x.
- ``exact``: one server with all the fp32 models. The server exposes no raw logits, so the check
  is on what it does expose: each chosen token's log-probability and the top 5 alternatives'
  (``logprobs: 5``, log-softmax of the logits; the wire keys alternatives by text, so where two read
  alike the one value left is matched with the nearest of the artifact's), against the same fp32
  artifact alone; goal: within 1e-4, and greedy text equal.
- ``load``: ``POST /v1/models/load`` (``--api-key``, ``--model-dir``) of the last int8 model into
  a server that serves the others (its trunk loaded: ``add``) and into a server that serves only
  the first model's fp32 artifact (another trunk: onnxruntime started, nothing to share:
  ``alone``). The artifact's files are read once before either, so both hash from the page cache.
  Seconds of the request and the VmRSS it added, one load each; goal: ``add`` < 0.3x ``alone``.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from benchmarks import prepare
from benchmarks.multi_classifier import ADD, ALONE, load_rows  # noqa: F401 - the load rows, named and written as that case does

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "multi_decoder"
EIGHT, ONE = "models served together, a client each", "one model served alone, as many clients"
GOAL_RSS, GOAL_TPS, GOAL_EXACT = 1.5, 0.85, 1e-4
TOP, LAYERS = 4, 30
TRUNK_BLOCKS = LAYERS - TOP
STEPS, MAX_LENGTH = 8, 64
NP, SLOT = 8, 512
KEY = "multi-decoder-bench"
TOP_LOGPROBS = 5
ROWS = 2000  # rows of a table rendered as text: far more than STEPS x 8 blocks need


# ---------------------------------------------------------------- the eight data sets, as text


def render(rows: list[dict[str, str]], template: str) -> list[str]:
    """One paragraph per row (``template`` formatted with the row), blank lines and stray newlines removed."""
    out = []
    for row in rows:
        text = template.format(**{k: " ".join(str(v).split()) for k, v in row.items()})
        if text.strip():
            out.append(text.strip())
    return out


def write_paragraphs(path: Path, paragraphs: list[str]) -> Path:
    """``paragraphs`` as a .txt file edgeft reads back one text each (blank-line separated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("\n\n".join(p.replace("\n\n", "\n") for p in paragraphs) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _tsv(*parts: str, start: int = 0) -> list[dict[str, str]]:
    with open(prepare.data_file(*parts), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[start:start + ROWS]


def _alpaca(start: int) -> list[dict[str, str]]:
    return json.loads(prepare.data_file("instruct", "alpaca_small_2k.json").read_text())[start:start + 1000]


def _plays() -> list[str]:
    text = prepare.data_file("tinyshakespeare", "input.txt").read_text()[:200_000]
    return [p for p in text[:text.rfind("\n\n")].split("\n\n") if p.strip()]


def _sst2(row: dict[str, str]) -> dict[str, str]:
    return {"text": row["sentence"], "label": "positive" if row["label"] == "1" else "negative"}


# name: (what it is, its paragraphs or rows: a list of dicts is written as JSON chat rows; None: the suite's
# sonnets tuning file, ``cases.sonnet_files``)
DATASETS: dict[str, tuple[str, Callable[[], list] | None]] = {
    "sonnets": ("Shakespeare's sonnets (the suite's 90% tuning split)", None),
    "plays": ("tiny-shakespeare, its first 200 kB", _plays),
    "alpaca": ("Alpaca instructions as chat rows (loss on the answer)", lambda: _alpaca(0)),
    "alpaca-answers": ("Alpaca answers as prose", lambda: render(_alpaca(1000), "{output}")),
    "trec": ("TREC questions and their coarse class",
             lambda: render(_tsv("trec", "train.tsv"), "Question: {text}\nAnswer type: {coarse_label}")),
    "trec-fine": ("TREC questions and their fine class",
                  lambda: render(_tsv("trec", "train.tsv", start=ROWS), "Question: {text}\nFine type: {fine_label}")),
    "sst2": ("SST-2 reviews and their sentiment",
             lambda: render([_sst2(r) for r in _tsv("sst2", "train.tsv")], "Review: {text}\nSentiment: {label}")),
    "sst2-test": ("SST-2's unlabelled test sentences", lambda: render(_tsv("sst2", "test_unlabeled_glue.tsv"),
                                                                       "{sentence}")),
}


def data_file(name: str) -> Path:
    """The tuning file of data set ``name``, written once under work/data."""
    from benchmarks.cases import sonnet_files

    make = DATASETS[name][1]
    if make is None:
        return sonnet_files()[0]
    made = [p for p in (prepare.WORK / "data" / f"multi-decoder-{name}{ext}" for ext in (".json", ".txt"))
            if p.is_file()]
    if made:
        return made[0]
    items = make()
    if items and isinstance(items[0], dict):
        path = prepare.WORK / "data" / f"multi-decoder-{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
        return path
    return write_paragraphs(prepare.WORK / "data" / f"multi-decoder-{name}.txt", items)


def model_count(ctx: Context) -> int:
    return max(2, min(len(DATASETS), int(os.environ.get("BENCH_MULTI_MODELS") or (3 if ctx.quick else 8))))


def model_artifacts(ctx: Context, i: int, fp32: bool = True) -> dict[str, Path]:
    """Data set ``i``'s run, exported split int8 and (``fp32``) fp32: {"int8": folder, "fp32": folder} (cached)."""
    name = list(DATASETS)[i]
    tag = f"smollm2-{name}-top{TOP}-{STEPS}"
    run = prepare.ensure_tuned(tag, [
        "--model", prepare.LM, "--task", "causal-lm", "--data", str(data_file(name)),
        "--trainable-layers", str(TOP), "--max-length", str(MAX_LENGTH), "--batch-size", "8", "--lr", "5e-4",
        "--max-steps", str(STEPS), "--max-eval-examples", "16", "--eval-batch-size", "8",
        "--threads", str(ctx.threads), "--no-progress", "--seed", str(i)])
    return {q: prepare.ensure_exported(f"{tag}-split{TRUNK_BLOCKS}-{q}", run, q, [
        "--trunk-blocks", str(TRUNK_BLOCKS), "--gate-texts", "8", "--threads", str(ctx.threads), "--no-progress"])
        for q in ("int8", "fp32") if q == "int8" or fp32}


def artifacts(ctx: Context, n: int) -> dict[str, list[Path]]:
    """The first ``n`` data sets' artifacts: {"int8": [...], "fp32": [...]} (cached); fp32 for the first
    ``BENCH_MULTI_EXACT`` of them only (default all: the exactness check serves those together)."""
    prepare.ensure_model(prepare.LM)
    exact = max(2, int(os.environ.get("BENCH_MULTI_EXACT") or n))
    made = [model_artifacts(ctx, i, fp32=i < exact) for i in range(n)]
    return {q: [m[q] for m in made if q in m] for q in ("int8", "fp32")}


# ---------------------------------------------------------------- servers and clients


def names(n: int) -> list[str]:
    return list(DATASETS)[:n]


def rss_mib(pid: int) -> float:
    """VmRSS of the process ``pid`` and its children, in MiB."""
    import psutil

    p = psutil.Process(pid)
    return sum(x.memory_info().rss for x in (p, *p.children(recursive=True))) / 2**20


def server(tag: str, models: list[tuple[str, Path]], threads: int, model_dir: Path | None = None):
    """``edgeft serve`` of ``models`` (name, artifact) on a free loopback port (benchmarks.serving.Server)."""
    from benchmarks.serving import Server, _free_port

    port = _free_port()
    cmd = [*prepare.edgeft_cmd(), "serve", *[str(p) for _, p in models], *[a for n, _ in models for a in ("--name", n)],
           "--port", str(port), "--threads", str(threads), "--parallel", str(NP), "--ctx-size", str(NP * SLOT),
           "--speculate", "off", "--api-key", KEY, "--log-level", "info"]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    return Server(f"{CASE}-{tag}", cmd, port)


def spin_choices(log: Path) -> list[str]:
    """What each loaded model's threads do, as the server logged it ("sleep (reason)" / "spin (reason)")."""
    try:
        text = log.read_text()
    except OSError:
        return []
    return re.findall(r"; threads ((?:spin|sleep) \([^)]*\))", text)


def _body(model: str, prompt: str, new_tokens: int, stream: bool, logprobs: int | None = None) -> dict:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


async def phase(url: str, clients: list[str], per_client: int, new_tokens: int, texts: list[str]) -> dict:
    """One streaming client per entry of ``clients`` (the model it asks), ``per_client`` requests each back
    to back, every client its own prompt: aggregate tokens/s over the phase's wall time."""
    import httpx

    from benchmarks.serving import one_request

    limits = httpx.Limits(max_connections=len(clients) + 4, max_keepalive_connections=len(clients) + 4)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits, headers=headers) as c:
        async def client(i: int, model: str) -> list[dict]:
            return [await one_request(c, "/v1/completions",
                                      _body(model, texts[(i + k * len(clients)) % len(texts)], new_tokens, True))
                    for k in range(per_client)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(i, m) for i, m in enumerate(clients)]) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and r.get("done")]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": len(clients), "requests": len(results), "ok": len(ok), "tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall, "load_1m": load}


async def completions_at_once(url: str, asks: list[tuple[str, str]], new_tokens: int,
                              logprobs: int | None) -> list[dict]:
    """Every (model, prompt) of ``asks`` sent at once, not streamed: each choice (text, logprobs)."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=900, headers=headers) as c:
        async def one(model: str, prompt: str) -> dict:
            r = await c.post("/v1/completions", json=_body(model, prompt, new_tokens, False, logprobs))
            r.raise_for_status()
            return r.json()["choices"][0]
        return list(await asyncio.gather(*[one(m, p) for m, p in asks]))


# ---------------------------------------------------------------- exactness


def alone_outputs(path: Path, prompts: list[str], new_tokens: int, threads: int) -> list[dict]:
    """Greedy text and log-probabilities of ``path`` opened alone in this process (no other trunk held)."""
    from edgeft.runtime import Generator, SamplingParams, trunks
    from edgeft.runtime.params import Speculation

    gc.collect()
    if trunks.loaded():
        raise RuntimeError(f"a trunk is still loaded in this process: {list(trunks.loaded())}")
    gen = Generator.open(path, threads=threads)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS,
                            speculate=Speculation.off)
    out = []
    for p in prompts:
        c = gen.generate(p, params)
        out.append({"text": c.text, "token_logprobs": [lp.logprob for lp in c.logprobs],
                    "top": [[v for _, v in lp.top] for lp in c.logprobs]})
    del gen
    gc.collect()
    return out


def served_logprobs(choice: dict) -> dict:
    """A /v1/completions choice's text, chosen-token log-probabilities and top values (best first)."""
    lp = choice.get("logprobs") or {}
    return {"text": choice["text"], "token_logprobs": list(lp.get("token_logprobs") or []),
            "top": [sorted(d.values(), reverse=True) for d in lp.get("top_logprobs") or []]}


def logprob_gap(served: dict, alone: dict) -> float:
    """The largest absolute difference between two outputs' log-probabilities: the chosen tokens', and each
    top alternative served against the nearest of the artifact's (the served top is keyed by text, so two
    tokens that read alike keep one value); infinite where they do not line up (other lengths: other tokens)."""
    if len(served["token_logprobs"]) != len(alone["token_logprobs"]) or len(served["top"]) != len(alone["top"]):
        return float("inf")
    gaps = [abs(a - b) for a, b in zip(served["token_logprobs"], alone["token_logprobs"])]
    for s, a in zip(served["top"], alone["top"]):
        if len(s) == len(a):
            gaps += [abs(x - y) for x, y in zip(s, a)]
        elif a:
            gaps += [min(abs(x - y) for y in a) for x in s]
    return max(gaps, default=0.0)


def exactness(url: str, arts: list[tuple[str, Path]], prompts: list[str], new_tokens: int, threads: int) -> dict:
    """Every model as served (its requests sent at once with the others', prompt by prompt) against its
    artifact alone: texts equal, and the largest log-probability gap."""
    served: dict[str, list[dict]] = {n: [] for n, _ in arts}
    for p in prompts:
        choices = asyncio.run(completions_at_once(url, [(n, p) for n, _ in arts], new_tokens, TOP_LOGPROBS))
        for (n, _), ch in zip(arts, choices):
            served[n].append(served_logprobs(ch))
    per_model = {}
    for n, path in arts:
        alone = alone_outputs(path, prompts, new_tokens, threads)
        per_model[n] = {"texts_equal": [s["text"] == a["text"] for s, a in zip(served[n], alone)],
                        "max_logprob_gap": max(logprob_gap(s, a) for s, a in zip(served[n], alone))}
    return {"prompts": len(prompts), "new_tokens": new_tokens, "models": per_model,
            "all_equal": all(all(m["texts_equal"]) for m in per_model.values()),
            "max_logprob_gap": max(m["max_logprob_gap"] for m in per_model.values())}


# ---------------------------------------------------------------- the worker's three sides


def _warm_up(url: str, models: list[str]) -> None:
    asyncio.run(completions_at_once(url, [(m, "Hello") for m in models], 4, None))


def measure_serve(spec: dict) -> dict:
    """Memory of N models served together against one alone, exactness (int8), and the alternating rounds."""
    from benchmarks.serving import prompts

    arts = list(zip(spec["names"], map(Path, spec["int8"])))
    servers = {EIGHT: server("eight", arts, spec["threads"]), ONE: server("one", arts[:1], spec["threads"])}
    clients = {EIGHT: [n for n, _ in arts], ONE: [arts[0][0]] * len(arts)}
    out: dict[str, Any] = {"rss": {}, "spin": {}, "rounds": {EIGHT: [], ONE: []}}
    try:
        for system, s in servers.items():
            s.wait()
            out["rss"][system] = {"loaded_mib": rss_mib(s.proc.pid)}
            _warm_up(s.url, sorted(set(clients[system])))
            out["rss"][system]["warm_mib"] = rss_mib(s.proc.pid)
            out["spin"][system] = spin_choices(s.log)
        texts = prompts(len(arts) * spec["per_client"])
        out["exact"] = exactness(servers[EIGHT].url, arts, texts[:spec["prompts"]], spec["check_tokens"],
                                 spec["threads"])
        for r in range(spec["rounds"]):  # alternating: the order flips every round
            for system in (EIGHT, ONE) if r % 2 == 0 else (ONE, EIGHT):
                out["rounds"][system].append(asyncio.run(phase(servers[system].url, clients[system],
                                                               spec["per_client"], spec["new_tokens"], texts)))
        for system, s in servers.items():
            out["rss"][system]["after_rounds_mib"] = rss_mib(s.proc.pid)
    finally:
        for s in servers.values():
            s.stop()
    return out


def measure_exact(spec: dict) -> dict:
    """The fp32 models served together against each alone: log-probabilities within ``GOAL_EXACT``."""
    from benchmarks.serving import prompts

    arts = list(zip(spec["names"], map(Path, spec["fp32"])))
    s = server("fp32", arts, spec["threads"])
    try:
        s.wait()
        out = exactness(s.url, arts, prompts(spec["prompts"]), spec["check_tokens"], spec["threads"])
        out["rss_mib"] = rss_mib(s.proc.pid)
    finally:
        s.stop()
    return out


def _read_files(folder: Path) -> None:
    """Every byte of an artifact read once, so the loads that follow hash it from the page cache alike."""
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _load_into(tag: str, served: list[tuple[str, Path]], name: str, path: Path, threads: int) -> dict:
    """Seconds of ``POST /v1/models/load`` of ``path`` into a server of ``served``, and the VmRSS it added."""
    import httpx

    s = server(tag, served, threads, model_dir=path.parent)
    try:
        s.wait()
        _warm_up(s.url, [n for n, _ in served])
        before = rss_mib(s.proc.pid)
        t0 = time.perf_counter()
        r = httpx.post(s.url + "/v1/models/load", json={"model": name, "path": str(path)},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=900)
        seconds = time.perf_counter() - t0
        r.raise_for_status()
        added = rss_mib(s.proc.pid) - before
        shared = (r.json().get("trunk") or {}).get("shared_with", [])
    finally:
        s.stop()
    return {"seconds": seconds, "rss_added_mib": added, "rss_before_mib": before, "shared_with": shared,
            "served": len(served)}


def measure_load(spec: dict) -> dict:
    """The last int8 model loaded while the others are served (``add``) and beside another trunk (``alone``)."""
    arts = list(zip(spec["names"], map(Path, spec["int8"])))
    name, path = arts[-1]
    _read_files(path)
    alone = _load_into("load-alone", [(f"{arts[0][0]}-fp32", Path(spec["fp32"][0]))], name, path, spec["threads"])
    add = _load_into("load-add", arts[:-1], name, path, spec["threads"])
    return {"add": add, "alone": alone}


def measure(spec: dict) -> dict:
    """One side (``spec["side"]``: serve, exact or load) in this worker process; its servers stop with it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return {"serve": measure_serve, "exact": measure_exact, "load": measure_load}[spec["side"]](spec)


# ---------------------------------------------------------------- the case


def _digests(arts: list[Path]) -> set[str]:
    return {json.loads((a / "manifest.json").read_text()).get("trunk", {}).get("sha256", "none") for a in arts}


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, record_gate

    n = model_count(ctx)
    arts = artifacts(ctx, n)
    for folders in arts.values():
        for a in folders:
            record_gate(ctx, CASE, a.name, a)
    if os.environ.get("BENCH_PREPARE_ONLY"):  # tune and export now (a loaded machine is fine), measure later
        return
    spec = {"names": names(n), "int8": [str(a) for a in arts["int8"]], "fp32": [str(a) for a in arts["fp32"]],
            "per_client": 1 if ctx.quick else 2, "new_tokens": 16 if ctx.quick else 64,
            "rounds": 2 if ctx.quick else max(ctx.repeats, 3), "prompts": 2 if ctx.quick else 4,
            "check_tokens": 8 if ctx.quick else 16}
    try:
        serve = ctx.measure(CASE, side="serve", timeout=5400, **spec)
        exact = ctx.measure(CASE, side="exact", timeout=3600, **spec)
        load = ctx.measure(CASE, side="load", timeout=1800, **spec)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    note = (f"{CASE}: {n} SmolLM2-135M-Instruct runs tuned top-{TOP} for {STEPS} steps (short: quality is not the "
            f"point) on {'; '.join(f'{k}: {DATASETS[k][0]}' for k in names(n))}; exported split at --trunk-blocks {TRUNK_BLOCKS}: "
            f"{len(_digests(arts['int8']))} distinct int8 trunk(s), {len(_digests(arts['fp32']))} fp32; "
            f"edgeft serve --parallel {NP} --ctx-size {NP * SLOT} --speculate off --threads {ctx.threads}; "
            f"threads as the servers chose: {serve['spin']}")
    _memory_rows(ctx, serve, n, note)
    _exact_rows(ctx, serve["exact"], exact)
    _speed_rows(ctx, serve["rounds"], n, spec)
    _load_rows(ctx, load)


def _memory_rows(ctx: Context, serve: dict, n: int, note: str) -> None:
    for key, when in (("loaded_mib", "after loading"), ("warm_mib", "after a warm-up request per model"),
                      ("after_rounds_mib", "after the speed rounds")):
        for system in (EIGHT, ONE):
            ctx.add(CASE, system, f"rss_{key}", serve["rss"][system][key], "MiB", higher=False, models=n,
                    note=note if key == "loaded_mib" and system == EIGHT else "")
        ratio = serve["rss"][EIGHT][key] / serve["rss"][ONE][key]
        ctx.add(CASE, EIGHT, f"rss_vs_one_{key.removesuffix('_mib')}", ratio, "x", higher=False, models=n,
                note=f"VmRSS of the server process {when}, {n} models against one (goal <= {GOAL_RSS}x)")


def _exact_rows(ctx: Context, int8: dict, fp32: dict) -> None:
    for q, r in (("int8", int8), ("fp32", fp32)):
        system = f"{q}, served together against each alone"
        how = (f"{r['prompts']} prompts x {r['new_tokens']} greedy tokens per model, the models' requests sent at "
               "once; alone: Generator.open of the same artifact in the worker, nothing else loaded")
        ctx.add(CASE, system, "greedy_text_equal", 1.0 if r["all_equal"] else 0.0, "share",
                note=f"{system}: {how}; per model: " + "; ".join(
                    f"{m} {sum(v['texts_equal'])}/{len(v['texts_equal'])} equal, gap {v['max_logprob_gap']:.2e}"
                    for m, v in r["models"].items()))
        ctx.add(CASE, system, "max_logprob_gap", r["max_logprob_gap"], "nats", higher=False,
                note=(f"the server exposes no raw logits: the largest gap of the chosen tokens' and the top "
                      f"{TOP_LOGPROBS} alternatives' log-probabilities (log-softmax of the logits) is compared"
                      + (f" (goal: within {GOAL_EXACT:g})" if q == "fp32" else " (int8: reported, not a goal)")))


def _speed_rows(ctx: Context, rounds: dict, n: int, spec: dict) -> None:
    from edgeft.bench import summarize

    tps = {s: [r["aggregate_tok_s"] for r in rounds[s]] for s in (EIGHT, ONE)}
    loads = [r["load_1m"] for s in (EIGHT, ONE) for r in rounds[s]]
    per_round = [a / b for a, b in zip(tps[EIGHT], tps[ONE])]
    incomplete = sum(r["requests"] - r["ok"] for s in (EIGHT, ONE) for r in rounds[s])
    for system in (EIGHT, ONE):
        ctx.add(CASE, system, "aggregate_tps", summarize(tps[system]), "tok/s", clients=n,
                note=(f"{system}: {n} streaming clients x {spec['per_client']} requests of {spec['new_tokens']} "
                      f"tokens (ignore_eos), {len(tps[system])} alternating rounds; 1-minute load average before "
                      f"the phases {min(loads):.2f}-{max(loads):.2f}; requests not completed: {incomplete}")
                if system == EIGHT else "")
    ctx.add(CASE, EIGHT, "tps_vs_one", statistics.median(tps[EIGHT]) / statistics.median(tps[ONE]), "x", clients=n,
            note=f"median over rounds, {n} models against one (goal >= {GOAL_TPS}x); round by round: "
                 + ", ".join(f"{x:.2f}" for x in per_round))


def _load_rows(ctx: Context, load: dict) -> None:
    add, alone = load["add"], load["alone"]
    note = (f"POST /v1/models/load, one load each: into a server of {add['served']} int8 models (trunk shared "
            f"with {len(add['shared_with'])} of them) and into a server of one fp32 model (another trunk, shared "
            f"with {len(alone['shared_with'])}); every byte hashed both times, from the page cache")
    load_rows(ctx, CASE, add, alone, note)


