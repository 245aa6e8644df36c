"""Case ``scale``: what the 8-bit frozen base saves at the sizes it is for (0.5B-3B), on CPU.

    python -m benchmarks.run --cases scale                 # 0.5B and 1B shapes, ~15 min on 2 cores
    BENCH_SCALE_SHAPES=qwen2.5-0.5b,llama-3.2-1b,llama-3.2-3b python -m benchmarks.run --cases scale

Random-weight models built from the real configs (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B), with the
vocabulary cut to 49,152 (SmolLM2's size; the real ones have 151,936 and 128,256) so the embeddings do not
dominate: the frozen blocks are what the 8-bit base is for. The checkpoint is written tensor by tensor
(normal(0, 0.02) matrices, unit norms, zero biases: what ``_init_weights`` gives), in 2 GB safetensors
shards, so a 3B model is made without holding it. The tokenizer is a byte-level BPE trained on the
sonnets (a few hundred tokens: the ids it gives are a subset of the model's vocabulary).

Each shape is tuned by ``edgeft tune -n 2 --max-steps 4 --max-length 256 --batch-size 4`` on the sonnets,
once over the 8-bit base (``--base-precision int8``: edgeft's int8 rows on CPU) and once over the fp32
base (``--base-precision fp32``), each in its own process; recorded is the process's peak RSS
(``ru_maxrss`` of the child) and its memory right after the model loaded (the ``loaded`` line of
``EDGEFT_MEM_TRACE``). The theoretical saving is the frozen blocks' bytes in fp32 minus int8 (one byte per
weight plus one fp32 scale per output row); goal: 8-bit peak <= fp32 peak - 0.7 x saving.
``BENCH_SCALE_STEPS=8`` tunes more steps for the seconds-per-step ratio (8-bit over fp32 base: the
steps after the first, wall time; goal <= 1.15, valid on a quiet machine only).
``BENCH_SCALE_SKIP_FP32=llama-3.2-3b`` leaves out the fp32 run of a shape that does not fit the machine.

The 8-bit run of each shape is then exported (``edgeft export RUN -o OUT -q SCHEME --allow-degraded``, the
schemes in ``BENCH_SCALE_EXPORT``, default ``int8,int4``; random weights may fail the gate, which is not what
is measured), each in its own process: its peak RSS (``ru_maxrss``), the sampled peak of each phase, and
the scratch disk (the largest size of the export's ``.OUT.work-*`` folder seen), each also as a ratio to
the model's fp32 bytes. Goals: peak <= 1.3x and scratch <= 1.5x the fp32 bytes.
``BENCH_SCALE_EXPORT=`` (empty) leaves the exports out. ``BENCH_SCALE_TUNE=`` (empty; default ``int8,fp32``)
leaves the tune rows out: the exports then read the 8-bit run an earlier run left in the work folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "scale"
VOCAB = 49152
SHARD = 2 * 10**9
# the real configs, vocabulary cut to VOCAB (see the module docstring)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                         rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
    "llama-3.2-3b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                         rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
}
TUNE_ARGS = ["-n", "2", "--max-steps", "4", "--max-length", "256", "--batch-size", "4"]
EXPORT_GOALS = {"peak": 1.3, "scratch": 1.5}  # x the model's fp32 bytes
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _config(shape: str) -> Any:
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    return AutoConfig.for_model(kind, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                                torch_dtype="float32", **spec)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((prepare.REPO / "demo" / "sonnets.txt").read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[0])
    fast.save_pretrained(folder)


def random_model(shape: str, folder: Path) -> Path:
    """A random-weight checkpoint of ``shape`` in ``folder``, written one tensor at a time (cached)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    cfg = _config(shape)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # a tied head is saved as the embeddings
    names = [n for n, _ in meta.named_parameters() if n not in tied]
    shapes = dict(meta.state_dict()) | dict(meta.named_parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, tmp / files[-1], metadata={"format": "pt"})
            weight_map.update({k: files[-1] for k in shard})
            shard.clear()

    for name in names:
        size = tuple(shapes[name].shape)
        if name.endswith("norm.weight"):
            t = torch.ones(size)
        elif name.endswith(".bias"):
            t = torch.zeros(size)
        else:
            t = torch.empty(size).normal_(0.0, 0.02, generator=gen)
        if sum(v.numel() * 4 for v in shard.values()) + t.numel() * 4 > SHARD:
            flush()
        shard[name] = t
    flush()
    total = sum(shapes[n].numel() * 4 for n in names)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    _tokenizer(tmp)
    tmp.rename(folder)
    return folder


