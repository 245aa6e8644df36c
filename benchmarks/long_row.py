"""What one huge row costs the classifier's tokenizing step: whole, or cut by characters first.

    .venv/bin/python -m benchmarks.long_row [--tokenizer PATH] [--whole-mb 5] [--cut-mb 50]

Each measurement runs in a fresh subprocess (peak RSS is the process's own): tokenizing
the row whole then truncating to 128 tokens (what edgeft did before), and cutting it with
``edgeft.data.clip_for_tokens`` first (what it does now), then checks that both keep the
same 128 token ids. The whole-row case runs on a smaller row (default 5 MB) because its
cost grows with the row and this machine is shared; the cut case runs on the full 50 MB.
Writes benchmarks/results/long_row.md. Standard library, tokenizers and edgeft only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "long_row.md"
MAX_LENGTH = 128

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


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni")
                                if f in flags)
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/edgeft/models/minilm-l6/tokenizer.json"))
    ap.add_argument("--whole-mb", type=float, default=5.0)
    ap.add_argument("--cut-mb", type=float, default=50.0)
    a = ap.parse_args()
    load0 = os.getloadavg()
    whole = run(a.tokenizer, a.whole_mb, cut=False)
    cut_small = run(a.tokenizer, a.whole_mb, cut=True)
    cut = run(a.tokenizer, a.cut_mb, cut=True)
    load1 = os.getloadavg()
    same = whole["ids"] == cut_small["ids"] == cut["ids"]
    rows = [(f"{whole['mb']:g} MB row, tokenized whole, then truncated (before)", whole),
            (f"{cut_small['mb']:g} MB row, cut by characters first (now)", cut_small),
            (f"{cut['mb']:g} MB row, cut by characters first (now)", cut)]
    lines = [
        "# One huge row through the classifier's tokenizer",
        "",
        f"Made by `python -m benchmarks.long_row --whole-mb {a.whole_mb:g} --cut-mb {a.cut_mb:g}` with "
        f"`{Path(a.tokenizer).parent.name}`'s tokenizer.json, truncation at {MAX_LENGTH} tokens; each row in a "
        "fresh subprocess (peak RSS includes the row itself and the Python process).",
        f"CPU: {platform.machine()}, flags {cpu_flags()}; {os.cpu_count()} cores, shared with other work "
        f"(load average {load0[0]:.1f} before, {load1[0]:.1f} after), so the seconds are indicative.",
        "",
        "| case | tokenize seconds | peak RSS MB |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {r['seconds']:.3f} | {r['peak_rss_mb']:.0f} |" for name, r in rows],
        "",
        f"The {MAX_LENGTH} token ids kept are identical in all three cases: {same}.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    if not same:
        sys.exit("long_row: the cut changed the kept token ids")


if __name__ == "__main__":
    main()
