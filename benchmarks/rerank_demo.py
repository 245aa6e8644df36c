"""A relevance model tuned on the repository's instruction data, against the untuned encoder's cosine.

    EDGEFT_HOME=/tmp/edgeft-home python -m benchmarks.rerank_demo --model minilm-l6 --work work/rerank-demo

From instruction/answer rows (../shared/data/instruct if present, else tests/data's Alpaca rows):
instructions are split into train and held out; a train instruction with its own answer is a
relevant pair ("1"), with ``--negatives`` answers of other train instructions not ("0").
``edgeft tune`` trains a pair classifier on those pairs and ``edgeft export`` makes it an int8
artifact (``/v1/rerank`` serves it). The baseline is an embedding export of the same base (what
``/v1/embeddings`` returns), ranking by cosine similarity. Each held-out instruction ranks the
answers of all held-out instructions; its own is the one relevant: MRR and recall@1 for both.
Quality only: nothing here is timed. Writes ``<work>/rerank-demo.json`` and prints it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = (REPO.parent / "shared" / "data" / "instruct" / "alpaca_small_2k.json",
           Path("/work/shared/data/instruct/alpaca_small_2k.json"), REPO / "tests" / "data" / "alpaca_200.json")


def rows(path: Path, min_chars: int = 40) -> list[tuple[str, str]]:
    """(instruction, answer) pairs: the input joined to the instruction, short answers ("no") left out,
    one row per instruction."""
    seen, out = set(), []
    for r in json.loads(path.read_text()):
        q = (r["instruction"].strip() + ("\n" + r["input"].strip() if r.get("input", "").strip() else ""))
        a = r["output"].strip()
        if len(a) >= min_chars and q not in seen:
            seen.add(q)
            out.append((q, a))
    return out


def write_pairs(train: list[tuple[str, str]], negatives: int, seed: int, path: Path) -> int:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "passage", "label"])
        n = 0
        for i, (q, a) in enumerate(train):
            w.writerow([q, a, "1"])
            for j in rng.sample([k for k in range(len(train)) if k != i], negatives):
                w.writerow([q, train[j][1], "0"])
            n += 1 + negatives
    return n


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of the diagonal (each query's own answer) in each row, ties counted against it."""
    own = np.diag(scores)[:, None]
    return 1 + (scores > own).sum(1) + ((scores == own).sum(1) - 1)


def figures(scores: np.ndarray) -> dict[str, float]:
    r = ranks(scores)
    return {"mrr": round(float(np.mean(1.0 / r)), 4), "recall_at_1": round(float(np.mean(r == 1)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "rerank-demo")
    ap.add_argument("--train", type=int, default=600, help="train instructions")
    ap.add_argument("--held-out", type=int, default=100, help="held-out instructions (each ranks all their answers)")
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--trainable-layers", type=int, default=2, help="top blocks trained (MiniLM has 6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from edgeft.export import ExportConfig, export
    from edgeft.runtime import TextClassifier, TextEmbedder
    from edgeft.tune import TuneConfig, tune

    source = next(p for p in SOURCES if p.is_file())
    items = rows(source)
    random.Random(args.seed).shuffle(items)
    held, train = items[:args.held_out], items[args.held_out:args.held_out + args.train]
    args.work.mkdir(parents=True, exist_ok=True)
    n_pairs = write_pairs(train, args.negatives, args.seed, args.work / "pairs.csv")

    run = tune(TuneConfig(model=args.model, data=args.work / "pairs.csv", out=args.work / "run", overwrite=True,
                          max_length=args.max_length, batch_size=16, max_steps=args.steps, threads=args.threads,
                          seed=args.seed, trainable_layers=args.trainable_layers, progress=False))
    reranker = export(ExportConfig(source=str(run), out=args.work / "reranker", quantize="int8", overwrite=True,
                                   allow_degraded=True,
                                   threads=args.threads), log=None)
    embedder = export(ExportConfig(source=args.model, out=args.work / "embedder", task="embedding", quantize="int8",
                                   overwrite=True, threads=args.threads), log=None)

    queries, answers = [q for q, _ in held], [a for _, a in held]
    clf = TextClassifier.open(reranker, threads=args.threads)
    rel = clf.relevance([(q, a) for q in queries for a in answers]).reshape(len(queries), len(answers))
    emb = TextEmbedder.open(embedder, threads=args.threads)
    qv, av = emb.embed(queries), emb.embed(answers)
    cos = (qv / np.linalg.norm(qv, axis=1, keepdims=True)) @ (av / np.linalg.norm(av, axis=1, keepdims=True)).T

    manifest = json.loads((Path(reranker) / "manifest.json").read_text())
    result = {
        "data": str(source.relative_to(REPO.parent) if source.is_relative_to(REPO.parent) else source),
        "model": args.model, "train_instructions": len(train), "train_pairs": n_pairs,
        "held_out_instructions": len(held), "candidates_per_query": len(answers),
        "tune": {"steps": args.steps, "trainable_layers": args.trainable_layers, "max_length": args.max_length, "batch_size": 16, "negatives": args.negatives},
        "reranker": {**figures(rel), "artifact": "int8", "gate": manifest["gate"].get("metrics", {})},
        "embedding_cosine": {**figures(cos), "artifact": "int8"},
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
    }
    (args.work / "rerank-demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        return platform.processor() or "?"


if __name__ == "__main__":
    main()