# ---- one process watched: peak RSS, by phase, and scratch disk ---------------------------

def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS")), 0)
    except OSError:
        return 0


def _tree_bytes(folder: Path, pattern: str) -> int:
    total = 0
    for top in folder.glob(pattern):
        for p in [top] if top.is_file() else top.rglob("*"):
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:
                pass
    return total


def watch(cmd: list[str], scratch: tuple[Path, str] | None = None, env: dict[str, str] | None = None,
          interval: float = 0.25) -> dict[str, Any]:
    """Run ``cmd`` in a child; its peak RSS (its own ``ru_maxrss`` from ``wait4``, or the sampled peak where larger: ``RUSAGE_CHILDREN`` is the
    largest of every child the process ever waited for, which read 356 MiB in a suite worker), the sampled
    peak of each phase (a phase starts at a stderr line), and the largest bytes under ``scratch`` (folder,
    glob) seen while it ran."""
    import os
    import subprocess
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    phases: list[dict[str, Any]] = [{"phase": "start", "peak_rss_mib": 0.0}]
    lines: list[str] = []
    scratch_peak = [0]

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            text = line.strip()
            if text and not text.startswith(("gate: PyTorch", "gate: artifact")) and "%|" not in text:
                phases.append({"phase": text[:120], "peak_rss_mib": 0.0})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage, once it has ended
        if pid:
            break
        rss = _rss(proc.pid) / 2**20
        phases[-1]["peak_rss_mib"] = max(phases[-1]["peak_rss_mib"], round(rss, 1))
        if scratch is not None:
            scratch_peak[0] = max(scratch_peak[0], _tree_bytes(*scratch))
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    # ru_maxrss (KiB on Linux), or the sampled peak where that is larger: in a suite worker wait4 read less than
    # the sampled RSS of the same child (1,885 against 3,491 MiB for a tune, 353 for exports of 2-5 GiB)
    peak = max([usage.ru_maxrss / 1024, *(p["peak_rss_mib"] for p in phases)])
    # ``child_peak_mib`` too: a suite worker sets its result's ``peak_rss_mib`` to the larger of its own peak
    # and that key, so without it the worker's own (~354 MiB) replaced this figure
    return {"rc": proc.returncode, "peak_rss_mib": round(peak, 1), "child_peak_mib": round(peak, 1),
            "phases": [p for p in phases if p["peak_rss_mib"]],
            "scratch_peak_mb": round(scratch_peak[0] / 1e6, 1), "tail": lines[-5:]}


# ---- the case ------------------------------------------------------------------------------

