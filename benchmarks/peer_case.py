"""The ``peers`` case: edgeft against native peers, alternating rounds, quality on the same ids.

Generation (SmolLM2-135M): edgeft int8 (weight-only and dynamic)/int4/mixed/searched (and levers: spinning threads, another
MatMulNBits accuracy level, another block size) against llama.cpp built natively (``llama-bench`` at its own
default threads), OpenVINO GenAI int8/int4 and CTranslate2 int8. The systems run one after
another, the order rotated every round; a system's figure is the range of its per-round
medians, so a burst of load from other work on a shared machine shows up as a spread
rather than as a bias against whichever system ran during it. The load average is
sampled before every worker.

Quality: perplexity over the same held-out token ids for every system, counted the way
``llama-perplexity`` counts (``benchmarks.peer_workers.chunk_nll``), against edgeft's fp32
artifact (the de-quantized weights of the shipped Q4_1 GGUF, so llama.cpp Q4_1 is lossless
against it); a configuration qualifies when it is within the export gate's budget.

Classification (MiniLM-L6 tuned on SST-2): edgeft int8 against OpenVINO int8, CTranslate2 int8
(its encoder's pooled output through the tuned head) and PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import llamacpp, peers, prepare
from benchmarks.cases import CLS_MAX_LENGTH, Context, WorkerFailed, _lm_prompts, lm_artifact, sonnet_files, sst2_run
from benchmarks.prepare import WORK, Unavailable
from edgeft.bench import Stat, summarize

CASE = "peers"
PPL_BUDGET = 5.0  # percent: the export gate's default max_perplexity_increase
N_CTX = 256
CHUNKS = 10  # chunks of N_CTX scored (the held-out sonnets hold about 10)
ROUNDS = 3


def _spawn(ctx: Context, worker: str, python: Path | None = None, module: str = "benchmarks.peer_workers",
           env: dict[str, str] | None = None, timeout: float = 1800, **spec) -> dict:
    """Like ``Context.spawn`` but any interpreter and module, and the system's own thread defaults
    (no OMP_WAIT_POLICY / OMP_NUM_THREADS forced on it)."""
    import time

    spec = {"worker": worker, "threads": ctx.threads, **spec}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "EDGEFT_SPIN")}
    full_env = {**base, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(prepare.REPO), **(env or {})}
    log = WORK / "logs" / f"peer-{worker}-{int(time.time() * 1000)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ctx.cache.setdefault("loadavg", []).append(os.getloadavg()[0])
    with open(log, "w") as fh:
        res = subprocess.run([str(python or sys.executable), "-m", module, json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=fh, text=True, cwd=prepare.REPO, env=full_env, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
        raise WorkerFailed(f"{worker} exited {res.returncode}: {tail[:300]} (log: {log})")
    log.unlink(missing_ok=True)
    return json.loads(lines[-1][len("RESULT "):])


def with_accuracy_level(artifact: Path, level: int) -> Path:
    """A copy of an artifact whose MatMulNBits nodes compute at ``level`` (weights linked, not copied)."""
    import onnx

    out = WORK / "artifacts" / f"{artifact.name}-acc{level}"
    manifest = json.loads((artifact / "manifest.json").read_text())
    graph = manifest["graph"]["file"]
    if (out / graph).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in artifact.iterdir():
        if p.name not in (graph, "manifest.json") and p.is_file():
            os.link(p, tmp / p.name) if p.stat().st_dev == tmp.stat().st_dev else shutil.copy2(p, tmp / p.name)
    model = onnx.load(str(artifact / graph), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    onnx.save(model, str(tmp / graph))
    from edgeft.artifact import file_hashes, sealed

    # the manifest's file hashes and digest must describe the new graph (checked at every load)
    manifest["files"] = file_hashes(tmp)
    (tmp / "manifest.json").write_text(json.dumps(sealed(manifest), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def block_size_variant(quant: str, block_size: int) -> Path:
    """The base model exported at another MatMulNBits block size, gated like ``lm_artifact``'s."""
    extra = ["--task", "causal-lm", "--eval-data", str(prepare.data_file("instruct", "alpaca_small_2k.json")),
             "--block-size", str(block_size)]
    return prepare.ensure_exported(f"smollm2-base-{quant}-b{block_size}", prepare.LM, quant, extra)


