"""Case ``scale_speed``: edgeft against llama.cpp at the sizes users run (0.5B-3B decoders), on CPU.

    python -m benchmarks.run --cases scale_speed            # the 0.5B and 1B shapes
    BENCH_SCALE_SHAPES=qwen2.5-0.5b,llama-3.2-1b,llama-3.2-3b python -m benchmarks.run --cases scale_speed
    BENCH_QUICK=1 BENCH_SCALE_SHAPES=tiny-llama python -m benchmarks.run --cases scale_speed   # a smoke run

Random-weight models of real shapes (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B: the ``scale`` case's
``random_model``, the vocabulary cut to 49,152) with the shipped SmolLM2 tokenizer put in the folder
(49,152 ids, a pre-tokenizer llama.cpp's converter knows), so every system starts from the same fp32
safetensors: edgeft exports them (``edgeft export``, ``--context-length 8192``), llama.cpp converts
them with its own ``convert_hf_to_gguf.py --outtype f32`` (the vendored sources of ``benchmarks.llamacpp``)
and quantizes that file with ``llama-quantize``. Pairs on the same grid family:

- edgeft int8 (``-q int8``: 8-bit symmetric blocks of 32) against llama.cpp Q8_0 (8-bit symmetric blocks of 32);
- edgeft int4-sym (``-q int4 --block-size 32 --int4-mode symmetric``: 4-bit symmetric blocks of 32, Q4_0's
  grid) and edgeft int4 (``--int4-mode zero-point``, edgeft's default: each block with a 4-bit integer zero
  point) against Q4_0 (4-bit symmetric blocks of 32) and Q4_K_M (llama.cpp's default).

Measured per system, in alternating rounds (every system once per round, the order rotated, each in a
fresh worker process; the 1-minute load average sampled before each): decode after a short prompt,
decode after ``BENCH_SCALE_DEPTH`` (4,096) tokens of context (edgeft: a prompt of that many ids, rate
after the first token; llama.cpp: ``llama-bench -d 4096``), prefill of 512 tokens, the share of the
bandwidth limit (read bandwidth / bytes of weights per token), bytes of weights and of the artifact,
and the export's wall time and peak RSS (``ru_maxrss`` of the export process: ``edgeft export``, or
``convert_hf_to_gguf.py`` then ``llama-quantize``).

``BENCH_SCALE_SYSTEMS`` (comma-separated system names, e.g. ``edgeft int8,llama.cpp Q8_0``) runs only those
(a 3B ``int8-dynamic`` export needs more memory than a 24 GiB machine has). Two systems run only when named
there: ``edgeft int8 kv8`` (``-q int8 --kv-cache int8``: the 8-bit KV cache) and ``llama.cpp Q8_0 kv8``
(the Q8_0 file with ``-ctk q8_0 -ctv q8_0 -fa 1``), the pair for decode at depth with 8-bit caches.

Each system keeps its own default KV cache: fp32 for edgeft, f16 for llama.cpp (``llama-bench``'s default
``-ctk f16``). At 4,096 tokens of context edgeft's cache therefore reads twice the bytes llama.cpp's does.
``results/2026-12-06-kv-cache-int8.md`` covers the 8-bit cache.

Quality on random weights is meaningless (every system predicts noise), so nothing here is gated on
it: the artifacts are exported with ``--allow-degraded`` and their gates are recorded only as facts.
The speed comparison is fair because both sides compute the same shapes on the same grids.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import prepare
from benchmarks.prepare import Unavailable

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "scale_speed"
REAL_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b")  # built by benchmarks.scale.random_model
# a smoke shape, built here in memory (a 2-layer, 256-wide llama with the real vocabulary)
TINY: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=True),
}
DEFAULT_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b")
VOCAB = 49152
CONTEXT = 8192  # the artifacts' context: room for the 4,096-token depth (a 128k cache would not fit memory)
DEPTH = 4096
PREFILL = 512
EDGEFT_SYSTEMS = {  # system -> edgeft export arguments
    "edgeft int8": ["-q", "int8", "--block-size", "32"],
    "edgeft int4": ["-q", "int4", "--block-size", "32", "--int4-mode", "zero-point"],
    "edgeft int4-sym": ["-q", "int4", "--block-size", "32", "--int4-mode", "symmetric"],
    # the integer-GEMM prompt path: per-channel int8 weights, int8 activations on a scale per row
    # (``DynamicQuantizeMatMul``: onnxruntime's u8s8 kernels, VNNI or AMX where the CPU has them)
    "edgeft int8-dynamic": ["-q", "int8", "--int8-mode", "dynamic"],
    "edgeft int8 kv8": ["-q", "int8", "--block-size", "32", "--kv-cache", "int8"],
}
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
# llama.cpp systems that reuse another's file with other llama-bench flags: system -> (type, flags)
LLAMA_VARIANTS = {"llama.cpp Q8_0 kv8": ("Q8_0", ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"])}
OPT_IN = ("edgeft int8 kv8", "llama.cpp Q8_0 kv8")  # run only when BENCH_SCALE_SYSTEMS names them
# (edgeft system, llama.cpp systems at the same bits): its ratio is against the fastest of them
PAIRS = (("edgeft int8", ("llama.cpp Q8_0",)), ("edgeft int4", ("llama.cpp Q4_0", "llama.cpp Q4_K_M")),
         ("edgeft int4-sym", ("llama.cpp Q4_0", "llama.cpp Q4_K_M")),
         ("edgeft int8-dynamic", ("llama.cpp Q8_0",)), ("edgeft int8 kv8", ("llama.cpp Q8_0 kv8",)))
# edgeft against itself: the integer-GEMM prompt path over today's weight-only int8 (goal: prefill >= 2x at
# unchanged decode on a VNNI or AMX CPU)
OWN_PAIRS = (("edgeft int8-dynamic", ("edgeft int8",)),)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def shapes(value: str | None = None) -> list[str]:
    """The shapes to run: ``value`` (else ``BENCH_SCALE_SHAPES``, else the 0.5B and 1B), names checked."""
    raw = value if value is not None else os.environ.get("BENCH_SCALE_SHAPES", ",".join(DEFAULT_SHAPES))
    names = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in names if s not in REAL_SHAPES and s not in TINY]
    if unknown or not names:
        raise Unavailable(f"BENCH_SCALE_SHAPES: unknown shape {', '.join(unknown) or '(none given)'}; "
                          f"known: {', '.join(REAL_SHAPES + tuple(TINY))}")
    return names


def wanted(system: str) -> bool:
    """Whether ``system`` runs: named in ``BENCH_SCALE_SYSTEMS`` when that is set, else every system but the
    opt-in ones."""
    raw = os.environ.get("BENCH_SCALE_SYSTEMS", "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return system in names if names else system not in OPT_IN


def ratios(decode: dict[str, float], pairs: tuple = PAIRS) -> dict[str, tuple[float, str]]:
    """Each edgeft system's figure over the best llama.cpp figure at the same bits: {edgeft system: (ratio, peer)}.

    ``decode`` maps system -> a higher-is-better figure (tokens/s); a pair with a side missing is left out."""
    out: dict[str, tuple[float, str]] = {}
    for mine, peers in pairs:
        have = [(decode[p], p) for p in peers if decode.get(p)]
        if decode.get(mine) and have:
            best, peer = max(have)
            out[mine] = (decode[mine] / best, peer)
    return out


def weights_bytes_per_token(path: Path) -> int | None:
    from benchmarks.weights import weight_bytes

    try:
        return weight_bytes(path)
    except Exception:  # noqa: BLE001 - a missing size only drops the share
        return None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- making the models and the artifacts (each in a worker: its peak RSS is its own) -------------

def _tiny_model(shape: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
                               **TINY[shape])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


def model_folder(shape: str, root: Path) -> Path:
    """The random-weight HF folder of ``shape`` with SmolLM2's tokenizer in it (cached under ``root``)."""
    folder = root / shape
    if (folder / ".tokenizer-smollm2").is_file():
        return folder
    prepare._may_make(f"random-weight model {shape}", folder)
    if shape in TINY:
        if not (folder / "config.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _tiny_model(shape, tmp)
            tmp.rename(folder)
    else:
        try:
            from benchmarks.scale import random_model  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise Unavailable("the real shapes are built by benchmarks/scale.py (the scale case), "
                              "which this tree does not have") from None
        random_model(shape, folder)
    smol = prepare.ensure_model(prepare.LM)
    for name in TOKENIZER_FILES:  # the shipped tokenizer replaces whatever the builder wrote
        (folder / name).unlink(missing_ok=True)
        if (smol / name).is_file() and name != "generation_config.json":
            shutil.copy(smol / name, folder / name)
    (folder / ".tokenizer-smollm2").write_text(f"{smol}\n")
    return folder


def _watched(cmds: list[list[str]], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmds`` one after another as children; wall seconds and the largest child's peak RSS."""
    import resource

    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        for cmd in cmds:
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=prepare.REPO, env=env)
            if res.returncode:
                tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} exited "
                                   f"{res.returncode}: {tail[:200]} (log: {log})")
    return {"seconds": time.perf_counter() - t0,
            "export_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _export_edgeft(spec: dict[str, Any]) -> dict[str, Any]:
    out = Path(spec["out"])
    cmd = [*prepare.edgeft_cmd(), "export", spec["model"], *spec["args"], "--out", str(out), "--overwrite",
           "--allow-degraded", "--context-length", str(CONTEXT), "--threads", str(spec["threads"])]
    got = _watched([cmd], Path(spec["log"]))
    return {**got, "bytes": _size(out), "command": " ".join(["edgeft", *cmd[len(prepare.edgeft_cmd()):]])}


def convert_deps() -> Path:
    """A folder with the converter's requirements the project's venv lacks (``sentencepiece``, imported by
    its Llama vocabulary code before it looks for a tokenizer.model), installed once with pip --target."""
    dest = prepare.WORK / "llama.cpp-convert-deps"
    if not (dest / "sentencepiece").is_dir():
        prepare.run_logged([sys.executable, "-m", "pip", "install", "-q", "--target", str(dest),
                            "sentencepiece>=0.1.98,<0.3.0"], prepare.WORK / "logs" / "convert-deps.log",
                           "pip install sentencepiece (llama.cpp's converter)")
    return dest


def _convert_gguf(spec: dict[str, Any]) -> dict[str, Any]:
    """``convert_hf_to_gguf.py --outtype f32``: the HF folder as an fp32 GGUF (once per shape)."""
    src, f32 = Path(spec["source"]), Path(spec["out"])
    f32.parent.mkdir(parents=True, exist_ok=True)
    # the converter's own gguf package (not the venv's), and what it imports that the project does not ship
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(convert_deps())])}
    got = _watched([[sys.executable, str(src / "convert_hf_to_gguf.py"), spec["model"], "--outtype", "f32",
                     "--outfile", str(f32) + ".partial"]], Path(spec["log"]), env)
    os.replace(str(f32) + ".partial", f32)
    return {**got, "bytes": _size(f32)}


