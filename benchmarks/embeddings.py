"""Case ``embeddings``: an edgeft int8 embedding artifact against sentence-transformers on PyTorch, side by side.

    .venv/bin/pip install sentence-transformers            # the reference (not an edgeft dependency)
    python -m benchmarks.run --cases embeddings

The artifact is ``edgeft export minilm-l6 --task embedding --quantize int8`` gated on SST-2 train
sentences (made once, cached in work/). In one worker process, one after the other with the same
thread count: the cosine similarity of the artifact's vectors to sentence-transformers' on 1,000
SST-2 sentences (spread evenly over the file; a quick run: 200), and texts per second at batch 1
(200 texts) and batch 32 for both. Goals (mean cosine >= 0.99, 3x at batch 32) are in
``benchmarks.headline``. Earlier runs of the script this case replaces are kept as written:
``results/embeddings*.{json,md}``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "embeddings"
EDGEFT_EMB, ST = "edgeft int8 (embedding)", "sentence-transformers fp32"


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


def measure(spec: dict) -> dict:
    """Cosine and rates of both systems on the spec's texts, in this (worker) process."""
    import sentence_transformers
    import torch

    from edgeft.runtime import TextEmbedder

    torch.set_num_threads(spec["threads"])
    texts = sentences(Path(spec["data"]), spec["texts"])
    emb = TextEmbedder.open(spec["path"], threads=spec["threads"])
    st = sentence_transformers.SentenceTransformer(spec["model"], device="cpu")
    st.max_seq_length = emb.max_length
    ours = emb.embed(texts)
    theirs = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    one = texts[:200]
    return {"texts": len(texts), "quantization": emb.manifest.quantization.scheme,
            "sentence_transformers": sentence_transformers.__version__,
            "cosine": {"mean": float(cos.mean()), "min": float(cos.min()), "p01": float(np.percentile(cos, 1))},
            "rates": {EDGEFT_EMB: {1: rate(lambda b: emb.embed(b, batch_size=1), one, 1),
                                   32: rate(lambda b: emb.embed(b, batch_size=32), texts, 32)},
                      ST: {1: rate(lambda b: st.encode(b, batch_size=1), one, 1),
                           32: rate(lambda b: st.encode(b, batch_size=32), texts, 32)}}}


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, record_gate

    prepare.need_module("sentence_transformers", "the embeddings reference")
    data = prepare.data_file("sst2", "train.tsv")
    model = prepare.ensure_model(prepare.ENCODER)
    art = prepare.ensure_exported("minilm-embedding-int8", prepare.ENCODER, "int8",
                                  ["--task", "embedding", "--eval-data", str(data), "--gate-texts", "200"])
    record_gate(ctx, CASE, EDGEFT_EMB, art)
    try:
        r = ctx.measure("embeddings", path=str(art), model=str(model), data=str(data),
                        texts=200 if ctx.quick else 1000)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    c = r["cosine"]
    ctx.add(CASE, EDGEFT_EMB, "cosine_mean", c["mean"], "cosine",
            note=f"{CASE}: {r['texts']} SST-2 train sentences spread over the file; artifact {r['quantization']}; "
                 f"sentence-transformers {r['sentence_transformers']}; both in one worker, one after the other")
    ctx.add(CASE, EDGEFT_EMB, "cosine_p01", c["p01"], "cosine")
    ctx.add(CASE, EDGEFT_EMB, "cosine_min", c["min"], "cosine")
    for system, rates in r["rates"].items():
        for batch, texts_per_s in rates.items():
            ctx.add(CASE, system, "throughput", texts_per_s, "texts/s", batch=int(batch))
