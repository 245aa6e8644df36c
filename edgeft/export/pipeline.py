"""``export(config)``: source -> merged fp32 model -> ONNX graph -> quantized candidates -> gate -> artifact.

Every candidate (one scheme, or several for ``auto`` and for classifier int8) is a
complete artifact folder in a work folder beside the destination, opened by edgeft's
own runtime for the gate. The one kept is moved into place atomically; when the gate
fails nothing is written (unless ``allow_degraded``) and the error names what failed.
This module orchestrates; the steps live in ``merge``, ``decoder``, ``classifier``,
``quantize``, ``assemble`` and ``gate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.artifact import MANIFEST, Gate, Int4Grid, Manifest, Quantization, Task, write_manifest
from edgeft.errors import EdgeftError
from edgeft.export import assemble, gate, quantize, smooth, trunk
from edgeft.export.config import AUTO_ORDER, ExportConfig, Int8Mode, KVCache, Quantize
from edgeft.fsutil import atomic_dir, check_destination, check_space, out_of_space, refuse_overlap

if TYPE_CHECKING:
    from edgeft.artifact import Embedding
    from edgeft.export.classifier import ClassifierGraph
    from edgeft.export.decoder import DecoderGraph
    from edgeft.export.merge import Source

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Candidate:
    """One complete artifact folder in the work folder, built on demand, then gated."""

    name: str  # "int8", "int4", "mixed", "none", "int8-dynamic", "int8-weight-only"
    build: Callable[[], tuple[Path, Manifest]]
    folder: Path | None = None
    manifest: Manifest | None = None
    result: gate.GateResult | None = None
    why: str = ""  # why it was chosen, once it is (recorded in the manifest's gate section)
    note: str = ""  # what the candidate is, said beside ``why`` (searched: the sensitivity pass's choice)
    retry: Callable[[gate.GateResult], Candidate | None] | None = None  # a narrower try after a failed gate
    chosen4: list[str] = field(default_factory=list)  # searched: the groups it put at 4 bits

    def ensure_built(self) -> Candidate:
        if self.folder is None:
            self.folder, self.manifest = self.build()
        return self


@dataclass
class Plan:
    """What one export is working with once its graph exists: the source, the fp32 graph, the
    tokenizer, and the candidates built from them, smallest first. Made by ``_decoder_plan``,
    ``_classifier_plan`` or ``_embedding_plan``; the gate changes only the candidates' results."""

    config: ExportConfig
    source: Source
    graph: DecoderGraph | ClassifierGraph
    tokenizer: Any  # the Hugging Face tokenizer (its files ship in every candidate)
    candidates: list[Candidate]
    max_length: int | None = None  # encoders: tokens per text
    embedding: Embedding | None = None  # embedding models: what the manifest says of the vectors


@dataclass(frozen=True)
class Gated:
    """What the gate measured: the candidate it chose (None: none passed), the eval texts, the reference."""

    chosen: Candidate | None
    evals: gate.EvalSet
    reference: gate.Reference


def export(config: ExportConfig, log: Log | None = _stderr) -> Path:
    """Write the artifact for ``config`` at ``config.out`` (atomically) and return its path."""
    log = log or (lambda _msg: None)
    _check_paths(config)
    check_destination(config.out, config.overwrite)
    _check_scheme(config)
    if config.sign_key:  # a bad key fails now, not after the gate
        from edgeft.signing import load_private_key

        load_private_key(config.sign_key)
    sweep_work_folders(config.out, log)
    need = Need()
    try:
        with _work_folder(config.out) as work, _sigterm_aborts():
            return _export(config, work, log, need)
    except EdgeftError:
        raise
    except Exception as exc:
        full = out_of_space(exc, config.out.parent, f"the export of {config.out}", need.bytes or None)
        if full is not None:
            raise EdgeftError(f"{full}: nothing was written") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise EdgeftError(f"cannot write beside {config.out}: {exc.strerror}") from None
        raise


# ---------------------------------------------------------------- the work folder, signals, the disk

@dataclass
class Need:
    """What the export expects to write, in bytes (0 until the source is loaded): for a full disk's message."""

    bytes: int = 0


class Aborted(EdgeftError):
    """SIGTERM during an export: the work folder is removed on the way out, nothing is written."""

    exit_code = 143


def _owner() -> str:
    """Who made a work folder: this host and process (a rerun removes the folders of processes that are gone)."""
    return f"{socket.gethostname().replace('-', '_') or 'host'}-{os.getpid()}"