def _quantize_gguf(spec: dict[str, Any]) -> dict[str, Any]:
    """``llama-quantize`` of the fp32 GGUF to the type."""
    out = Path(spec["out"])
    got = _watched([[str(Path(spec["bin"]) / "llama-quantize"), spec["f32"], str(out) + ".partial", spec["type"],
                     str(spec["threads"])]], Path(spec["log"]))
    os.replace(str(out) + ".partial", out)
    return {**got, "bytes": _size(out)}


# ---- timing one system (a worker each) ----------------------------------------------------------

def _edgeft_speed(spec: dict[str, Any]) -> dict[str, Any]:
    from edgeft import runtime
    from edgeft.bench import bench_generation, edgeft_runner, peak_rss_mib

    gen = runtime.load(spec["path"], threads=spec["threads"])
    run = edgeft_runner(gen)
    short, n = spec["short_prompt"], spec["new_tokens"]
    fig = bench_generation(run, short, {PREFILL: spec["prefill_prompt"]}, n, spec["repeats"])
    deep = bench_generation(run, spec["deep_prompt"], {}, n, spec["repeats"])
    return {"decode_tps": fig.decode_tps.median, "prefill_tps": fig.prefill_tps[PREFILL].median,
            "decode_deep_tps": deep.decode_tps.median, "system_peak_mib": peak_rss_mib(),
            "spin": getattr(gen, "spinning", None)}


