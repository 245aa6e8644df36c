"""``export(config)``: source -> merged fp32 model -> ONNX graph -> quantized candidates -> gate -> artifact.

Every candidate (one scheme, or several for ``auto`` and for classifier int8) is a
complete artifact folder in a work folder beside the destination, opened by edgeft's
own runtime for the gate. The one kept is moved into place atomically; when the gate
fails nothing is written (unless ``allow_degraded``) and the error names what failed.
This module orchestrates (a decoder's order is ``decoder_plan``'s); the steps live in ``merge``,
``decoder``, ``classifier``, ``quantize``, ``assemble`` and ``gate``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.artifact import MANIFEST, Gate, Int4Grid, Manifest, Quantization, Task, write_manifest
from edgeft.errors import EdgeftError
from edgeft.export import assemble, gate, quantize, trunk
from edgeft.export.candidates import Candidate, Gated, Log, Plan, say, unseal
from edgeft.export.config import ExportConfig, Int8Mode, KVCache, Quantize
from edgeft.fsutil import atomic_dir, check_destination, check_space, free_bytes, mb, out_of_space, refuse_overlap

if TYPE_CHECKING:
    from edgeft.export.classifier import ClassifierGraph
    from edgeft.export.merge import Source


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


# The export's peak, measured at 0.5B-3B: the gate's PyTorch pass holds the fp32 model (1.0x its bytes) beside
# the libraries' fixed share (torch, onnxruntime, the builder: about 0.6 GB); see docs/export.md.
PEAK_MODEL_SHARE = 1.05
PEAK_FIXED_BYTES = 600_000_000


def peak_bytes(params: int) -> int:
    """About the largest resident memory an export of ``params`` weights reaches."""
    return int(params * 4 * PEAK_MODEL_SHARE) + PEAK_FIXED_BYTES


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def expected_line(disk: int, peak: int, free: int, available: int | None) -> str:
    """What the export will take, said before the slow part: scratch disk (checked against the free space
    already) and peak memory, with a warning when the machine has less memory available than that."""
    line = f"expects about {mb(disk)} of scratch disk ({mb(free)} free) and a peak of about {mb(peak)} of memory"
    if available is None:
        return line
    if available < peak:
        return (f"{line}; warning: only {mb(available)} is available now, so the export may be killed for "
                "memory (close other programs, or export on a machine with more)")
    return f"{line} ({mb(available)} available)"


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
    if config.int4_mode is not Int4Grid.zero_point:
        what = None
        if config.quantize not in (*narrow, Quantize.auto):
            what = f"--quantize {config.quantize.value}"
        elif config.task is not None and config.task is not Task.causal_lm:
            what = f"a {config.task.value} model"
        if what:
            raise EdgeftError(f"--int4-mode {config.int4_mode.value} applies to a decoder's 4-bit blocks (--quantize int4, mixed, "
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
    params = sum(p.numel() for p in source.model.parameters())
    need.bytes = work_bytes(config, params)
    check_space(work, need.bytes, f"the export of {config.out}")  # before anything large is written
    log(expected_line(need.bytes, peak_bytes(params), free_bytes(work), available_memory()))
    hf_dir = save_hf_configs(source, work / "hf")
    if source.task is Task.causal_lm:
        from edgeft.export import decoder_plan

        plan = decoder_plan.plan(config, source, hf_dir, work, log, route)
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
    if source.task is Task.causal_lm:  # its reference was measured first, before the graph
        from edgeft.export import decoder_plan

        return decoder_plan.gate_candidates(plan, log)
    evals = gate.eval_set(config, source.task, source.run_config, plan.tokenizer, source.labels)
    log(f"gate: measuring PyTorch on {len(evals.texts)} held-out texts ({evals.origin})")
    tokenizer_json = candidates[0].ensure_built().folder / "tokenizer.json"
    if source.task is Task.embedding:
        ref = gate.embedding_reference(source.model, tokenizer_json, evals, plan.embedding)
        for c in candidates:
            c.result = gate.embedding_gate(c.ensure_built().folder, ref, evals, config)
            unseal(c)
            say(c, log)
        passing = [c for c in candidates if c.result.passed]
        return Gated(pick_classifier(passing, "mean_cosine", classifier_timer(evals, config.threads, embedding=True),
                                     isa=_machine_isa()), evals, ref)
    built = candidates[0].ensure_built().manifest
    pairs = built.classifier.pairs if built is not None and built.classifier is not None else None
    ref = gate.classifier_reference(source.model, tokenizer_json, evals, source.labels, plan.max_length,
                                    pairs.template if pairs else None)
    for c in candidates:
        c.result = gate.classifier_gate(c.ensure_built().folder, ref, evals, config)
        unseal(c)
        say(c, log)
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
                unseal(c)
            open_[c.name](texts)  # warm up before timing
        run = open_[c.name]
        start = time.perf_counter()
        run(texts)
        return time.perf_counter() - start

    return timer


def _machine_isa() -> str:
    from edgeft.bench import cpu_isa, isa_summary

    return isa_summary(cpu_isa())


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