def frozen_saving(shape: str, trained: int = 2) -> dict[str, int]:
    """Bytes of the frozen blocks' Linear weights in fp32 and as int8 rows (+ an fp32 scale per row)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = _config(shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    fp32 = int8 = 0
    for i, block in enumerate(model.model.layers):
        if i >= cfg.num_hidden_layers - trained:
            continue
        for m in block.modules():
            if isinstance(m, __import__("torch").nn.Linear):
                fp32 += m.weight.numel() * 4
                int8 += m.weight.numel() + m.out_features * 4
    return {"fp32": fp32, "int8": int8, "saving": fp32 - int8}


def fp32_bytes(folder: Path) -> int:
    """The model's weights in fp32 bytes (``random_model`` records them as the index's ``total_size``)."""
    return int(json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"])


def export_cmd(run: Path, out: Path, scheme: str) -> list[str]:
    return [*prepare.edgeft_cmd(), "export", str(run), "-o", str(out), "-q", scheme, "--overwrite",
            "--allow-degraded", "--no-progress"]


def measure_export(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``edgeft export`` of a shape's 8-bit run, watched: peak RSS, by phase, and the work folder's size."""
    import os
    import shutil

    models = Path(spec["models"])
    out = models / f"export-{spec['shape']}-{spec['scheme']}"
    # the 8-bit run (the case), or the base itself (``source="base"``: the same export without the merge)
    run = models / (spec["shape"] if spec.get("source") == "base" else f"run-{spec['shape']}-int8")
    cmd = export_cmd(run, out, spec["scheme"])
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    got = watch(cmd, scratch=(out.parent, f".{out.name}.work-*"), env=env)
    got["command"] = " ".join(["edgeft", *cmd[len(prepare.edgeft_cmd()):]])
    got["load_1m"] = os.getloadavg()[0]
    got["fp32_bytes"] = fp32_bytes(models / spec["shape"])
    got["artifact_mb"] = round(_tree_bytes(out.parent, out.name) / 1e6, 1)
    shutil.rmtree(out, ignore_errors=True)  # the disk is the next run's
    return got


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``edgeft tune`` of a shape over one base, watched (in a worker process of its own); with
    ``step="export"``, one export of its 8-bit run (``measure_export``)."""
    import os

    if spec.get("step") == "export":
        return measure_export(spec)
    folder = random_model(spec["shape"], Path(spec["models"]) / spec["shape"])
    out = Path(spec["models"]) / f"run-{spec['shape']}-{spec['precision']}"
    cmd = [*prepare.edgeft_cmd(), "tune", "-m", str(folder), "-d", str(prepare.REPO / "demo" / "sonnets.txt"),
           "-o", str(out), "--overwrite", "--no-progress", *TUNE_ARGS, "--base-precision", spec["precision"]]
    if os.environ.get("BENCH_SCALE_STEPS"):  # more steps for the seconds-per-step figure
        cmd[cmd.index("--max-steps") + 1] = os.environ["BENCH_SCALE_STEPS"]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    got = watch(cmd, env=env)
    got["command"] = " ".join(["edgeft", *cmd[len(prepare.edgeft_cmd()):]])
    got["load_1m"] = os.getloadavg()[0]
    got["step_seconds"] = step_seconds(out / "log.jsonl")
    return got


def step_seconds(log: Path) -> list[float]:
    """Wall seconds of each training step after the first (the first builds caches) from a run's ``log.jsonl``."""
    if not log.is_file():
        return []
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e["seconds"] for e in steps if "seconds" in e and "eval" not in e][1:]


def export_schemes() -> list[str]:
    import os

    return [s for s in os.environ.get("BENCH_SCALE_EXPORT", "int8,int4").split(",") if s]


def _export_rows(ctx: Context, shape: str, models: Path, load: list[float]) -> None:
    """Export the shape's 8-bit run once per scheme; peak RSS and scratch, as MiB/MB and x the fp32 bytes."""
    for scheme in export_schemes():
        system = f"{shape} export -q {scheme}"
        got = ctx.measure("scale", timeout=7200, step="export", shape=shape, scheme=scheme, models=str(models))
        load.append(got["load_1m"])
        fp32 = got["fp32_bytes"]
        note = f"`{got['command']}` (exit {got['rc']}); the model's fp32 bytes: {fp32 / 1e6:,.0f} MB"
        ctx.add(CASE, system, "export_peak_rss_mib", got["peak_rss_mib"], "MiB", higher=False, note=note)
        ctx.add(CASE, system, "export_peak_x_fp32", got["peak_rss_mib"] * 2**20 / fp32, "x", higher=False,
                note=f"peak RSS / fp32 bytes; goal <= {EXPORT_GOALS['peak']}")
        ctx.add(CASE, system, "export_scratch_mb", got["scratch_peak_mb"], "MB", higher=False,
                note="largest .OUT.work-* folder seen (sampled every 0.25 s)")
        ctx.add(CASE, system, "export_scratch_x_fp32", got["scratch_peak_mb"] * 1e6 / fp32, "x", higher=False,
                note=f"scratch / fp32 bytes; goal <= {EXPORT_GOALS['scratch']}")
        for p in got["phases"]:
            ctx.add(CASE, system, "phase_peak_rss_mib", p["peak_rss_mib"], "MiB", higher=False,
                    phase=p["phase"], note="sampled every 0.25 s from the stderr line that starts it")


