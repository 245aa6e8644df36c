"""Embeddings: an edgeft int8 artifact against sentence-transformers on PyTorch, side by side.

    edgeft pull minilm-l6
    edgeft export minilm-l6 --task embedding -o ART --eval-data SST2/train.tsv --gate-texts 1000
    pip install sentence-transformers                      # the reference (not an edgeft dependency)
    .venv/bin/python -m benchmarks.embeddings ART $EDGEFT_HOME/models/minilm-l6 SST2/train.tsv

Writes ``benchmarks/results/embeddings.json`` and ``embeddings.md``: the cosine similarity of
the artifact's vectors to sentence-transformers' on 1,000 SST-2 sentences (spread evenly over
the file), and texts per second at batch 1 and batch 32 for both, measured one after the other
in this process with the same thread count. The machine's cores are shared with other jobs:
the results record the CPU flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.constrained import machine

RESULTS = Path(__file__).resolve().parent / "results"


def sentences(path: Path, n: int) -> list[str]:
    rows = [ln.split("\t")[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()[1:] if ln.strip()]
    idx = np.linspace(0, len(rows) - 1, n).astype(int)
    return [rows[i] for i in idx]


def rate(fn, texts: list[str], batch: int, repeats: int = 2) -> float:
    """Best texts per second over ``repeats`` passes of ``fn`` on ``texts`` in batches of ``batch``."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            fn(texts[i:i + batch])
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("model", type=Path, help="the sentence-transformers folder (the pulled minilm-l6)")
    ap.add_argument("data", type=Path, help="SST-2 train.tsv or dev.tsv")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "embeddings")
    args = ap.parse_args()
    import sentence_transformers
    import torch

    from edgeft.runtime import TextEmbedder

    torch.set_num_threads(args.threads)
    texts = sentences(args.data, args.texts)
    emb = TextEmbedder.open(args.artifact, threads=args.threads)
    st = sentence_transformers.SentenceTransformer(str(args.model), device="cpu")
    st.max_seq_length = emb.max_length
    res = {"artifact": str(args.artifact), "machine": machine(), "texts": len(texts), "threads": args.threads,
           "quantization": emb.manifest.quantization.get("scheme"), "gate_chosen": emb.manifest.gate.get("chosen"),
           "sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__}
    ours = emb.embed(texts)
    theirs = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    res["cosine"] = {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5),
                     "p01": round(float(np.percentile(cos, 1)), 5), "goal_mean": 0.99}
    one = texts[:200]
    res["texts_per_s"] = {
        "edgeft_batch1": round(rate(lambda b: emb.embed(b, batch_size=1), one, 1), 1),
        "st_batch1": round(rate(lambda b: st.encode(b, batch_size=1), one, 1), 1),
        "edgeft_batch32": round(rate(lambda b: emb.embed(b, batch_size=32), texts, 32), 1),
        "st_batch32": round(rate(lambda b: st.encode(b, batch_size=32), texts, 32), 1),
    }
    t = res["texts_per_s"]
    res["speedup"] = {"batch1": round(t["edgeft_batch1"] / t["st_batch1"], 2),
                      "batch32": round(t["edgeft_batch32"] / t["st_batch32"], 2), "goal_batch32": 3.0}
    res["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    write_md(res, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


def write_md(res: dict, path: Path) -> None:
    m, c, t, s = res["machine"], res["cosine"], res["texts_per_s"], res["speedup"]
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    path.write_text("\n".join([
        "# Embeddings: edgeft int8 vs sentence-transformers on PyTorch (all-MiniLM-L6-v2)", "",
        f"Made by `python -m benchmarks.embeddings ARTIFACT MODEL sst2/train.tsv` ({res['texts']} SST-2 train "
        f"sentences spread over the file; artifact {res['quantization']} ({res['gate_chosen']}); sentence-transformers "
        f"{res['sentence_transformers']}, torch {res['torch']}; {res['threads']} threads each) on {m['cores']} shared "
        f"cores (flags: {', '.join(m['flags'])}; load average {m['loadavg_start'][0]:.1f} at the start, "
        f"{m['loadavg_end'][0]:.1f} at the end: other jobs ran at the same time, so rates are noisy; both systems "
        "ran one after the other in one process).", "",
        f"- cosine similarity to sentence-transformers' vectors: mean **{c['mean']}**, 1st percentile {c['p01']}, "
        f"min {c['min']} (goal mean >= {c['goal_mean']}: {met(c['mean'] >= c['goal_mean'])})",
        f"- batch 1 (200 texts): edgeft {t['edgeft_batch1']} texts/s, sentence-transformers {t['st_batch1']} "
        f"texts/s: **{s['batch1']}x**",
        f"- batch 32 ({res['texts']} texts): edgeft {t['edgeft_batch32']} texts/s, sentence-transformers "
        f"{t['st_batch32']} texts/s: **{s['batch32']}x** (goal >= {s['goal_batch32']:g}x: "
        f"{met(s['batch32'] >= s['goal_batch32'])})", ""]))


if __name__ == "__main__":
    main()
