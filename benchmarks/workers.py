"""One system, measured alone in its own process: ``python -m benchmarks.workers SPEC_JSON``.

Each worker loads one system (edgeft's runtime, transformers, onnxruntime-genai,
llama.cpp, a PyTorch classifier...), runs the timing helpers of ``edgeft.bench`` on it
and prints one line ``RESULT {json}`` last, with its process's peak memory. A fresh
process per system keeps one system's memory and threads from polluting another's.
The parent (``benchmarks.cases``) builds the spec and reads the line; it never imports
the systems itself. Heavy imports happen inside the worker functions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from benchmarks.speculative import spec_worker
from edgeft.bench import (
    OnToken,
    Runner,
    bench_batches,
    bench_generation,
    edgeft_runner,
    memory_bandwidth,
    peak_rss_mib,
)


def _ids(spec: dict) -> tuple[list[int], dict[int, list[int]]]:
    return spec["decode_prompt"], {int(k): v for k, v in spec["prefill_prompts"].items()}


def gen_generic(spec: dict, run: Runner) -> dict:
    """Time a system given as ``run(ids, n, on_token)`` with the spec's prompts and repeats."""
    decode_prompt, prefill = _ids(spec)
    return bench_generation(run, decode_prompt, prefill, spec["new_tokens"], spec["repeats"],
                            spec.get("warmup", 1)).to_dict()


# ---------------------------------------------------------------- generation systems


def _spin() -> str | None:
    """``$EDGEFT_SPIN`` (a lever the peers case sets per system): the library reads no environment."""
    return os.environ.get("EDGEFT_SPIN")


def gen_edgeft(spec: dict) -> dict:
    from edgeft.runtime import Generator

    t0 = time.perf_counter()
    gen = Generator.open(spec["path"], threads=spec["threads"], spin=_spin())
    load_s = time.perf_counter() - t0
    return {**gen_generic(spec, edgeft_runner(gen)), "load_s": load_s, "spin": gen.spinning,
            "spin_reason": gen.spin_reason}


def gen_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    class Stamp(BaseStreamer):
        def __init__(self, on_token: OnToken) -> None:
            self.on_token, self.prompt_seen = on_token, False

        def put(self, value) -> None:  # the first call carries the prompt
            if self.prompt_seen:
                self.on_token()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        x = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=Stamp(on_token), pad_token_id=model.config.eos_token_id)

    return {**gen_generic(spec, run), "load_s": load_s}


def gen_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(spec["path"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)  # runs the prompt; the first token is then read from its logits
        while not gen.is_done():
            gen.generate_next_token()
            on_token()

    return {**gen_generic(spec, run), "load_s": load_s}


def gen_llamacpp(spec: dict) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(spec["path"], n_ctx=spec.get("n_ctx", 1024), n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    load_s = time.perf_counter() - t0

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        llm.reset()  # no KV-cache reuse between runs: every run pays its prompt
        for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                           reset=True)):
            on_token()
            if i + 1 >= n:
                break

    return {**gen_generic(spec, run), "load_s": load_s}


# ---------------------------------------------------------------- classification systems


def _sst2(spec: dict) -> tuple[list[str], list[str]]:
    from benchmarks.data import read_tsv_classification

    return read_tsv_classification(spec["data"], label_col=spec.get("label_col", 1))


def cls_edgeft(spec: dict) -> dict:
    from edgeft.runtime import TextClassifier

    clf = TextClassifier.open(spec["path"], threads=spec["threads"])

    def predict(texts: list[str]):
        return clf.predict_proba(texts, batch_size=len(texts))

    return _classification(spec, predict, clf.labels)


def cls_torch(spec: dict) -> dict:
    import torch

    from benchmarks.data import load_torch_classifier

    torch.set_num_threads(spec["threads"])
    model, tok, labels = load_torch_classifier(spec["path"])

    def predict(texts: list[str]):
        enc = tok(texts, padding=True, truncation=True, max_length=spec.get("max_length", 128), return_tensors="pt")
        with torch.inference_mode():
            return torch.softmax(model(**enc).logits, -1).numpy()

    return _classification(spec, predict, labels)


def _classification(spec: dict, predict, labels: list[str]) -> dict:
    import numpy as np

    texts, gold = _sst2(spec)
    out: dict[str, Any] = {"batches": [bench_batches(predict, texts, b, spec["batches"]).to_dict()
                                       for b in spec["batch_sizes"]]}
    if gold is not None:
        probs = np.concatenate([predict(texts[i:i + 32]) for i in range(0, len(texts), 32)])
        names = [labels[i] for i in probs.argmax(-1)]
        out["accuracy"] = 100.0 * float(np.mean([n == str(g) for n, g in zip(names, gold)]))
    return out