def _held_ids() -> Path:
    from tokenizers import Tokenizer

    path = WORK / "data" / "sonnets-heldout.ids.json"
    if not path.is_file():
        _, held = sonnet_files()
        tok = Tokenizer.from_file(str(prepare.ensure_model(prepare.LM) / "tokenizer.json"))
        path.write_text(json.dumps(tok.encode(held.read_text(), add_special_tokens=False).ids))
    return path


def generation_systems(ctx: Context) -> list[dict]:
    """Every generation system of the case that can be had here (the rest recorded as skipped)."""
    out: list[dict] = []

    def add(name: str, make, **kw) -> None:
        try:
            out.append({"system": name, **make(), **kw})
        except (Unavailable, OSError, ImportError) as exc:
            ctx.res.skip(CASE, name, str(exc))

    # the quality reference; its artifact is looked up only when its perplexity is measured
    out.append({"system": "edgeft fp32", "worker": "gen-edgeft", "module": "benchmarks.workers", "path": None,
                "make_path": lambda: lm_artifact(ctx, "fp32"), "ppl": "ppl-edgeft-chunks", "quant": "fp32",
                "speed": False})
    def lazy(name: str, make, **kw) -> None:  # an artifact looked up when first measured (it may be in the making)
        out.append({"system": name, "worker": "gen-edgeft", "module": "benchmarks.workers", "path": None,
                    "make_path": make, **kw})

    for q in ("int8", "int8-dynamic", "int4", "int4-offset", "mixed", "mixed-offset", "searched"):
        lazy(f"edgeft {q}", lambda q=q: lm_artifact(ctx, q), ppl="ppl-edgeft-chunks", quant=q)
    lazy("edgeft searched, EDGEFT_SPIN=1", lambda: lm_artifact(ctx, "searched"), env={"EDGEFT_SPIN": "1"},
         quant="searched", lever="spinning threads")
    for b in (64, 128):  # the export's MatMulNBits block size (default 32): fewer scales to read, coarser blocks
        lazy(f"edgeft int4, block size {b}", lambda b=b: block_size_variant("int4", b), ppl="ppl-edgeft-chunks",
             quant="int4", lever=f"--block-size {b} instead of 32")
    lazy("edgeft int8, EDGEFT_SPIN=1", lambda: lm_artifact(ctx, "int8"), env={"EDGEFT_SPIN": "1"}, quant="int8",
         lever="spinning threads")
    lazy("edgeft int8, EDGEFT_SPIN=0", lambda: lm_artifact(ctx, "int8"), env={"EDGEFT_SPIN": "0"}, quant="int8",
         lever="sleeping threads (the default before the choice at load)")
    lazy("edgeft int4, EDGEFT_SPIN=1", lambda: lm_artifact(ctx, "int4"), env={"EDGEFT_SPIN": "1"}, quant="int4",
         lever="spinning threads")
    lazy("edgeft int4, accuracy_level 1", lambda: with_accuracy_level(lm_artifact(ctx, "int4"), 1),
         ppl="ppl-edgeft-chunks", quant="int4",
         lever="MatMulNBits accuracy_level 1 (fp32 activations, --fp32-activations) instead of 4 (int8)")
    for v in ("F16", "Q8_0", "Q4_1"):
        add(f"llama.cpp {v}", lambda v=v: {"worker": "llama-bench", "path": prepare.ensure_gguf(v),
                                           "bin": str(prepare.llama_bin()), "ppl": "llama-perplexity",
                                           "llama_threads": ctx.threads})
    add("llama.cpp Q4_1, its default threads", lambda: {"worker": "llama-bench", "path": prepare.ensure_gguf("Q4_1"),
                                                        "bin": str(prepare.llama_bin())},
        lever="llama-bench without -t: its own thread count (physical cores) and polling", timeout=600)
    src = prepare.ensure_model(prepare.LM)
    for w in ("int8", "int4"):
        add(f"OpenVINO GenAI {w}", lambda w=w: {"worker": "gen-openvino", "python": peers.need("openvino"),
                                                "path": peers.openvino_lm(src, w), "ppl": "ppl-openvino",
                                                "peer_threads": ctx.threads})
    add("CTranslate2 int8", lambda: {"worker": "gen-ctranslate2", "python": peers.need("ctranslate2"),
                                     "path": peers.ctranslate2_lm(src), "ppl": "ppl-ctranslate2",
                                     "peer_threads": ctx.threads})
    only = [x.strip() for x in os.environ.get("BENCH_PEERS", "").split(";") if x.strip()]
    return [s for s in out if not only or s["system"] in only or s["system"] == "edgeft fp32"]


