"""Case ``gpu_tuning``: the CUDA tuning path, run for real on a GPU machine (a few minutes); skipped without CUDA.

Here (with the models pulled):   .venv/bin/python -m benchmarks.gpu_tuning
    copies both models' config and tokenizer files (no weights) into ``benchmarks/.gpu-carry/``
    (``$BENCH_GPU_CARRY``) and downloads the bitsandbytes 0.50.2 wheel there (~43 MB; a device
    machine's carry limit is 64 MiB).
There (CUDA, no network):        python -m benchmarks.run --cases gpu_tuning --out $OUT
    in a worker (``measure``): installs the carried wheel (--no-deps) unless bitsandbytes is
    there, builds SmolLM2-135M and MiniLM-L6 from the real configs with random weights (the same
    memory and speed as the real ones; real weights do not fit the carry), and tunes each with
    ``edgeft tune`` on the demo data: top-N over the LLM.int8 base (bf16 autocast, 8-bit AdamW),
    then full fine-tuning (fp32, every block and the embeddings), then top-N over int8 with the
    frozen cache off and on (3 epochs). Recorded: peak ``torch.cuda.max_memory_allocated``,
    examples/s (tokens/s), the eval metric, and the cache's later-epoch speed-up.

Random weights: the eval metric says only that the loop runs end to end; memory and speed are
what this case measures. Without a CUDA device the case is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import prepare as prep

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "gpu_tuning"
ROOT = prep.REPO
CARRY = Path(os.environ.get("BENCH_GPU_CARRY", ROOT / "benchmarks" / ".gpu-carry"))
MODELS = {"smollm2-135m-instruct": ("sonnets", 4), "minilm-l6": ("sst2", 2)}
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "chat_template.jinja", "generation_config.json")
METRICS = {"peak_cuda_mb": ("MB", False), "examples_per_s": ("examples/s", True), "tokens_per_s": ("tok/s", True),
           "metric": ("accuracy or ppl (random weights)", True), "wall_s": ("s", False)}


def prepare_carry(carry: Path = CARRY) -> None:
    """Here: the models' configs and tokenizers, and the bitsandbytes wheel, for a machine with no network."""
    for name in MODELS:
        src, dst = prep.ensure_model(name), carry / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, dst / f)
    subprocess.run([sys.executable, "-m", "pip", "download", "bitsandbytes==0.50.2", "--no-deps",
                    "--only-binary", ":all:", "-d", str(carry)], check=True)
    print(f"carry {carry} ({sum(p.stat().st_size for p in carry.rglob('*') if p.is_file()) / 2**20:.1f} MiB)")


def have_cuda() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _random_model(carry: Path, name: str, folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(carry / name)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if name.startswith("smollm2") else AutoModel
    with torch.device("cuda"):
        model = cls.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    for f in FILES:
        if f != "config.json" and (carry / name / f).is_file():
            shutil.copy2(carry / name / f, folder / f)
    del model
    torch.cuda.empty_cache()
    return folder


def _data(kind: str, folder: Path) -> Path:
    if kind == "sst2":
        path = folder / "sst2.csv"
        rows = (ROOT / "demo" / "sst2_2k.csv").read_text().splitlines()
        path.write_text("\n".join(rows[:1201]) + "\n")
    else:
        path = folder / "sonnets.txt"
        path.write_text((ROOT / "demo" / "sonnets.txt").read_text())
    return path


def _tune(model: Path, data: Path, out: Path, **kw) -> dict:
    import torch

    from edgeft.tune import TuneConfig, tune

    torch.cuda.reset_peak_memory_stats()
    cfg = TuneConfig(model=str(model), data=data, out=out, device="cuda", progress=False, overwrite=True,
                     eval_every=10**6, warmup=0, **kw)
    t = time.perf_counter()
    folder = tune(cfg)
    m = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if '"seconds"' in x]
    per = max(1, m["steps"] // max(1, int(kw.get("epochs", 1))))
    epochs = [round(sum(e["seconds"] for e in log[k:k + per]), 3) for k in range(0, len(log), per)]
    after = m["after"] or {}
    return {"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "examples_per_s": m.get("examples_per_s"), "tokens_per_s": m.get("tokens_per_s"),
            "metric": after.get("accuracy", after.get("perplexity")), "epoch_seconds": epochs,
            "frozen_cache": m.get("frozen_cache"), "wall_s": round(time.perf_counter() - t, 1)}


def measure(spec: dict) -> dict:
    """Every model and variant, in this (worker) process on the CUDA device."""
    import glob

    carry = Path(spec["carry"])
    if not prep.have_module("bitsandbytes"):
        wheels = glob.glob(str(carry / "bitsandbytes-*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wheels], check=True)
    import torch

    import edgeft.tune.train as T

    if not prep.have_module("matplotlib"):
        T.plot_loss = lambda log, path: None  # the loss plot needs matplotlib; this case measures no plot
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "edgeft-gpu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    for name, (kind, n) in MODELS.items():
        model = _random_model(carry, name, work / name)
        data = _data(kind, work)
        flags = {"max_length": 128, "batch_size": 16}
        blocks = json.loads((carry / name / "config.json").read_text())["num_hidden_layers"]
        rows = {
            "top-int8": _tune(model, data, work / "a", trainable_layers=n, base_precision="int8",
                              optimizer="adamw8bit", max_steps=60, frozen_cache="off", **flags),
            "full-fp32": _tune(model, data, work / "b", trainable_layers=blocks, base_precision="fp32",
                               train_embeddings=True, max_steps=60,
                               frozen_cache="off", **flags),
            "top-int8-3ep-cache-off": _tune(model, data, work / "c", trainable_layers=n, epochs=3,
                                            frozen_cache="off", **flags),
            "top-int8-3ep-cache-on": _tune(model, data, work / "d", trainable_layers=n, epochs=3,
                                           frozen_cache="on", **flags),
        }
        report["results"][name] = rows
    return report


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed

    if not have_cuda():
        raise prep.Unavailable("needs a CUDA device (torch.cuda.is_available() is False here); run it on a GPU "
                               "machine: python -m benchmarks.gpu_tuning here, then python -m benchmarks.run "
                               "--cases gpu_tuning there")
    if not (CARRY / "smollm2-135m-instruct" / "config.json").is_file():
        prepare_carry()
    try:
        r = ctx.measure(CASE, timeout=3600, carry=str(CARRY))
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prep.Unavailable(str(exc)) from None
    for name, rows in r["results"].items():
        for variant, fig in rows.items():
            system = f"{name} {variant}"
            for metric, (unit, higher) in METRICS.items():
                if fig.get(metric) is not None:
                    ctx.add(CASE, system, metric, fig[metric], unit, higher=higher,
                            note=f"{CASE}: {r['device']}, torch {r['torch']}; random weights from the real configs")
        off, on = rows["top-int8-3ep-cache-off"]["epoch_seconds"], rows["top-int8-3ep-cache-on"]["epoch_seconds"]
        ctx.add(CASE, f"{name} frozen cache", "later_epoch_speedup", sum(off[1:]) / max(sum(on[1:]), 1e-9), "x")


if __name__ == "__main__":  # the one step that cannot be a case: it runs here, for the GPU machine
    prepare_carry()
