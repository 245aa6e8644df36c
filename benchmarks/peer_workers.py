"""The native peers, each measured alone: ``python -m benchmarks.peer_workers SPEC_JSON``.

Like ``benchmarks.workers`` (one system, one fresh process, one ``RESULT {json}`` line last),
for the systems that run outside the project's venv:

- llama.cpp's own tools (``llama-bench``, ``llama-perplexity``) run as subprocesses; these
  workers run under the project's interpreter and only parse what the tools print;
- OpenVINO GenAI and CTranslate2 run under the peers' venv interpreter
  (``benchmarks.peers``), which has neither edgeft's runtime nor onnxruntime.

Every system is timed by ``edgeft.bench.bench_generation`` on the same token ids (llama-bench
times itself: its figures are its own ``samples_ts``), and its perplexity is computed the
way ``llama-perplexity`` computes it (``chunk_nll``), so the quality column means the same
thing in every row.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeft.bench import OnToken, bench_generation, peak_rss_mib, summarize

# ---------------------------------------------------------------- perplexity, one definition for all


def chunk_nll(ids: Sequence[int], n_ctx: int, score: Callable[[list[int]], Any],
              bos: int | None = None, chunks: int | None = None) -> tuple[float, int]:
    """Summed NLL and token count the way ``llama-perplexity -c n_ctx`` counts them.

    The ids are cut into ``len(ids) // n_ctx`` whole chunks; each chunk is scored from scratch
    and only its second half counts (each token there has at least n_ctx/2 tokens of context):
    positions ``n_ctx//2 .. n_ctx-2`` predict the next id. With ``bos`` the chunk's first id
    is replaced by it (what llama-perplexity does for a vocabulary that adds BOS).
    ``score(chunk)`` returns logits ``[n_ctx, vocab]``, or a ``[n_ctx - 1]`` sequence of the
    log-probabilities of ``chunk[1:]`` (what CTranslate2's ``score_batch`` gives).
    """
    import numpy as np

    first = n_ctx // 2
    total, count = 0.0, 0
    for c in range(min(len(ids) // n_ctx, chunks or len(ids))):
        chunk = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out = np.asarray(score(chunk), dtype=np.float64)
        targets = np.asarray(chunk[first + 1:])
        if out.ndim == 1:  # log-probs of chunk[1:]: entry j is token j+1
            total -= float(out[first:n_ctx - 1].sum())
        else:
            x = out[first:n_ctx - 1]
            x = x - x.max(-1, keepdims=True)
            logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
            total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


def perplexity_result(total: float, count: int, n_ctx: int) -> dict:
    return {"perplexity": math.exp(total / count), "tokens": count, "n_ctx": n_ctx}


def held_ids(spec: dict) -> list[int]:
    """The held-out token ids every system scores (a JSON list in ``spec["ids_file"]``)."""
    return json.load(open(spec["ids_file"]))


def _ids(spec: dict) -> tuple[list[int], dict[int, list[int]]]:
    return spec["decode_prompt"], {int(k): v for k, v in spec["prefill_prompts"].items()}


# ---------------------------------------------------------------- llama.cpp's own tools


def _child_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def parse_llama_bench(rows: list[dict]) -> dict:
    """Decode / prefill figures from ``llama-bench -o json`` rows (tokens/s of each repetition)."""
    out: dict[str, Any] = {"prefill_tps": {}}
    for r in rows:
        st = summarize([float(x) for x in r["samples_ts"]])
        if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tps"], out["new_tokens"] = st.to_dict(), r["n_gen"]
        elif r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tps"][str(r["n_prompt"])] = st.to_dict()
        out["n_threads"] = r.get("n_threads")
        out["build"] = f"{r.get('build_commit', '?')} ({r.get('build_number', '?')})"
        out["cpu_info"] = r.get("cpu_info", "")
    return out


def llama_bench(spec: dict) -> dict:
    """``llama-bench`` at its own defaults (threads too, unless the spec names them; ``llama_args`` added)."""
    _, prefill = _ids(spec)
    cmd = [os.path.join(spec["bin"], "llama-bench"), "-m", spec["path"], "-n", str(spec["new_tokens"]),
           "-p", ",".join(str(n) for n in sorted(prefill)), "-r", str(spec["repeats"]), "-o", "json"]
    if spec.get("llama_threads"):
        cmd += ["-t", str(spec["llama_threads"])]
    cmd += [str(a) for a in spec.get("llama_args", [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench exit {res.returncode}: {res.stderr.strip()[-300:]}")
    out = parse_llama_bench(json.loads(res.stdout))
    small = str(min(prefill))
    if small in out["prefill_tps"]:  # time to first token of the short prompt, from its prefill rate
        from edgeft.bench import Stat

        out["ttft_s"] = Stat.from_dict(out["prefill_tps"][small]).inverse(float(small)).to_dict()
    out["prompt_tokens"] = int(small)
    out["command"] = " ".join(cmd[1:])
    out["child_peak_mib"] = _child_peak_mib()
    return out


PPL_LINE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS_LINE = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def parse_llama_perplexity(text: str) -> dict:
    m = PPL_LINE.search(text)
    if m is None:
        raise RuntimeError(f"no 'Final estimate' in llama-perplexity's output: {text.strip()[-300:]}")
    out = {"perplexity": float(m.group(1)), "stderr": float(m.group(2))}
    c = CHUNKS_LINE.search(text)
    if c:
        chunks, n_ctx = int(c.group(1)), int(c.group(2))
        out.update(chunks=chunks, n_ctx=n_ctx, tokens=chunks * (n_ctx - 1 - n_ctx // 2))
    return out


def llama_perplexity(spec: dict) -> dict:
    n_ctx = spec.get("n_ctx", 256)
    cmd = [os.path.join(spec["bin"], "llama-perplexity"), "-m", spec["path"], "-f", spec["data"],
           "-c", str(n_ctx), "-b", str(n_ctx)] + (["--chunks", str(spec["chunks"])] if spec.get("chunks") else []) + (["-t", str(spec["llama_threads"])] if spec.get("llama_threads") else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama-perplexity exit {res.returncode}: {res.stderr.strip()[-300:]}")
    return {**parse_llama_perplexity(res.stdout + res.stderr), "child_peak_mib": _child_peak_mib()}


# ---------------------------------------------------------------- OpenVINO GenAI


def _ov_streamer(og, on_token: OnToken):
    class Stamp(og.StreamerBase):
        def write(self, token):  # an id or a list of ids
            for _ in (token if isinstance(token, list) else [token]):
                on_token()
            return og.StreamingStatus.RUNNING

        def put(self, token):  # older releases call put(id) -> stop?
            on_token()
            return False

        def end(self) -> None:
            pass

    return Stamp()


def _ov_threads(spec: dict) -> dict:
    n = spec.get("peer_threads")
    return {"INFERENCE_NUM_THREADS": int(n)} if n else {}


def gen_openvino(spec: dict) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    t0 = time.perf_counter()
    # prefix caching off: the suite repeats one prompt, and a cached prefix would make prefill free
    sched = og.SchedulerConfig()
    sched.enable_prefix_caching = False
    pipe = og.LLMPipeline(spec["path"], "CPU", scheduler_config=sched, **_ov_threads(spec))  # else its own defaults
    load_s = time.perf_counter() - t0

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        cfg = og.GenerationConfig()
        cfg.max_new_tokens, cfg.min_new_tokens, cfg.ignore_eos, cfg.do_sample = n, n, True, False
        x = np.asarray([ids], dtype=np.int64)
        inputs = og.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x)))
        pipe.generate(inputs, cfg, _ov_streamer(og, on_token))

    decode_prompt, prefill = _ids(spec)
    fig = bench_generation(run, decode_prompt, prefill, spec["new_tokens"], spec["repeats"], spec.get("warmup", 1))
    return {**fig.to_dict(), "load_s": load_s}


def ppl_openvino(spec: dict) -> dict:
    import numpy as np
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(spec["path"], compile=True, ov_config=_ov_threads(spec) or None)

    def score(chunk: list[int]):
        x = torch.tensor([chunk], dtype=torch.int64)
        # no past_key_values: optimum resets the stateful IR's KV state, so each chunk starts fresh
        with torch.inference_mode():
            out = model(input_ids=x, attention_mask=torch.ones_like(x))
        return np.asarray(out.logits[0], dtype=np.float32)

    total, count = chunk_nll(held_ids(spec), spec.get("n_ctx", 256), score, chunks=spec.get("chunks"))
    return perplexity_result(total, count, spec.get("n_ctx", 256))


def cls_openvino(spec: dict) -> dict:
    import numpy as np
    import openvino as ov
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["path"])
    compiled = ov.Core().compile_model(os.path.join(spec["path"], "openvino_model.xml"), "CPU", _ov_threads(spec))
    names = {i.get_any_name() for i in compiled.inputs}

    def predict(texts: list[str]):
        enc = tok(texts, padding=True, truncation=True, max_length=spec.get("max_length", 64), return_tensors="np")
        logits = compiled({k: v for k, v in enc.items() if k in names})[0]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    labels = _labels(spec["path"])
    return _classification(spec, predict, labels)


def _labels(folder: str) -> list[str]:
    cfg = json.load(open(os.path.join(folder, "config.json")))
    id2label = cfg.get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _classification(spec: dict, predict, labels: list[str]) -> dict:
    import numpy as np

    from benchmarks.data import read_tsv_classification
    from edgeft.bench import bench_batches

    texts, gold = read_tsv_classification(spec["data"], label_col=spec.get("label_col", 1))
    out: dict[str, Any] = {"batches": [bench_batches(predict, texts, b, spec["batches"]).to_dict()
                                       for b in spec["batch_sizes"]]}
    probs = np.concatenate([predict(texts[i:i + 32]) for i in range(0, len(texts), 32)])
    out["accuracy"] = 100.0 * float(np.mean([labels[i] == str(g) for i, g in zip(probs.argmax(-1), gold)]))
    return out


# ---------------------------------------------------------------- CTranslate2


def _ct2(spec: dict):
    import ctranslate2
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    threads = {"intra_threads": int(spec["peer_threads"])} if spec.get("peer_threads") else {}  # else its default
    gen = ctranslate2.Generator(spec["path"], device="cpu", compute_type="int8", **threads)
    tok = Tokenizer.from_file(os.path.join(spec["path"], "tokenizer.json"))
    return gen, tok, time.perf_counter() - t0


def gen_ctranslate2(spec: dict) -> dict:
    gen, tok, load_s = _ct2(spec)
    # end-of-sequence never ends a run (every system decodes the same count): suppress the EOS tokens
    eos = [[t] for t in ("<|im_end|>", "<|endoftext|>") if tok.token_to_id(t) is not None]

    def run(ids: list[int], n: int, on_token: OnToken) -> None:
        tokens = [tok.id_to_token(i) for i in ids]
        for _ in gen.generate_tokens(tokens, max_length=n, sampling_topk=1, suppress_sequences=eos or None):
            on_token()

    decode_prompt, prefill = _ids(spec)
    fig = bench_generation(run, decode_prompt, prefill, spec["new_tokens"], spec["repeats"], spec.get("warmup", 1))
    return {**fig.to_dict(), "load_s": load_s}


def ppl_ctranslate2(spec: dict) -> dict:
    gen, tok, _ = _ct2(spec)

    def score(chunk: list[int]):  # log-probs of chunk[1:]
        return gen.score_batch([[tok.id_to_token(i) for i in chunk]])[0].log_probs

    total, count = chunk_nll(held_ids(spec), spec.get("n_ctx", 256), score, chunks=spec.get("chunks"))
    return perplexity_result(total, count, spec.get("n_ctx", 256))


def cls_ctranslate2(spec: dict) -> dict:
    """The classifier on CTranslate2's ``Encoder``: its pooled output (BERT's tanh pooler, inside the
    converted model) through the tuned head (``classifier.weight``/``bias`` of the HF folder) in numpy."""
    import ctranslate2
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    threads = {"intra_threads": int(spec["peer_threads"])} if spec.get("peer_threads") else {}
    enc = ctranslate2.Encoder(spec["path"], device="cpu", compute_type="int8", **threads)
    tok = AutoTokenizer.from_pretrained(spec["hf"])
    head = load_file(os.path.join(spec["hf"], "model.safetensors"))
    w, b = head["classifier.weight"].T.astype(np.float32), head["classifier.bias"].astype(np.float32)

    def predict(texts: list[str]):
        ids = tok(texts, truncation=True, max_length=spec.get("max_length", 64))["input_ids"]
        pooled = np.asarray(enc.forward_batch([tok.convert_ids_to_tokens(x) for x in ids]).pooler_output)
        logits = pooled @ w + b
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return _classification(spec, predict, _labels(spec["hf"]))


WORKERS = {
    "llama-bench": llama_bench,
    "llama-perplexity": llama_perplexity,
    "gen-openvino": gen_openvino,
    "ppl-openvino": ppl_openvino,
    "cls-openvino": cls_openvino,
    "gen-ctranslate2": gen_ctranslate2,
    "ppl-ctranslate2": ppl_ctranslate2,
    "cls-ctranslate2": cls_ctranslate2,
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    result = WORKERS[spec["worker"]](spec)
    result["peak_rss_mib"] = max(peak_rss_mib(), result.get("child_peak_mib", 0.0))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