def tune_precisions() -> list[str]:
    import os

    return [s for s in os.environ.get("BENCH_SCALE_TUNE", "int8,fp32").split(",") if s]


def shapes() -> list[str]:
    import os

    return [s for s in os.environ.get("BENCH_SCALE_SHAPES", "qwen2.5-0.5b,llama-3.2-1b").split(",") if s]


def case(ctx: Context) -> None:
    import os

    from edgeft.bench import summarize

    skip_fp32 = set(os.environ.get("BENCH_SCALE_SKIP_FP32", "").split(","))
    models = prepare.WORK / "scale"
    load = [os.getloadavg()[0]]
    for shape in shapes():
        theory = frozen_saving(shape)
        ctx.add(CASE, shape, "theoretical_saving_mib", theory["saving"] / 2**20, "MiB", higher=True,
                note="frozen blocks' Linear weights: fp32 bytes minus int8 rows and fp32 row scales")
        peaks: dict[str, float] = {}
        steps: dict[str, list[float]] = {}
        for prec in tune_precisions():
            system = f"{shape} {prec} base"
            if prec == "fp32" and shape in skip_fp32:
                ctx.res.skip(CASE, system, "BENCH_SCALE_SKIP_FP32: does not fit this machine's memory")
                continue
            got = ctx.measure("scale", timeout=7200, shape=shape, precision=prec, models=str(models))
            load.append(got["load_1m"])
            if got["rc"]:
                ctx.res.skip(CASE, system, f"edgeft tune exited {got['rc']}: {(got['tail'] or ['?'])[-1][:200]}")
                continue
            peaks[prec] = got["peak_rss_mib"]
            if got.get("step_seconds"):
                steps.setdefault(prec, []).extend(got["step_seconds"])
                ctx.add(CASE, system, "step_s", summarize(got["step_seconds"]), "s", higher=False,
                        note=f"wall seconds per training step after the first; 1-minute load {got['load_1m']:.2f}")
            ctx.add(CASE, system, "peak_rss_mib", got["peak_rss_mib"], "MiB", higher=False,
                    note=f"peak RSS (ru_maxrss or the 0.25 s samples, the larger) of `{got['command']}`")
            for p in got["phases"]:
                ctx.add(CASE, system, "phase_peak_rss_mib", p["peak_rss_mib"], "MiB", higher=False,
                        phase=p["phase"], note="sampled every 0.25 s from the stderr line that starts it")
        if "int8" in peaks or ("int8" not in tune_precisions() and (models / f"run-{shape}-int8").is_dir()):
            _export_rows(ctx, shape, models, load)
        if len(peaks) == 2:
            saved = peaks["fp32"] - peaks["int8"]
            ctx.add(CASE, shape, "saving_share_of_theory", saved / (theory["saving"] / 2**20), "share", higher=True,
                    note="(fp32 peak - int8 peak) / theoretical saving; goal >= 0.7")
        if len(steps) == 2:
            ctx.add(CASE, shape, "step_ratio_int8_over_fp32", summarize(steps["int8"]).median
                    / summarize(steps["fp32"]).median, "x", higher=False,
                    note="median seconds per step, 8-bit base over fp32 base; goal <= 1.15 (measure on a quiet machine)")
    ctx.add(CASE, "machine", "load_1m", summarize(load), "load", higher=False)