@contextlib.contextmanager
def _work_folder(out: Path) -> Iterator[Path]:
    """``.OUT.work-HOST-PID-XXXX`` beside ``out`` (the same disk, so the artifact moves into place), removed
    on the way out whatever happens; ``sweep_work_folders`` removes one whose process was killed."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-{_owner()}-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_work_folders(out: Path, log: Log) -> list[Path]:
    """Remove the work folders an interrupted export of ``out`` left (killed: no ``finally`` ran).

    A folder is left alone while the process that made it (on this host) still runs; one made by
    another host is left alone too. A folder of an edgeft before work folders named their owner is
    removed."""
    host = _owner().rsplit("-", 1)[0]
    removed = []
    for folder in Path(out).parent.glob(f".{glob.escape(Path(out).name)}.work-*"):
        owner = folder.name[len(f".{Path(out).name}.work-"):].rsplit("-", 2)
        if len(owner) == 3 and owner[1].isdigit() and (owner[0] != host or _alive(int(owner[1]))):
            continue
        size = assemble.folder_size(folder) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        log(f"removed {folder.name} ({size / 1e6:.1f} MB), left by an interrupted export")
        removed.append(folder)
    return removed


@contextlib.contextmanager
def _sigterm_aborts() -> Iterator[None]:
    """SIGTERM raises ``Aborted`` (in the main thread), so the work folder goes as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Aborted("export stopped by SIGTERM: nothing was written (its work folder is removed)")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# Bytes per weight of each scheme's artifact, about (scales and the fp32 norms included).
SCHEME_BYTES = {Quantize.none: 4.0, Quantize.int8: 1.1, Quantize.mixed: 0.9, Quantize.searched: 0.9,
                Quantize.int4: 0.6, Quantize.auto: 0.6}


def work_bytes(config: ExportConfig, params: int) -> int:
    """About what an export of ``params`` weights writes before its first gate: the fp32 ONNX graph and the
    first (smallest) candidate (the Hugging Face folder beside them holds configs and tokenizer files only)."""
    return int(params * (4 + SCHEME_BYTES[config.quantize]))


def _unseal(c: Candidate) -> None:
    """A gated candidate keeps no manifest: only the published artifact (its manifest written with the
    gate's record) verifies; the candidate's manifest stays in memory (``c.manifest``)."""
    if c.folder is not None:
        (c.folder / MANIFEST).unlink(missing_ok=True)


def _check_paths(config: ExportConfig) -> None:
    """Before anything is read or deleted: a local source that is not there is a local error (no hub
    attempt), and --out may not be, hold or lie inside what the export reads."""
    source = Path(str(config.source)).expanduser()
    if not source.exists() and looks_local(str(config.source)):
        raise EdgeftError(f"{config.source} does not exist (no such run folder or model folder)")
    for name, path in (("the source", source if source.exists() else None), ("--eval-data", config.eval_data),
                       ("--sign", config.sign_key)):
        if path is not None:
            refuse_overlap(config.out, path, "--out", name)


def looks_local(source: str) -> bool:
    """A source meant as a local path rather than a hub id (org/name): it starts with . / or ~, has more
    than one separator or a trailing one, or its first part is a folder here (``runs/missing``)."""
    parts = source.replace("\\", "/").split("/")
    return (source.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and not parts[1])
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _check_scheme(config: ExportConfig) -> None:
    narrow = (Quantize.int4, Quantize.mixed, Quantize.searched)
    if config.task in (Task.classification, Task.embedding) and config.quantize in narrow:
        kind = "classifiers" if config.task is Task.classification else "embedding models"
        raise EdgeftError(f"{kind} export as none, int8 or auto (int4, mixed and searched are for decoders)")
    if (config.task is Task.causal_lm and config.int8_mode is Int8Mode.dynamic
            and config.quantize not in (Quantize.int8, Quantize.auto)):
        raise EdgeftError(f"--int8-mode dynamic applies to the int8 scheme (--quantize int8 or auto), "
                          f"not --quantize {config.quantize.value}")
    if config.kv_cache is KVCache.int8 and config.task in (Task.classification, Task.embedding):
        raise EdgeftError("--kv-cache int8 applies to decoders; an encoder keeps no KV cache")
    if config.trunk_blocks and config.task is Task.embedding:
        raise EdgeftError("--trunk-blocks splits classifiers and decoders; an embedding model exports as one graph")
    if config.int4_mode is Int4Grid.float_offset:
        what = None
        if config.quantize not in (*narrow, Quantize.auto):
            what = f"--quantize {config.quantize.value}"
        elif config.task is not None and config.task is not Task.causal_lm:
            what = f"a {config.task.value} model"
        if what:
            raise EdgeftError(f"--int4-mode float-offset applies to a decoder's 4-bit blocks (--quantize int4, mixed, "
                              f"searched or auto), not {what}")
    if config.task is Task.causal_lm and config.int8_mode is Int8Mode.dynamic and not config.int8_activations:
        raise EdgeftError("--int8-mode dynamic computes on int8 activations: drop --fp32-activations, or use "
                          "--int8-mode weight-only")