# ---------------------------------------------------------------- perplexity, first token, tuning


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def _nll(logits, ids: list[int]) -> float:  # numpy [T, V]
    """Summed negative log-likelihood of ids[1:] given logits[:-1]."""
    import numpy as np

    x = np.asarray(logits[:-1], dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def _perplexity(spec: dict, encode, score) -> dict:
    import math

    ids = encode(open(spec["data"]).read())
    total, count = 0.0, 0
    for w in _windows(ids, spec.get("window", 256)):
        total += _nll(score(w), w)
        count += len(w) - 1
    return {"perplexity": math.exp(total / count), "tokens": count}


def ppl_edgeft(spec: dict) -> dict:
    from edgeft.runtime import Generator

    gen = Generator.open(spec["path"], threads=spec["threads"], spin=_spin())
    return _perplexity(spec, gen.encode, gen.score)


def ppl_edgeft_chunks(spec: dict) -> dict:
    """Perplexity of an artifact over given ids, counted as ``llama-perplexity`` counts it."""
    from benchmarks.peer_workers import chunk_nll, held_ids, perplexity_result
    from edgeft.runtime import Generator

    gen = Generator.open(spec["path"], threads=spec["threads"], spin=_spin())
    n_ctx = spec.get("n_ctx", 256)
    return perplexity_result(*chunk_nll(held_ids(spec), n_ctx, gen.score, chunks=spec.get("chunks")), n_ctx)


def ppl_torch(spec: dict) -> dict:
    import torch

    from benchmarks.data import load_tuned_torch
    from edgeft.artifact import Task

    torch.set_num_threads(spec["threads"])
    model, tok, _ = load_tuned_torch(spec["path"], Task.causal_lm)

    def score(ids: list[int]):
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].numpy()

    return _perplexity(spec, lambda t: tok(t, add_special_tokens=False)["input_ids"], score)


def first_token(spec: dict) -> dict:
    """Fresh interpreter per repeat: import the runtime, open the artifact, produce one token."""
    import subprocess

    from edgeft.bench import summarize

    code = (
        "import time; t0 = time.perf_counter()\n"
        "from edgeft.runtime import Generator, SamplingParams\n"
        "g = Generator.open(__import__('sys').argv[1], threads=int(__import__('sys').argv[2]),"
        " spin=__import__('os').environ.get('EDGEFT_SPIN'))\n"
        "next(iter(g.stream('Shall I compare thee', SamplingParams(max_new_tokens=1))))\n"
        "print(time.perf_counter() - t0)\n"
    )
    secs = []
    for _ in range(spec["repeats"]):
        out = subprocess.run([sys.executable, "-c", code, spec["path"], str(spec["threads"])],
                             capture_output=True, text=True, check=True)
        secs.append(float(out.stdout.strip().splitlines()[-1]))
    return {"first_token_s": summarize(secs).to_dict()}


def profile_edgeft(spec: dict) -> dict:
    """Where a decode step's time goes: onnxruntime's per-op profile against the loop's wall time."""
    import glob
    import tempfile

    from edgeft.runtime import Generator, SamplingParams

    prefix = os.path.join(tempfile.mkdtemp(prefix="edgeft-prof-"), "decode")
    gen = Generator.open(spec["path"], threads=spec["threads"], profile_prefix=prefix, spin=_spin())
    ids = spec["decode_prompt"]
    gen.generate(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    gen.generate(ids, SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True))
    wall = time.perf_counter() - t0
    path = gen.engine.session.end_profiling()
    files = [path] if path and os.path.isfile(path) else glob.glob(prefix + "*.json")
    return {"wall_s": wall, "tokens": spec["new_tokens"], **_op_shares(files[0], spec["new_tokens"])}


def _op_shares(path: str, last_runs: int) -> dict:
    """Time in the last ``last_runs`` session runs, and in kernels by op type, from a profile."""
    events = json.load(open(path))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-last_runs:]
    kernels: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            kernels[op] = kernels.get(op, 0.0) + e["dur"] / 1e6
    return {"run_s": sum(e["dur"] for e in runs) / 1e6, "runs": len(runs), "kernel_s": kernels}


def tune_variant(spec: dict) -> dict:
    from benchmarks.tuning import train_variant

    return train_variant(spec)


def sample_tuned(spec: dict) -> dict:
    """A few sampled continuations of a tuned causal LM's run folder (PyTorch, seeded), for reading."""
    import torch

    from benchmarks.data import load_tuned_torch
    from edgeft.artifact import Task

    torch.set_num_threads(spec["threads"])
    model, tok, _ = load_tuned_torch(spec["path"], Task.causal_lm)
    lines = []
    for prompt in spec["prompts"]:
        ids = tok(prompt, return_tensors="pt")
        torch.manual_seed(0)
        gen = model.generate(**ids, max_new_tokens=spec["new_tokens"], do_sample=True, temperature=0.7, top_p=0.9,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        lines.append(tok.decode(gen[0], skip_special_tokens=True))
    return {"lines": lines}


def module_measure(spec: dict) -> dict:
    """A case module's own measurement (``benchmarks.<module>.measure(spec)``), alone in this process."""
    import importlib

    return importlib.import_module(f"benchmarks.{spec['module']}").measure(spec)


def bandwidth(spec: dict) -> dict:
    return {"gbps": memory_bandwidth(spec["threads"], spec.get("mib", 1024), spec["repeats"]).to_dict()}


def llama_bench(spec: dict) -> dict:
    from benchmarks.peer_workers import llama_bench as run

    return run(spec)


WORKERS = {
    "llama-bench": llama_bench,
    "gen-edgeft": gen_edgeft,
    "gen-transformers": gen_transformers,
    "gen-genai": gen_genai,
    "gen-llamacpp": gen_llamacpp,
    "cls-edgeft": cls_edgeft,
    "cls-torch": cls_torch,
    "bandwidth": bandwidth,
    "ppl-edgeft": ppl_edgeft,
    "ppl-edgeft-chunks": ppl_edgeft_chunks,
    "ppl-torch": ppl_torch,
    "first-token": first_token,
    "tune-variant": tune_variant,
    "sample-tuned": sample_tuned,
    "module": module_measure,
    "profile-edgeft": profile_edgeft,
    "spec-edgeft": spec_worker,
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    threads = str(spec.get("threads", os.cpu_count()))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    result = WORKERS[spec["worker"]](spec)
    result["peak_rss_mib"] = max(peak_rss_mib(), result.get("child_peak_mib", 0.0))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