def _llama_speed(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.peer_workers import _child_peak_mib

    base = [str(Path(spec["bin"]) / "llama-bench"), "-m", spec["path"], "-t", str(spec["threads"]),
            "-r", str(spec["repeats"]), "-o", "json", *spec.get("flags", [])]
    n = str(spec["new_tokens"])
    # two runs: prefill and decode from an empty context, then decode alone at depth (one run with
    # ``-d 0,DEPTH`` would also time a prefill at depth, which nothing here reports)
    rows: list[dict[str, Any]] = []
    cmds = [[*base, "-p", str(PREFILL), "-n", n, "-d", "0"], [*base, "-p", "0", "-n", n, "-d", str(spec["depth"])]]
    for cmd in cmds:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"llama-bench exited {res.returncode}: {res.stderr.strip()[-300:]}")
        rows += json.loads(res.stdout)
    return {**llama_rows(rows), "command": " ; ".join(" ".join(["llama-bench", *c[1:]]) for c in cmds),
            "system_peak_mib": _child_peak_mib()}


def llama_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``llama-bench -o json`` rows as this case's figures: decode from an empty context and at depth,
    prefill from an empty context (each the median of its repetitions' tokens/s)."""
    out: dict[str, float] = {}
    for r in rows:
        rate = statistics.median(float(x) for x in r["samples_ts"])
        depth = int(r.get("n_depth", 0))
        if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_deep_tps" if depth else "decode_tps"] = rate
        elif r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and depth == 0:
            out["prefill_tps"] = rate
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One step in a worker process of its own: ``model``, ``export``, ``convert``, ``quantize``, ``edgeft``
    or ``llama``."""
    step = spec["step"]
    if step == "model":
        folder = model_folder(spec["shape"], Path(spec["root"]))
        return {"folder": str(folder), "fp32_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}
    if step == "export":
        return _export_edgeft(spec)
    if step == "convert":
        return _convert_gguf(spec)
    if step == "quantize":
        return _quantize_gguf(spec)
    return (_edgeft_speed if step == "edgeft" else _llama_speed)(spec)


# ---- the case ------------------------------------------------------------------------------

def _prompts(n_short: int, depth: int) -> dict[str, list[int]]:
    from tokenizers import Tokenizer

    from edgeft.bench import DEFAULT_TEXT, prompt_ids

    tok = Tokenizer.from_file(str(prepare.ensure_model(prepare.LM) / "tokenizer.json"))
    text = (prepare.REPO / "demo" / "sonnets.txt").read_text()[:200000] or DEFAULT_TEXT
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    return {"short_prompt": prompt_ids(enc, text, n_short), "prefill_prompt": prompt_ids(enc, text, PREFILL),
            "deep_prompt": prompt_ids(enc, text, depth)}


def _made(ctx: Context, shape: str, system: str, marker: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """An export step, cached with its figures (in ``exports/``: an artifact folder holds only what its
    manifest lists); None when it failed (a skip)."""
    from benchmarks.cases import WorkerFailed

    facts = prepare.WORK / CASE / "exports" / f"{shape}-{system.replace(' ', '-')}.json"
    if marker.exists() and facts.is_file():
        return json.loads(facts.read_text())
    try:
        prepare._may_make(f"{shape} {system}", marker)
        got = ctx.measure(CASE, timeout=4 * 3600, **spec)
    except (WorkerFailed, Unavailable, subprocess.TimeoutExpired) as exc:
        ctx.res.skip(CASE, f"{shape} {system}", str(exc))
        return None
    facts.parent.mkdir(parents=True, exist_ok=True)
    facts.write_text(json.dumps(got))
    return got


def case(ctx: Context) -> None:
    from benchmarks import llamacpp
    from benchmarks.cases import WorkerFailed, record_gate
    from benchmarks.peer_case import _range
    from edgeft.bench import Stat, cpu_isa, isa_summary, summarize

    names = shapes()
    root = prepare.WORK / CASE
    depth = int(os.environ.get("BENCH_SCALE_DEPTH", DEPTH))
    rounds = int(os.environ.get("BENCH_ROUNDS", 1 if ctx.quick else 2))
    repeats = int(os.environ.get("BENCH_REPEATS", 1 if ctx.quick else 3))
    new_tokens = 16 if ctx.quick else 64
    prompts = _prompts(32, depth)
    load: list[float] = []
    try:
        source: Path | None = llamacpp.source_dir()
        bin_dir: Path | None = prepare.llama_bin()
    except (Unavailable, llamacpp.BuildFailed, OSError) as exc:
        source = bin_dir = None
        for t in GGUF_TYPES:
            ctx.res.skip(CASE, f"llama.cpp {t}", str(exc))
    for shape in names:
        try:
            model = Path(ctx.measure(CASE, timeout=3 * 3600, step="model", shape=shape, root=str(root))["folder"])
        except (WorkerFailed, Unavailable, subprocess.TimeoutExpired) as exc:
            ctx.res.skip(CASE, shape, str(exc))
            continue
        systems: list[dict[str, Any]] = []  # {system, step, path}
        for system, args in EDGEFT_SYSTEMS.items():
            if not wanted(system):
                continue
            out = root / "artifacts" / f"{shape}-{system.split()[-1]}"
            got = _made(ctx, shape, system, out / "manifest.json",
                        dict(step="export", model=str(model), args=args, out=str(out),
                             log=str(prepare.WORK / "logs" / f"{CASE}-export-{out.name}.log")))
            if got is not None:
                gate = record_gate(ctx, CASE, f"{shape} {system}", out)
                _export_rows(ctx, shape, system, got, f"`{got['command']}`; {gate} (meaningless on random weights)")
                systems.append({"system": system, "step": "edgeft", "path": str(out)})
        if source is not None and bin_dir is not None:
            systems += _gguf_systems(ctx, shape, model, root, source, bin_dir)
        per: dict[str, dict[str, list[float]]] = {s["system"]: {} for s in systems}
        bandwidth: list[float] = []
        failed: set[str] = set()
        for r in range(rounds):
            try:
                bandwidth.append(Stat.from_dict(ctx.spawn("bandwidth", repeats=3, mib=1024)["gbps"]).median)
            except (WorkerFailed, subprocess.TimeoutExpired) as exc:
                ctx.res.skip(CASE, "bandwidth", str(exc))
            k = r % max(1, len(systems))
            for s in systems[k:] + systems[:k]:
                if s["system"] in failed:
                    continue
                print(f"[{CASE}] {shape} round {r + 1}/{rounds}: {s['system']}", flush=True)
                load.append(os.getloadavg()[0])
                try:
                    got = ctx.measure(CASE, timeout=3 * 3600, step=s["step"], path=s["path"], bin=str(bin_dir),
                                      depth=depth, new_tokens=new_tokens, repeats=repeats,
                                      flags=s.get("flags", []), **prompts)
                except (WorkerFailed, subprocess.TimeoutExpired) as exc:
                    ctx.res.skip(CASE, f"{shape} {s['system']}", str(exc))
                    failed.add(s["system"])
                    continue
                for key in ("decode_tps", "decode_deep_tps", "prefill_tps", "system_peak_mib"):
                    if key in got:
                        per[s["system"]].setdefault(key, []).append(got[key])
        _speed_rows(ctx, shape, systems, per, bandwidth, depth, new_tokens, _range)
    isa = cpu_isa()
    ctx.res.notes.append(
        f"{CASE}: random weights of real shapes ({', '.join(names)}; vocabulary {VOCAB}, SmolLM2's tokenizer): "
        "quality on random weights is meaningless, so gates are recorded, not used; equal grids (8-bit blocks of "
        "32 against Q8_0, 4-bit blocks of 32 against Q4_0 and Q4_K_M; edgeft int4-sym's blocks are Q4_0's grid, edgeft "
        "int4's carry a 4-bit zero point as well) make the speed comparison fair. CPU: " + isa_summary(isa) + f"; {rounds} rounds, "
        "order rotated each round, a figure is the median of the round medians [their min-max]"
        + (f"; 1-minute load average {min(load):.2f}-{max(load):.2f} before the workers" if load else ""))
    if (llama := llamacpp.current()) is not None:
        ctx.res.notes.append(llamacpp.build_note(llama))
    if load:
        ctx.add(CASE, "machine", "load_1m", summarize(load), "load", higher=False)


def _gguf_systems(ctx: Context, shape: str, model: Path, root: Path, source: Path,
                  bin_dir: Path) -> list[dict[str, Any]]:
    """llama.cpp's files of ``shape`` (converted to an fp32 GGUF once, then quantized per type; the fp32 file
    is removed once every type wanted is made, and not converted again while they are there), their export
    rows, and the systems that time them."""
    types = {t: [v for v, (vt, _) in LLAMA_VARIANTS.items() if vt == t and wanted(v)] for t in GGUF_TYPES}
    types = {t: v for t, v in types.items() if wanted(f"llama.cpp {t}") or v}
    if not types:  # no llama.cpp system wanted: nothing to convert (an fp32 file nobody quantizes would stay)
        return []
    outs = {t: root / "gguf" / f"{shape}.{t}.gguf" for t in types}
    f32 = root / "gguf" / f"{shape}.F32.gguf"
    made = bool(outs) and all(o.exists() for o in outs.values())
    conv = _made(ctx, shape, "llama.cpp F32", next(iter(outs.values())) if made else f32,
                 dict(step="convert", model=str(model), source=str(source), out=str(f32),
                      log=str(prepare.WORK / "logs" / f"{CASE}-convert-{shape}.log")))
    systems: list[dict[str, Any]] = []
    for t, variants in types.items() if conv is not None else ():
        system, out = f"llama.cpp {t}", outs[t]
        got = _made(ctx, shape, system, out,
                    dict(step="quantize", bin=str(bin_dir), type=t, f32=str(f32), out=str(out),
                         log=str(prepare.WORK / "logs" / f"{CASE}-quantize-{out.name}.log")))
        if got is None or conv is None:
            continue
        whole = {"bytes": got["bytes"], "seconds": conv["seconds"] + got["seconds"],
                 "export_peak_rss_mib": max(conv["export_peak_rss_mib"], got["export_peak_rss_mib"])}
        note = (f"convert_hf_to_gguf.py --outtype f32 ({conv['seconds']:.0f} s, "
                f"{conv['export_peak_rss_mib']:.0f} MiB) then llama-quantize {t} ({got['seconds']:.0f} s, "
                f"{got['export_peak_rss_mib']:.0f} MiB): export time and peak are of both")
        _export_rows(ctx, shape, system, whole, note)
        if wanted(system):
            systems.append({"system": system, "step": "llama", "path": str(out)})
        systems += [{"system": v, "step": "llama", "path": str(out), "flags": LLAMA_VARIANTS[v][1]} for v in variants]
    if outs and all(o.exists() for o in outs.values()):
        f32.unlink(missing_ok=True)  # as large as the model: only the quantizer reads it
    return systems


def _export_rows(ctx: Context, shape: str, system: str, got: dict[str, Any], note: str) -> None:
    name = f"{shape} {system}"
    ctx.add(CASE, name, "artifact_mib", got["bytes"] / 2**20, "MiB", higher=False, note=note)
    ctx.add(CASE, name, "export_s", got["seconds"], "s", higher=False)
    ctx.add(CASE, name, "export_peak_rss_mib", got["export_peak_rss_mib"], "MiB", higher=False,
            note="ru_maxrss of the largest export process (the converter or the quantizer for GGUF)")


def _speed_rows(ctx: Context, shape: str, systems: list[dict[str, Any]], per: dict[str, dict[str, list[float]]],
                bandwidth: list[float], depth: int, new_tokens: int, rng: Any) -> None:
    from edgeft.bench import summarize

    medians: dict[str, dict[str, float]] = {}
    for s in systems:
        name, fig = s["system"], per[s["system"]]
        if not fig.get("decode_tps"):
            continue
        medians[name] = {k: summarize(v).median for k, v in fig.items()}
        full = f"{shape} {name}"
        ctx.add(CASE, full, "decode_tps", rng(fig["decode_tps"]), "tok/s", new_tokens=new_tokens, context=32)
        if fig.get("decode_deep_tps"):
            ctx.add(CASE, full, "decode_tps", rng(fig["decode_deep_tps"]), "tok/s", new_tokens=new_tokens,
                    context=depth)
        if fig.get("prefill_tps"):
            ctx.add(CASE, full, "prefill_tps", rng(fig["prefill_tps"]), "tok/s", prompt_tokens=PREFILL)
        ctx.add(CASE, full, "peak_mib", max(fig["system_peak_mib"]), "MiB", higher=False,
                note="the timing process's ru_maxrss (llama.cpp: llama-bench's)")
        nbytes = weights_bytes_per_token(Path(s["path"]))
        if nbytes:
            ctx.add(CASE, full, "weight_mib", nbytes / 2**20, "MiB/token", higher=False)
            if bandwidth:
                limit = summarize(bandwidth).median * 1e9 / nbytes
                ctx.add(CASE, full, "bandwidth_share", rng(fig["decode_tps"]).scaled(1 / limit), "share",
                        note=f"read bandwidth {summarize(bandwidth).median:.1f} GB/s over {nbytes / 2**20:.0f} MiB a token")
    for metric, key, params in (("decode_ratio", "decode_tps", {"context": 32}),
                                ("decode_ratio", "decode_deep_tps", {"context": depth}),
                                ("prefill_ratio", "prefill_tps", {"prompt_tokens": PREFILL})):
        for mine, (value, peer) in ratios({n: m.get(key, 0.0) for n, m in medians.items()}).items():
            ctx.add(CASE, f"{shape} {mine}", metric, value, "x", note=f"{shape} {mine} {metric} "
                    f"({', '.join(f'{k}={v}' for k, v in params.items())}): against {peer}, the faster at these bits",
                    **params)
        for mine, (value, peer) in ratios({n: m.get(key, 0.0) for n, m in medians.items()}, OWN_PAIRS).items():
            ctx.add(CASE, f"{shape} {mine}", f"{metric}_vs_weight_only", value, "x",
                    note=f"{shape} {mine} {metric} ({', '.join(f'{k}={v}' for k, v in params.items())}) over {peer}",
                    **params)
