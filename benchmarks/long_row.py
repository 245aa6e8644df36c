"""Case ``long_row``: what one huge row costs the classifier's tokenizing step, whole or cut by characters first.

    python -m benchmarks.run --cases long_row        # a minute; BENCH_QUICK=1: 1 MB whole, 10 MB cut

Each measurement runs in a fresh subprocess (peak RSS is the process's own): tokenizing
the row whole then truncating to 128 tokens (what edgeft did before), and cutting it with
``edgeft.data.clip_for_tokens`` first (what it does now), with MiniLM-L6's tokenizer; the
case records whether all three kept the same 128 token ids (``same_ids``: 1 yes, 0 no). The
whole-row case runs on a smaller row (5 MB) because its cost grows with the row and this
machine is shared; the cut case runs on the full 50 MB. The earlier run of the script this
case replaces is kept as written: ``results/long_row.md``. Standard library, tokenizers and
edgeft only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "long_row"
MAX_LENGTH = 128
WHOLE_MB, CUT_MB = 5.0, 50.0  # a quick run: a fifth of each

CHILD = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
from edgeft.data import clip_for_tokens
path, mb, cut, n = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "cut", int(sys.argv[4])
unit = "a gorgeous, witty, seductive movie and the plot is a lump of coal. "
text = (unit * int(mb * 1e6 / len(unit) + 1))[: int(mb * 1e6)]
tok = Tokenizer.from_file(path)
tok.no_padding()
tok.enable_truncation(n)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ids = tok.encode(clip_for_tokens(text, n) if cut else text).ids
s = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mb": mb, "cut": cut, "seconds": s, "peak_rss_mb": peak / 1024, "before_mb": base / 1024,
                  "ids": ids}))
"""


def run(tokenizer: str, mb: float, cut: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, tokenizer, str(mb), "cut" if cut else "whole", str(MAX_LENGTH)],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout)


def case(ctx: Context) -> None:
    tokenizer = str(prepare.ensure_model(prepare.ENCODER) / "tokenizer.json")
    whole_mb, cut_mb = (WHOLE_MB / 5, CUT_MB / 5) if ctx.quick else (WHOLE_MB, CUT_MB)
    load = [os.getloadavg()[0]]
    rows = [(f"{whole_mb:g} MB row, tokenized whole, then truncated (before)", run(tokenizer, whole_mb, cut=False)),
            (f"{whole_mb:g} MB row, cut by characters first (now)", run(tokenizer, whole_mb, cut=True)),
            (f"{cut_mb:g} MB row, cut by characters first (now)", run(tokenizer, cut_mb, cut=True))]
    load.append(os.getloadavg()[0])
    note = (f"long_row: {prepare.ENCODER}'s tokenizer.json, truncation at {MAX_LENGTH} tokens, each row in a fresh "
            f"subprocess (peak RSS includes the row itself and the Python process); load average {load[0]:.1f} "
            f"before, {load[1]:.1f} after")
    for system, r in rows:
        ctx.add(CASE, system, "tokenize_s", r["seconds"], "s", higher=False, note=note)
        ctx.add(CASE, system, "peak_rss_mb", r["peak_rss_mb"], "MB", higher=False)
    same = all(r["ids"] == rows[0][1]["ids"] for _, r in rows)
    ctx.add(CASE, "all three", "same_ids", float(same), "yes=1",
            note=f"long_row: whether the {MAX_LENGTH} token ids kept are identical in all three")