def _export(config: ExportConfig, work: Path, log: Log, need: Need) -> Path:
    from edgeft.export.merge import load_source, save_hf_configs

    t0 = time.perf_counter()
    log(f"loading {config.source}")
    source = load_source(config)
    _check_scheme(dataclasses.replace(config, task=source.task))
    route = _check_architecture(source)
    if source.task is Task.causal_lm and config.kv_cache is KVCache.int8 and route != "builder":
        raise EdgeftError(f"--kv-cache int8 needs an onnxruntime-genai builder graph (llama, qwen2, ...); "
                          f"{source.architecture} exports through torch.onnx, whose cache stays float32")
    _torch_threads(config, source.model)
    need.bytes = work_bytes(config, sum(p.numel() for p in source.model.parameters()))
    check_space(work, need.bytes, f"the export of {config.out}")  # before anything large is written
    hf_dir = save_hf_configs(source, work / "hf")
    if source.task is Task.causal_lm:
        plan = _decoder_plan(config, source, hf_dir, work, log, route)
    elif source.task is Task.embedding:
        plan = _embedding_plan(config, source, hf_dir, work, log)
    else:
        plan = _classifier_plan(config, source, hf_dir, work, log)
    gated = _run_gate(plan, log)
    seconds = time.perf_counter() - t0
    return _publish(plan, gated, seconds, log)


def _check_architecture(source: Source) -> str | None:
    """One line naming the supported architectures, before any slow step (the only check).

    For a decoder, returns how it exports ("builder" or "torch").
    """
    if source.task is Task.causal_lm:
        from edgeft.export.decoder import check_supported

        return check_supported(source.model.config)
    from edgeft.export.classifier import check_supported

    check_supported(source.model.config)
    return None


def _torch_threads(config: ExportConfig, model: Any) -> None:
    """Small models run fastest on one thread (no spin-waiting on a busy machine); --threads wins."""
    import torch

    small = sum(p.numel() for p in model.parameters()) < 20_000_000
    torch.set_num_threads(config.threads or (1 if small else torch.get_num_threads()))


# ---------------------------------------------------------------- decoders

def _decoder_schemes(config: ExportConfig) -> list[Quantize]:
    return list(AUTO_ORDER) if config.quantize is Quantize.auto else [config.quantize]


def _decoder_plan(config: ExportConfig, source: Source, hf_dir: Path, work: Path, log: Log, route: str) -> Plan:
    from edgeft.export.decoder import export_decoder, int8_kv_cache
    from edgeft.export.merge import remap

    tokenizer = source.tokenizer
    log("exporting the decoder graph (fp32)")
    graph = export_decoder(source.model, hf_dir, work, route)
    remap(source, config)  # the export read every page of the model: what follows runs beside a fresh map
    if config.context_length and config.context_length > graph.context_length:
        raise EdgeftError(f"--context-length {config.context_length} is longer than the model's "
                          f"{graph.context_length} positions")
    gen = assemble.generation_section(getattr(source.model, "generation_config", None))
    # a decoder is cut only when asked (--trunk-blocks K), never at the run's frozen count by default
    blocks = 0 if config.trunk_blocks is None else trunk.frozen_blocks(
        config.trunk_blocks, source.run.trainable_layers if source.run else None, graph.num_layers)
    kv_scales = _kv_scales(config, source, graph, log)

    def build(scheme: Quantize, name: str | None = None, widths: dict[str, int] | None = None,
              search: dict[str, Any] | None = None) -> tuple[Path, Manifest]:
        folder = work / f"candidate-{name or scheme.value}"
        folder.mkdir()
        if scheme is Quantize.none:
            assemble.copy_graph(graph.path, folder)
            quant = Quantization(scheme="none", groups={"all": "fp32"}, method="none")
        elif scheme is Quantize.int8 and config.int8_mode is Int8Mode.dynamic:
            log("quantizing: int8, dynamic (smoothed, a scale per row)")
            ids, origin = _calibration_ids(config, source)
            feeds = smooth.decoder_feeds(graph.inputs, ids, graph.num_kv_heads, graph.head_dim, graph.kv_dtype)
            quant = smooth.quantize_decoder_dynamic(graph.path, folder / "model.onnx", graph.vocab_size,
                                                    graph.num_layers, config.block_size, feeds,
                                                    config.threads)
            quant = dataclasses.replace(quant, calibration={"tokens": int(sum(len(c) for c in ids)), "texts": origin,
                                                            "alpha": smooth.ALPHA})
        else:
            log(f"quantizing: {name or scheme.value} (block size {config.block_size})")
            quant = quantize.quantize_decoder(graph.path, folder / "model.onnx", scheme, config.block_size,
                                              graph.num_layers, graph.vocab_size, config.int8_activations,
                                              widths, config.int4_mode)
            quant = dataclasses.replace(quant, search=search)
        if kv_scales is not None:  # before the gate, which judges the cache with the weights
            int8_kv_cache(folder / "model.onnx", kv_scales)
        assemble.copy_support_files(hf_dir, folder, graph.genai_config, tokenizer, None, config.to_dict(),
                                    config.context_length)
        tok = assemble.tokenizer_section(tokenizer, source.model.config,
                                         getattr(source.model, "generation_config", None), folder)
        manifest = assemble.decoder_manifest(kv_graph, tok, gen, quant, source.architecture, config.context_length,
                                             source.provenance())
        if blocks:
            manifest = trunk.split_decoder(folder, manifest, blocks, log)
        return folder, write_manifest(folder, manifest)

    kv_graph = graph if kv_scales is None else dataclasses.replace(graph, kv_dtype="int8")
    search = _Search(config, source, graph, log)
    candidates = [_searched_candidate(search, build, 1, None) if s is Quantize.searched
                  else Candidate(s.value, lambda s=s: build(s)) for s in _decoder_schemes(config)]
    return Plan(config, source, graph, tokenizer, candidates)


