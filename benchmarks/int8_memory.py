"""Case ``int8_memory``: peak memory of the 8-bit frozen base against an fp32 base, on CPU, split by kind of page.

    python -m benchmarks.run --cases int8_memory     # ~2 min

For MiniLM-L6 (top 2) and SmolLM2-135M (top 4), each in its own process: resident memory
after the imports, after ``load_for_tuning``, and after 3 forward+backward steps (batch 16
of 40 random tokens), as anonymous pages (heap: what the process owns) and file pages (the
memory-mapped checkpoint; reclaimable, but counted in RSS and peak RSS), and the peak (VmHWM).
On CPU the int8 base is edgeft's own (``edgeft.tune.int8``), which never imports bitsandbytes.
The runs of the script this case replaces are kept as written: ``results/int8_memory.{json,md}``
(its last run, with an AdamW step and the bitsandbytes loader for reference, made at commit 1602344 of
branch ddp-mem).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from benchmarks import prepare
from edgeft.bench import summarize

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "int8_memory"
MODELS = ("minilm-l6", "smollm2-135m-instruct")
KINDS = {"RssAnon": "anon_mib", "RssFile": "file_mib", "VmHWM": "peak_mib"}  # /proc/self/status -> metric
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


def case(ctx: Context) -> None:
    load = [os.getloadavg()[0]]
    for name in MODELS:
        try:
            path = prepare.ensure_model(name)
        except prepare.Unavailable as exc:
            ctx.res.skip(CASE, name, str(exc))
            continue
        for prec in ("fp32", "int8"):
            system = f"{name} {prec} base"
            run = subprocess.run([sys.executable, "-c", CHILD, str(path), prec], capture_output=True, text=True,
                                 cwd=prepare.REPO, env={**os.environ, "OMP_NUM_THREADS": str(ctx.threads)})
            load.append(os.getloadavg()[0])
            if run.returncode:
                ctx.res.skip(CASE, system, f"exited {run.returncode}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            stages = json.loads(run.stdout.strip().splitlines()[-1])
            for stage, figures in stages.items():
                for key, metric in KINDS.items():
                    ctx.add(CASE, system, metric, figures[key], "MiB", higher=False, stage=stage,
                            note="int8_memory: each row its own process; anonymous pages (heap), file-mapped pages "
                                 "(the memory-mapped checkpoint) and the peak (VmHWM) after each stage")
    ctx.add(CASE, "machine", "load_1m", summarize(load), "load", higher=False)
