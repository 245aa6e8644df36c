"""Peak memory of the 8-bit frozen base against an fp32 base, on CPU, split by kind of page.

    .venv/bin/python -m benchmarks.int8_memory     # ~2 min; writes benchmarks/results/int8_memory.md

For MiniLM-L6 (top 2) and SmolLM2-135M (top 4), each in its own process: resident memory
after the imports, after ``load_for_tuning``, and after 3 forward+backward steps (batch 16
of 40 random tokens), as anonymous pages (heap: what the process owns) and file pages (the
memory-mapped checkpoint; reclaimable, but counted in RSS and peak RSS), and the peak (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r'''
import sys, json
def st():
    return {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status")
            if l.startswith(("RssAnon", "RssFile", "VmHWM"))}
out = {}
import torch, transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from edgeft.artifact import Task
from edgeft.models import resolve_model
from edgeft.tune.model import load_for_tuning
out["imports"] = st()
name, prec = sys.argv[1], sys.argv[2]
if prec == "int8":
    import bitsandbytes  # noqa: F401
    out["bitsandbytes imported"] = st()
cls = "minilm" in name
l = load_for_tuning(resolve_model(name), Task.classification if cls else Task.causal_lm, ["a", "b"] if cls else None,
                    2 if cls else 4, prec, "cpu")
out["loaded"] = st()
ids = torch.randint(1000, 5000, (16, 40))
for _ in range(3):
    y = l.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    y.float().mean().backward()
out["3 steps"] = st()
print(json.dumps(out))
'''


def main() -> None:
    rows = {}
    load = [os.getloadavg()[0]]
    for name in ("minilm-l6", "smollm2-135m-instruct"):
        for prec in ("fp32", "int8"):
            run = subprocess.run([sys.executable, "-c", CHILD, name, prec], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            rows[f"{name} {prec}"] = json.loads(run.stdout.strip().splitlines()[-1])
            load.append(os.getloadavg()[0])
    lines = [f"# 8-bit vs fp32 frozen base: CPU memory ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "Made by `python -m benchmarks.int8_memory` (each row its own process; MiB). Shared 2-core machine, "
             f"1-minute load average {load}.", "",
             "| model base | stage | anonymous | file-mapped | peak RSS (VmHWM) |", "|---|---|---|---|---|"]
    for key, stages in rows.items():
        for stage, s in stages.items():
            lines.append(f"| {key} | {stage} | {s['RssAnon']} | {s['RssFile']} | {s['VmHWM']} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "int8_memory.md").write_text(text)
    (ROOT / "benchmarks" / "results" / "int8_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