def case_peers(ctx: Context) -> None:
    decode_prompt, prefill = _lm_prompts(ctx)
    prefill = {k: v for k, v in prefill.items() if int(k) == 512} or prefill
    systems = generation_systems(ctx)
    rounds = int(os.environ.get("BENCH_ROUNDS", 2 if ctx.quick else ROUNDS))
    repeats = int(os.environ.get("BENCH_REPEATS", 2 if ctx.quick else 3))  # per round, after a warm-up
    per: dict[str, dict[str, list]] = {s["system"]: {"decode": [], "prefill": [], "peak": [], "threads": [],
                                                     "spin": []} for s in systems}
    failed: set[str] = set()
    bandwidth: list[float] = []
    for r in range(rounds):
        try:  # the limit, measured in every round like the systems (numpy max-reductions, edgeft.bench)
            bw = _spawn(ctx, "bandwidth", module="benchmarks.workers", repeats=3, mib=1024)
            bandwidth.append(Stat.from_dict(bw["gbps"]).median)
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip(CASE, "bandwidth", str(exc))
        k = (r + len(systems) // 2) % len(systems) if systems else 0  # round 1 starts with the peers
        order = systems[k:] + systems[:k]
        for s in order:
            name = s["system"]
            if name in failed or not s.get("speed", True):
                continue
            print(f"[peers] round {r + 1}/{rounds}: {name}", flush=True)
            try:
                if s["path"] is None:
                    s["path"] = s["make_path"]()
                out = _spawn(ctx, s["worker"], s.get("python"), s.get("module", "benchmarks.peer_workers"),
                             s.get("env"), s.get("timeout", 1800), path=str(s["path"]), bin=s.get("bin"),
                             llama_threads=s.get("llama_threads"), peer_threads=s.get("peer_threads"),
                             new_tokens=s.get("new_tokens", ctx.new_tokens), repeats=repeats, decode_prompt=decode_prompt,
                             prefill_prompts=prefill)
            except (WorkerFailed, subprocess.TimeoutExpired, Unavailable, OSError) as exc:
                ctx.res.skip(CASE, name, str(exc))
                failed.add(name)
                continue
            per[name]["decode"].append(Stat.from_dict(out["decode_tps"]).median)
            per[name]["prefill"].append(Stat.from_dict(out["prefill_tps"]["512"]).median)
            per[name]["peak"].append(out["peak_rss_mib"])
            per[name]["threads"].append(out.get("n_threads"))
            if "spin" in out and not s.get("env"):  # edgeft's own choice at load (no EDGEFT_SPIN given)
                per[name]["spin"].append(out["spin"])
    if bandwidth:
        ctx.add(CASE, "machine", "read_gbps", _range(bandwidth), "GB/s",
                note=f"read_gbps: numpy max-reductions over 1 GiB, {ctx.threads} threads, once per round")
    ids_file = _held_ids()
    chunks = int(os.environ.get("BENCH_PPL_CHUNKS", CHUNKS))
    refs: dict[str, float] = {}
    for s in systems:
        name, fig = s["system"], per[s["system"]]
        if not s.get("speed", True) and s.get("ppl"):
            fig = None  # quality only
        elif not fig["decode"]:
            continue
        if fig is not None:
            _speed_rows(ctx, s, fig, bandwidth)
        if s.get("ppl"):
            try:
                if s["path"] is None:
                    s["path"] = s["make_path"]()
                p = _spawn(ctx, s["ppl"], s.get("python"),
                           "benchmarks.workers" if s["ppl"] == "ppl-edgeft-chunks" else "benchmarks.peer_workers",
                           path=str(s["path"]), bin=s.get("bin"), ids_file=str(ids_file), n_ctx=N_CTX, chunks=chunks,
                           peer_threads=s.get("peer_threads") or ctx.threads, llama_threads=ctx.threads,
                           data=str(sonnet_files()[1]))
            except (WorkerFailed, subprocess.TimeoutExpired, Unavailable) as exc:
                ctx.res.skip(CASE, f"{name} perplexity", str(exc))
                continue
            ctx.add(CASE, name, "perplexity", p["perplexity"], "ppl", higher=False,
                    note=f"perplexity: held-out sonnets, chunks of {N_CTX}, second half of each scored "
                         f"(llama-perplexity's count), {p.get('tokens')} tokens")
            refs[name] = p["perplexity"]
    # the reference: edgeft fp32 (the pulled fp32 weights), else llama.cpp Q4_1, whose de-quantized
    # weights those are (so it computes the same function, in llama.cpp's numerics)
    ref_name = next((n for n in ("edgeft fp32", "llama.cpp Q4_1") if n in refs), None)
    if ref_name:
        ref = refs[ref_name]
        for m in [m for m in ctx.res.measurements if m.case == CASE and m.metric == "perplexity"]:
            ctx.add(CASE, m.system, "ppl_vs_fp32", 100 * (m.median / ref - 1), "%", higher=False,
                    note=f"ppl_vs_fp32: against {ref_name} (the reference weights); budget +{PPL_BUDGET:g}%")
    classification_peers(ctx)
    if (llama := llamacpp.current()) is not None:
        ctx.res.notes.append(llamacpp.build_note(llama))
    load = ctx.cache.get("loadavg", [])
    if load:
        ctx.res.notes.append(f"peers case: the machine was shared; 1-minute load average {min(load):.2f}-"
                             f"{max(load):.2f} (median {summarize(load).median:.2f}) sampled before each of "
                             f"{len(load)} workers on {os.cpu_count()} cores; {rounds} rounds, order rotated each round; "
                             "each figure is the median of the round medians [their min-max]")


def _range(values: list[float]) -> Stat:
    """The median of the round medians, with their whole range where the quartiles would go."""
    st = summarize(values)
    return Stat(st.median, st.min, st.max, st.min, st.max, st.n)


def _speed_rows(ctx: Context, s: dict, fig: dict, bandwidth: list[float]) -> None:
    name = s["system"]
    note = f"{name}: {s['lever']}" if s.get("lever") else ""
    if fig.get("spin"):
        note = (f"{name}: threads chosen at load (no EDGEFT_SPIN): spinning in {sum(fig['spin'])} of "
                f"{len(fig['spin'])} rounds")
    if s["worker"] == "llama-bench":
        note = (f"{name}: llama-bench tg{ctx.new_tokens} / pp512 at {fig['threads'][0]} threads "
                f"({'named' if s.get('llama_threads') else 'its default'}), its own timing from an empty context")
    ctx.add(CASE, name, "decode_tps", _range(fig["decode"]), "tok/s", note=note,
            new_tokens=s.get("new_tokens", ctx.new_tokens))
    ctx.add(CASE, name, "prefill_tps", _range(fig["prefill"]), "tok/s", prompt_tokens=512)
    ctx.add(CASE, name, "peak_mib", max(fig["peak"]), "MiB", higher=False)
    nbytes = _weight_bytes(Path(s["path"]))
    if nbytes and bandwidth:
        limit = summarize(bandwidth).median * 1e9 / nbytes
        ctx.add(CASE, name, "weight_mib", nbytes / 2**20, "MiB/token", higher=False)
        ctx.add(CASE, name, "bandwidth_share", _range(fig["decode"]).scaled(1 / limit), "share")


def _weight_bytes(path: Path) -> int | None:
    """Bytes read per token: exact for ONNX and GGUF, the weight file's size for OpenVINO / CTranslate2."""
    from benchmarks.weights import weight_bytes

    try:
        if (path / "openvino_model.bin").is_file():
            return (path / "openvino_model.bin").stat().st_size
        if (path / "model.bin").is_file():
            return (path / "model.bin").stat().st_size
        return weight_bytes(path)
    except Exception:  # a missing size only drops the share
        return None


def hf_classifier(run: Path) -> Path:
    """The tuned classifier as a plain Hugging Face folder (what the peers' converters read)."""
    out = WORK / "hf" / run.name
    if not (out / "config.json").is_file():
        from benchmarks.data import load_torch_classifier

        model, tok, _ = load_torch_classifier(run)
        tmp = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def classification_peers(ctx: Context) -> None:
    dev = prepare.data_file("sst2", "dev.tsv")
    if os.environ.get("BENCH_CLASSIFIER_STEPS"):  # a shorter tuning run (speed does not depend on it)
        ctx.classifier_steps = int(os.environ["BENCH_CLASSIFIER_STEPS"])
    try:
        run = sst2_run(ctx)
    except Unavailable as exc:
        ctx.res.skip(CASE, "classification", str(exc))
        return
    systems: list[tuple[str, str, str | Path | None, str, Path]] = [
        ("pytorch fp32 (classifier)", "cls-torch", None, "benchmarks.workers", run)]
    try:
        systems.append(("edgeft int8 (classifier)", "cls-edgeft", None, "benchmarks.workers",
                        prepare.ensure_exported(f"minilm-sst2-{ctx.classifier_steps}-int8", run, "int8")))
    except Unavailable as exc:
        ctx.res.skip(CASE, "edgeft int8 (classifier)", str(exc))
    try:
        systems.append(("OpenVINO int8 (classifier)", "cls-openvino", peers.need("openvino"), "benchmarks.peer_workers",
                        peers.openvino_classifier(hf_classifier(run), run.name)))
    except (Unavailable, OSError) as exc:
        ctx.res.skip(CASE, "OpenVINO int8 (classifier)", str(exc))
    try:
        hf = hf_classifier(run)
        systems.append(("CTranslate2 int8 (classifier)", "cls-ctranslate2", peers.need("ctranslate2"),
                        "benchmarks.peer_workers", peers.ctranslate2_encoder(hf, run.name)))
    except (Unavailable, OSError) as exc:
        ctx.res.skip(CASE, "CTranslate2 int8 (classifier)", str(exc))
    rounds = int(os.environ.get("BENCH_ROUNDS", 2 if ctx.quick else ROUNDS))
    figs: dict[str, dict[str, list]] = {s[0]: {"tp": [], "acc": []} for s in systems}
    for r in range(rounds):
        for name, worker, py, module, path in systems[r % len(systems):] + systems[:r % len(systems)]:
            try:
                out = _spawn(ctx, worker, py, module, env={"OMP_NUM_THREADS": str(ctx.threads)},
                             peer_threads=ctx.threads, path=str(path), hf=str(WORK / "hf" / run.name),
                             data=str(dev), batch_sizes=[32], batches=ctx.batches, max_length=CLS_MAX_LENGTH)
            except (WorkerFailed, subprocess.TimeoutExpired) as exc:
                ctx.res.skip(CASE, name, str(exc))
                continue
            figs[name]["tp"].append(out["batches"][0]["throughput"])
            figs[name]["acc"].append(out["accuracy"])
    for name, f in figs.items():
        if f["tp"]:
            ctx.add(CASE, name, "throughput", _range(f["tp"]), "texts/s", batch=32)
            ctx.add(CASE, name, "accuracy", f["acc"][0], "%", dataset="sst2-dev")