def _kv_scales(config: ExportConfig, source: Source, graph: Any, log: Log) -> dict[str, Any] | None:
    """--kv-cache int8: the cache's per-channel scales, measured on the fp32 graph over the calibration ids
    of the dynamic int8 scheme (None: a float32 cache)."""
    from edgeft.export.decoder import kv_cache_scales

    if config.kv_cache is not KVCache.int8:
        return None
    ids, origin = _calibration_ids(config, source)
    log(f"measuring the KV cache's range for an int8 cache on {sum(len(c) for c in ids)} tokens ({origin})")
    feeds = smooth.decoder_feeds(graph.inputs, ids, graph.num_kv_heads, graph.head_dim, graph.kv_dtype)
    return kv_cache_scales(graph.path, feeds, graph.num_layers)


# Calibration of the dynamic int8 scheme: this many held-out tokens, in prompts of at most CALIBRATION_CHUNK.
CALIBRATION_TOKENS = 2048
CALIBRATION_CHUNK = 256


def _calibration_ids(config: ExportConfig, source: Source) -> tuple[list[list[int]], str]:
    """Token ids the smoothing measures activations on, and where they came from."""
    evals = gate.eval_set(config, source.task, source.run_config, source.tokenizer, None)
    texts, overlap = gate.calibration_texts(config, source.task, source.run_config, source.tokenizer, evals)
    chunks = [ids[i:i + CALIBRATION_CHUNK] for ids in _encode_until(source.tokenizer, texts, CALIBRATION_TOKENS)
              for i in range(0, len(ids), CALIBRATION_CHUNK)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise EdgeftError(f"the dynamic int8 scheme has no text to calibrate on ({evals.origin})")
    return chunks, ("the gate texts themselves" if overlap else "held-out texts the gate does not score")


# ---------------------------------------------------------------- searched widths

# The first try aims the predicted perplexity rise at this share of the gate's budget (room for
# the int8 activations, which the simulation leaves out, and for costs that do not add up exactly);
# a failed try is narrowed so that the measured rise would land at SEARCH_AIM of the budget.
SEARCH_TARGET_SHARE = 0.6
SEARCH_AIM = 0.85
SEARCH_TRIES = 3


@dataclass
class _Search:
    """The sensitivity pass of one export, run the first time a searched candidate is built."""

    config: ExportConfig
    source: Source
    graph: DecoderGraph
    log: Log
    found: list | None = None
    unmatched: list[str] | None = None
    sens: Any = None
    overlap: bool = False

    def run(self) -> _Search:
        if self.sens is not None:
            return self
        from edgeft.export import sensitivity

        config, source = self.config, self.source
        evals = gate.eval_set(config, source.task, source.run_config, source.tokenizer, None)
        texts, self.overlap = gate.calibration_texts(config, source.task, source.run_config, source.tokenizer, evals)
        ids = sensitivity.chunks(_encode_until(source.tokenizer, texts, config.sensitivity_tokens),
                                 config.sensitivity_tokens)
        if ids.size < 2:
            raise EdgeftError(f"the sensitivity pass has no held-out text to score ({evals.origin})")
        self.found, self.unmatched = sensitivity.groups(self.graph.path, source.model, self.graph.vocab_size,
                                                        config.block_size)
        self.log(f"sensitivity: {len(self.found)} tensor groups, {ids.size} held-out tokens "
                 f"({'the gate texts themselves' if self.overlap else 'held-out texts the gate does not score'}), "
                 f"budget {config.sensitivity_seconds:g} s")
        self.sens = sensitivity.measure(source.model, self.found, ids, config.block_size, config.sensitivity_seconds,
                                        config.progress, self.log)
        return self


def _encode_until(tokenizer: Any, texts: list[str], tokens: int) -> list[list[int]]:
    out, total = [], 0
    for t in texts:
        if total >= tokens:
            break
        ids = tokenizer.encode(t)
        out.append(ids)
        total += len(ids)
    return out


def _searched_candidate(search: _Search, build: Callable[..., tuple[Path, Manifest]], attempt: int,
                        target: float | None) -> Candidate:
    """A candidate whose widths come from the sensitivity pass, aiming its predicted rise at ``target``
    percent (None: SEARCH_TARGET_SHARE of the budget); a failed gate yields a narrower next try."""
    from edgeft.export import sensitivity

    config = search.config
    budget = config.max_perplexity_increase
    c = Candidate("searched" if attempt == 1 else f"searched-{attempt}", lambda: (None, None))

    def make() -> tuple[Path, Manifest]:
        s = search.run()
        aim = SEARCH_TARGET_SHARE * budget if target is None else target
        choice = sensitivity.choose(s.found, s.sens, aim)
        c.note, c.chosen4 = choice.why, choice.four_bit
        widths = {g.node: 4 for g in s.found if g.name in choice.four_bit}
        return build(Quantize.searched, c.name, widths, _search_record(s, choice, attempt))

    def retry(result: gate.GateResult) -> Candidate | None:
        s = search.run()
        if attempt >= SEARCH_TRIES:
            return None
        floor = s.sens.increase_pct([])
        spend = s.sens.increase_pct(c.chosen4) - floor  # what the failed mix was predicted to cost
        measured = result.metrics.get("perplexity_increase_pct", 0.0)
        if measured > SEARCH_AIM * budget and measured > floor:
            spend *= min(0.8, (SEARCH_AIM * budget - floor) / (measured - floor))
        else:  # failed on token agreement or repetition: halve what the 4-bit groups may cost
            spend *= 0.5
        narrower = sensitivity.choose(s.found, s.sens, floor + spend).four_bit
        if spend <= 0 or not narrower or set(narrower) >= set(c.chosen4):
            return None
        search.log(f"{c.name} failed the gate: trying a narrower mix (predicted target {floor + spend:+.2f}%)")
        return _searched_candidate(search, build, attempt + 1, floor + spend)

    c.build, c.retry = make, retry
    return c


def _search_record(s: _Search, choice: Any, attempt: int) -> dict[str, Any]:
    """The manifest's ``quantization.search``: every group's width and cost, and why this mix."""
    sens = s.sens
    return {
        "method": "per-group fake quantization in PyTorch (onnxruntime's MatMulNBits blocks), others at int8; "
                  "cost: mean KL from the all-int8 model on held-out token ids (NLL rise recorded too); "
                  "greedy knapsack on cost per byte saved",
        "why": choice.why,
        "attempt": attempt,
        "target_increase_pct": round(choice.target_pct, 4),
        "predicted_increase_pct": round(choice.predicted_pct, 4),
        "int8_predicted_increase_pct": round(sens.increase_pct([]), 4),
        "widths": {g.name: ("int4" if g.name in choice.four_bit else "int8") for g in s.found},
        "kl": {g: round(d, 7) for g, d in sens.kl.items()},
        "nll_rise": {g: round(d, 6) for g, d in sens.deltas.items()},
        "int8_kl": round(sens.baseline_kl, 7),
        "unmeasured": [g.name for g in s.found if g.name not in sens.deltas],
        "unmatched_nodes": list(s.unmatched or []),
        "tokens": sens.tokens,
        "tokens_are_gate_texts": s.overlap,
        "cache_key": sens.key,
        "groups_from_cache": sens.from_cache,
        "seconds": round(sens.seconds, 2),
        "budget_seconds": s.config.sensitivity_seconds,
    }


# ---------------------------------------------------------------- classifiers

def _classifier_schemes(config: ExportConfig) -> list[str]:
    if config.quantize is Quantize.none:
        return ["none"]
    if config.int8_mode is Int8Mode.best:
        return ["int8-dynamic", "int8-weight-only"]
    return [f"int8-{config.int8_mode.value}"]


def _classifier_plan(config: ExportConfig, source: Source, hf_dir: Path, work: Path, log: Log) -> Plan:
    from edgeft.export.classifier import export_classifier

    if not source.labels:
        raise EdgeftError("the classifier has no label names: pass --labels")
    max_length = source.max_length or 128
    log("exporting the classifier graph (fp32)")
    graph = export_classifier(source.model, work, max_length)
    pairs = _pair_input(config, source)

    def manifest(tok, quant) -> Manifest:
        made = assemble.classifier_manifest(graph, tok, quant, source.architecture, source.labels, max_length,
                                            source.provenance())
        return made if pairs is None else dataclasses.replace(
            made, classifier=dataclasses.replace(made.classifier, pairs=pairs))

    blocks = trunk.frozen_blocks(config.trunk_blocks, source.run.trainable_layers if source.run else None,
                                 int(source.model.config.num_hidden_layers))
    candidates = _encoder_candidates(config, source, hf_dir, graph, manifest, source.labels, work, log, blocks)
    return Plan(config, source, graph, source.tokenizer, candidates, max_length=max_length)


def _pair_input(config: ExportConfig, source: Source) -> Any:
    """The manifest's ``PairInput`` where the classifier was tuned on (and is gated on) text pairs."""
    from edgeft import data
    from edgeft.artifact import PairInput

    if gate.pair_columns(config, source.run_config) is None:
        return None
    template = data.PAIR_TEMPLATE if data.uses_pair_template(source.tokenizer) else None
    return PairInput(template=template, relevant_label=data.relevant_label(list(source.labels)))


def _embedding_plan(config: ExportConfig, source: Source, hf_dir: Path, work: Path, log: Log) -> Plan:
    from edgeft.artifact import Embedding
    from edgeft.export.classifier import export_classifier
    from edgeft.export.embedding import default_max_length, read_pooling

    pooling, normalize = read_pooling(source.base_dir)
    max_length = source.max_length or default_max_length(source.base_dir, source.model.config)
    dim = int(source.model.config.hidden_size)
    if any(d > dim for d in config.truncation_dims):
        raise EdgeftError(f"--truncation-dims must be at most the model's {dim} dimensions")
    log(f"exporting the encoder graph (fp32; {pooling.value} pooling{', normalized' if normalize else ''})")
    graph = export_classifier(source.model, work, max_length, output="last_hidden_state")
    spec = Embedding(dim=dim, max_length=max_length, pooling=pooling, normalize=normalize,
                     uses_token_type_ids=graph.uses_token_type_ids,
                     truncation_dims=sorted(set(config.truncation_dims)))

    def manifest(tok, quant) -> Manifest:
        return assemble.embedding_manifest(graph, tok, quant, source.architecture, spec, source.provenance())

    candidates = _encoder_candidates(config, source, hf_dir, graph, manifest, None, work, log)
    return Plan(config, source, graph, source.tokenizer, candidates, max_length=max_length, embedding=spec)


def _encoder_candidates(config: ExportConfig, source: Source, hf_dir: Path, graph: ClassifierGraph,
                        manifest: Callable[[Any, Quantization], Manifest], labels: list[str] | None, work: Path,
                        log: Log, trunk_blocks: int = 0) -> list[Candidate]:
    """One candidate per int8 flavour (or fp32) of an encoder graph; ``manifest(tok, quant)`` fills the manifest.
    With ``trunk_blocks``, each is split there (``edgeft.export.trunk``) before the gate sees it."""
    tokenizer = source.tokenizer

    def build(name: str) -> tuple[Path, Manifest]:
        folder = work / f"candidate-{name}"
        folder.mkdir()
        if name == "none":
            assemble.copy_graph(graph.path, folder)
            quant = Quantization(scheme="none", groups={"all": "fp32"}, method="none")
        elif name == "int8-dynamic":
            log("quantizing: int8 dynamic")
            quant = quantize.quantize_classifier_dynamic(graph.path, folder / "model.onnx")
        else:
            log(f"quantizing: int8 weight-only (block size {config.block_size})")
            quant = quantize.quantize_classifier_weight_only(graph.path, folder / "model.onnx",
                                                            config.block_size)
        for leftover in folder.glob("dynamic-tmp.onnx*"):
            leftover.unlink()
        assemble.copy_support_files(hf_dir, folder, None, tokenizer, labels, config.to_dict())
        tok = assemble.tokenizer_section(tokenizer, source.model.config, None, folder)
        m = manifest(tok, quant)
        if trunk_blocks:
            m = trunk.split(folder, m, trunk_blocks, log, asked=config.trunk_blocks is not None)
        return folder, write_manifest(folder, m)

    return [Candidate(n, lambda n=n: build(n)) for n in _classifier_schemes(config)]


# ---------------------------------------------------------------- gate

def _run_gate(plan: Plan, log: Log) -> Gated:
    config, source, candidates = plan.config, plan.source, plan.candidates
    evals = gate.eval_set(config, source.task, source.run_config, plan.tokenizer, source.labels)
    log(f"gate: measuring PyTorch on {len(evals.texts)} held-out texts ({evals.origin})")
    if source.task is Task.causal_lm:
        return _gate_decoders(plan, evals, log)
    tokenizer_json = candidates[0].ensure_built().folder / "tokenizer.json"
    if source.task is Task.embedding:
        ref = gate.embedding_reference(source.model, tokenizer_json, evals, plan.embedding)
        for c in candidates:
            c.result = gate.embedding_gate(c.ensure_built().folder, ref, evals, config)
            _unseal(c)
            _say(c, log)
        passing = [c for c in candidates if c.result.passed]
        return Gated(pick_classifier(passing, "mean_cosine", classifier_timer(evals, config.threads, embedding=True),
                                     isa=_machine_isa()), evals, ref)
    built = candidates[0].ensure_built().manifest
    pairs = built.classifier.pairs if built is not None and built.classifier is not None else None
    ref = gate.classifier_reference(source.model, tokenizer_json, evals, source.labels, plan.max_length,
                                    pairs.template if pairs else None)
    for c in candidates:
        c.result = gate.classifier_gate(c.ensure_built().folder, ref, evals, config)
        _unseal(c)
        _say(c, log)
    passing = [c for c in candidates if c.result.passed]
    return Gated(pick_classifier(passing, timer=classifier_timer(evals, config.threads), isa=_machine_isa()),
                 evals, ref)


SPEED_ROUNDS = 5  # alternating rounds of the classifier speed check
SPEED_BATCH = 32  # texts per timed call (the batch a server or a classify run uses)
SPEED_MARGIN = 0.10  # the fastest must beat the rule's choice by this share of its time to overrule it


def pick_classifier(passing: list[Candidate], quality: str = "accuracy",
                    timer: Callable[[Candidate], float] | None = None, rounds: int = SPEED_ROUNDS,
                    margin: float = SPEED_MARGIN, isa: str = "") -> Candidate | None:
    """Of the encoder candidates that passed the gate (all within its budget), choose the fastest
    on this machine when the measurement is clear, else by a rule; the reason goes in ``why``.

    The rule, in order: the most matrix products computed on int8 activations (integer GEMM,
    as dynamic int8 does; weight-only int8 dequantizes its weights and multiplies in fp32,
    which is slower on most CPUs), then the fewest bytes, then the higher ``quality`` metric,
    then the name. The ms/text the gate measured is recorded, not used.

    With a ``timer`` (seconds for one fixed batch through a candidate) and two or more
    candidates, each is timed once per round for ``rounds`` rounds, the order rotated every
    round, and its median kept: the fastest replaces the rule's choice only when it is at least
    ``margin`` faster (a share of the rule's choice's time), so noise on a busy machine leaves
    the rule standing. A timer that fails leaves the rule standing too. ``isa`` (the CPU's
    instruction sets, ``edgeft.bench.isa_summary``) is recorded with the timings.
    """
    if not passing:
        return None
    from edgeft.export.graphs import INT8_COMPUTE_OPS, op_counts

    def int8_ops(c: Candidate) -> int:  # a split candidate's trunk counts too
        return sum(sum(op_counts(f, INT8_COMPUTE_OPS).values())
                   for f in trunk.graph_files(c.folder, getattr(c, "manifest", None)))

    facts = {c.name: (int8_ops(c),
                      assemble.folder_size(c.folder), c.result.metrics[quality]) for c in passing}
    chosen = min(passing, key=lambda c: (-facts[c.name][0], facts[c.name][1], -facts[c.name][2], c.name))
    int8_ops, size, q = facts[chosen.name]
    others = "; ".join(f"{n}: {f[0]} int8 matmuls, {f[1]} bytes, {quality} {f[2]:.4f}"
                       for n, f in sorted(facts.items()) if n != chosen.name)
    rule = (f"rule: most int8-activation matmuls, then fewest bytes, then highest {quality}; "
            f"{chosen.name}: {int8_ops} int8 matmuls, {size} bytes, {quality} {q:.4f}"
            + (f" (passed too: {others})" if others else " (the only candidate that passed)"))
    chosen.why = rule
    if timer is None or len(passing) < 2:
        return chosen
    try:
        medians = time_candidates(passing, timer, rounds)
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not fail the export: the rule stands
        chosen.why = f"{rule}; the speed check failed ({type(exc).__name__}: {exc}), so the rule stands"
        return chosen
    speed, gain = speed_verdict(medians, chosen.name, margin)
    timings = ", ".join(f"{n} {1000 * s:.2f} ms" for n, s in sorted(medians.items(), key=lambda kv: kv[1]))
    measured = (f"measured on this CPU ({isa or 'instruction sets unknown'}): {timings} per batch "
                f"(median of {rounds} alternating rounds); the fastest is {100 * gain:.1f}% faster than "
                f"the rule's choice {chosen.name} (margin {100 * margin:.0f}%)")
    if speed == chosen.name:
        chosen.why = f"{rule}; {measured}: the rule stands"
        return chosen
    winner = next(c for c in passing if c.name == speed)
    winner.why = f"measured: {speed} is the fastest by more than the margin; {measured}; the rule alone: {rule}"
    return winner


def time_candidates(passing: list[Candidate], timer: Callable[[Candidate], float],
                    rounds: int) -> dict[str, float]:
    """Each candidate's median seconds over ``rounds`` alternating rounds (the order rotated each round)."""
    import statistics

    times: dict[str, list[float]] = {c.name: [] for c in passing}
    for r in range(rounds):
        k = r % len(passing)
        for c in passing[k:] + passing[:k]:
            times[c.name].append(float(timer(c)))
    return {n: statistics.median(ts) for n, ts in times.items()}


def speed_verdict(medians: dict[str, float], rule_choice: str, margin: float) -> tuple[str, float]:
    """(the candidate to keep, how much faster the fastest is than the rule's choice, as a share of its time).

    The fastest is kept only when it beats ``rule_choice`` by at least ``margin``; else the rule's."""
    fastest = min(medians, key=lambda n: (medians[n], n))
    base = medians[rule_choice]
    gain = (base - medians[fastest]) / base if base > 0 else 0.0
    return (fastest if fastest != rule_choice and gain >= margin else rule_choice), gain


def classifier_timer(evals: gate.EvalSet, threads: int | None,
                     embedding: bool = False) -> Callable[[Candidate], float]:
    """Seconds for one batch of ``SPEED_BATCH`` gate texts through a candidate's runtime (sessions kept open)."""
    texts = [evals.texts[i % len(evals.texts)] for i in range(SPEED_BATCH)] if evals.texts else ["a"] * SPEED_BATCH
    open_: dict[str, Callable[[list[str]], Any]] = {}

    def timer(c: Candidate) -> float:
        if c.name not in open_:
            from edgeft.runtime import TextClassifier, TextEmbedder

            write_manifest(c.folder, c.manifest)  # the runtime opens artifacts; the gate unsealed this one
            try:
                if embedding:
                    open_[c.name] = TextEmbedder.open(c.folder, threads=threads).embed
                else:
                    open_[c.name] = TextClassifier.open(c.folder, threads=threads).predict_proba
            finally:
                _unseal(c)
            open_[c.name](texts)  # warm up before timing
        run = open_[c.name]
        start = time.perf_counter()
        run(texts)
        return time.perf_counter() - start

    return timer


def _machine_isa() -> str:
    from edgeft.bench import cpu_isa, isa_summary

    return isa_summary(cpu_isa())


def _gate_decoders(plan: Plan, evals: gate.EvalSet, log: Log) -> Gated:
    from edgeft.runtime import Generator

    from edgeft.export.merge import give_back_memory, remap

    config, candidates = plan.config, plan.candidates
    first = Generator.open(candidates[0].ensure_built().folder, threads=config.threads)
    eos = set(first.eos_ids)
    # the runtime's token ids, then its session closed: the PyTorch pass does not run beside it
    encoded = {t: first.encode(t) for t in {*evals.texts, *evals.prompts}}
    del first
    give_back_memory()
    ref = gate.lm_reference(plan.source.model, encoded.__getitem__, evals, config, eos)
    remap(plan.source, config)  # nor the artifact's gate beside every page of the PyTorch model
    i = 0
    while i < len(candidates):  # candidates are ordered smallest first; a failed one may add a narrower try
        c = candidates[i]
        c.result = gate.lm_gate(c.ensure_built().folder, ref, config)
        _unseal(c)
        _say(c, log)
        if c.result.passed:
            c.why = ("the smallest scheme that passed the gate" if len(candidates) > 1
                     else "the scheme asked for, and it passed the gate") + (f"; {c.note}" if c.note else "")
            return Gated(c, evals, ref)
        nxt = c.retry(c.result) if c.retry else None
        if nxt is not None:
            candidates.insert(i + 1, nxt)
        i += 1
    return Gated(None, evals, ref)


def _say(c: Candidate, log: Log) -> None:
    m = c.result.metrics
    if "mean_cosine" in m:
        figures = (f"mean cosine {m['mean_cosine']:.4f} (min {m['min_cosine']:.4f}), "
                   f"{m['ms_per_text']:.2f} ms/text")
    elif "perplexity" in m:
        figures = (f"perplexity {m['perplexity']:.3f} ({m['perplexity_increase_pct']:+.2f}%), "
                   f"token agreement {m['token_agreement']:.3f}, repetition {m['repetition']:.2f}")
    else:
        ci = m.get("accuracy_drop_ci95")
        interval = f", 95% interval {ci[0]:.2f} to {ci[1]:.2f}" if ci else ""
        figures = (f"accuracy {m['accuracy']:.4f} (drop {m['accuracy_drop_points']:.2f} pt{interval}), "
                   f"agreement {m['label_agreement']:.4f}, {m['ms_per_text']:.2f} ms/text")
    log(f"gate {c.name}: {'passed' if c.result.passed else 'FAILED'}: {figures}")


# ---------------------------------------------------------------- publish

def _publish(plan: Plan, gated: Gated, seconds: float, log: Log) -> Path:
    config, candidates, chosen = plan.config, plan.candidates, gated.chosen
    degraded = chosen is None
    if degraded:
        failures = [f"{c.name}: {f}" for c in candidates for f in c.result.failures]
        if not config.allow_degraded:
            raise EdgeftError("the gate refused the export, nothing written: " + "; ".join(failures)
                              + " (loosen the thresholds or pass --allow-degraded)")
        chosen = candidates[-1]  # the largest: closest to PyTorch
        chosen.why = "no candidate passed the gate; --allow-degraded writes the largest, closest to PyTorch"
        log("gate failed; writing anyway (--allow-degraded), marked degraded in the manifest")
    task = chosen.manifest.task
    evals, ref = gated.evals, gated.reference
    record = Gate(
        passed=not degraded, degraded=degraded, chosen=chosen.name, chosen_because=chosen.why,
        metrics=chosen.result.metrics, reference=ref.metrics, failures=chosen.result.failures,
        thresholds=gate.thresholds(config, task), eval_data=evals.origin, eval_sha256=evals.sha256,
        candidates={c.name: {**c.result.to_dict(), "bytes": assemble.folder_size(c.folder)}
                    for c in candidates if c.result is not None},
        runtime="edgeft.runtime", export_seconds=round(seconds, 2))
    manifest = dataclasses.replace(chosen.manifest, gate=record)
    with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
        for item in chosen.folder.iterdir():
            if item.name != MANIFEST:
                shutil.move(str(item), tmp / item.name)
        write_manifest(tmp, manifest)
        if config.sign_key:
            from edgeft.artifact import sign
            from edgeft.signing import load_private_key

            log(f"signed by key {sign(tmp, load_private_key(config.sign_key))}")
    log(f"wrote {config.out} ({chosen.name}, {assemble.folder_size(config.out) / 1e6:.1f} MB)")
    return config.out
