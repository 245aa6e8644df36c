"""A decoder's export, ordered so that the torch model and an onnxruntime session never share the memory:
the PyTorch reference first, then the fp32 graph, then the candidates and their gate, the model gone.

1. The gate's PyTorch reference (perplexity and greedy continuations on the eval texts) is measured on
   the model as loaded, on the token ids the runtime will give (``runtime_encoder``, reading the
   tokenizer files every candidate ships), before any graph, quantizer or session exists beside it.
2. The model is mapped afresh (the pass read every page of it), the graph exported from it (the builder
   gives each weight's pages back once written), and the model released: candidates are quantized from
   the graph, and every onnxruntime session (calibration, the KV cache's scales, the gate) runs without it.
3. The searched scheme's sensitivity pass needs the torch model: it loads it again (mapped), measures
   once for every try, and lets it go before the candidate is built.

This module knows the order and the searched widths; the steps live in ``decoder``, ``quantize``,
``smooth``, ``sensitivity``, ``assemble``, ``merge`` and ``gate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.artifact import Manifest, Quantization, write_manifest
from edgeft.errors import EdgeftError
from edgeft.export import assemble, gate, quantize, smooth, trunk
from edgeft.export.candidates import Candidate, Gated, Log, Plan, say, unseal
from edgeft.export.config import AUTO_ORDER, ExportConfig, Int8Mode, KVCache, Quantize

if TYPE_CHECKING:
    from edgeft.export.decoder import DecoderGraph
    from edgeft.export.merge import Source


def schemes(config: ExportConfig) -> list[Quantize]:
    return list(AUTO_ORDER) if config.quantize is Quantize.auto else [config.quantize]


def plan(config: ExportConfig, source: Source, hf_dir: Path, work: Path, log: Log, route: str) -> Plan:
    """The PyTorch reference, then the fp32 graph, then the torch model released; candidates built lazily."""
    from edgeft.export.decoder import export_decoder
    from edgeft.export.merge import release, remap

    evals, ref = reference(config, source, hf_dir, log)
    remap(source, config)  # the pass read every page of the model: the export reads a fresh map
    log("exporting the decoder graph (fp32)")
    graph = export_decoder(source.model, hf_dir, work, route)
    configs = (source.model.config, getattr(source.model, "generation_config", None))
    release(source)  # what follows (quantizers, calibration, the gate's sessions) runs without the torch model
    if config.context_length and config.context_length > graph.context_length:
        raise EdgeftError(f"--context-length {config.context_length} is longer than the model's "
                          f"{graph.context_length} positions")
    candidates = _candidates(config, source, hf_dir, work, log, graph, configs)
    return Plan(config, source, graph, source.tokenizer, candidates, evals=evals, reference=ref)


def reference(config: ExportConfig, source: Source, hf_dir: Path, log: Log) -> tuple[gate.EvalSet, gate.Reference]:
    """The gate's texts and PyTorch's figures on them, on the ids the runtime will give (the tokenizer files in
    ``hf_dir`` are those every candidate ships; its manifest's tokenizer section is made from the same objects)."""
    from edgeft.export.merge import give_back_memory

    evals = gate.eval_set(config, source.task, source.run_config, source.tokenizer, None)
    log(f"gate: measuring PyTorch on {len(evals.texts)} held-out texts ({evals.origin})")
    model = source.model
    tok = assemble.tokenizer_section(source.tokenizer, model.config, getattr(model, "generation_config", None), hf_dir)
    encode, eos = runtime_encoder(hf_dir, tok)
    give_back_memory()
    return evals, gate.lm_reference(model, encode, evals, config, eos)


def runtime_encoder(folder: Path, tok: Any) -> tuple[Callable[[str], list[int]], set[int]]:
    """``edgeft.runtime.Generator``'s ``encode`` and ``eos_ids`` for an artifact whose tokenizer files lie in
    ``folder`` and whose manifest's tokenizer section is ``tok`` (``assemble.tokenizer_section``), without a
    graph or a session: the PyTorch reference is measured before either exists. The same steps as the
    runtime's (tested equal on the exported artifact)."""
    from tokenizers import Tokenizer

    from edgeft.data import check_text

    tokenizer = Tokenizer.from_file(str(folder / tok.file))
    bos = tokenizer.token_to_id(tok.bos_token) if tok.bos_token else None
    eos_token = tokenizer.token_to_id(tok.eos_token) if tok.eos_token else None
    eos = set(tok.eos_token_ids) or ({eos_token} if eos_token is not None else set())

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(check_text(text, "the prompt"), add_special_tokens=True).ids
        if tok.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    return encode, eos


def _candidates(config: ExportConfig, source: Source, hf_dir: Path, work: Path, log: Log, graph: DecoderGraph,
                configs: tuple[Any, Any]) -> list[Candidate]:
    """One candidate per scheme (``auto``: smallest first), each quantized from ``graph`` when first gated;
    ``configs``: the model's config and generation config (the model itself is gone)."""
    from edgeft.export.decoder import int8_kv_cache

    tokenizer, (hf_config, generation_config) = source.tokenizer, configs
    gen = assemble.generation_section(generation_config)
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
        tok = assemble.tokenizer_section(tokenizer, hf_config, generation_config, folder)
        manifest = assemble.decoder_manifest(kv_graph, tok, gen, quant, source.architecture, config.context_length,
                                             source.provenance())
        if blocks:
            manifest = trunk.split_decoder(folder, manifest, blocks, log)
        return folder, write_manifest(folder, manifest)

    kv_graph = graph if kv_scales is None else dataclasses.replace(graph, kv_dtype="int8")
    search = _Search(config, source, graph, log)
    return [_searched_candidate(search, build, 1, None) if s is Quantize.searched
            else Candidate(s.value, lambda s=s: build(s)) for s in schemes(config)]


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
        from edgeft.export.merge import give_back_memory, load_source

        config, source = self.config, self.source
        evals = gate.eval_set(config, source.task, source.run_config, source.tokenizer, None)
        texts, self.overlap = gate.calibration_texts(config, source.task, source.run_config, source.tokenizer, evals)
        ids = sensitivity.chunks(_encode_until(source.tokenizer, texts, config.sensitivity_tokens),
                                 config.sensitivity_tokens)
        if ids.size < 2:
            raise EdgeftError(f"the sensitivity pass has no held-out text to score ({evals.origin})")
        model = load_source(config).model  # released after the graph export: mapped again, let go once measured
        self.found, self.unmatched = sensitivity.groups(self.graph.path, model, self.graph.vocab_size,
                                                        config.block_size)
        self.log(f"sensitivity: {len(self.found)} tensor groups, {ids.size} held-out tokens "
                 f"({'the gate texts themselves' if self.overlap else 'held-out texts the gate does not score'}), "
                 f"budget {config.sensitivity_seconds:g} s")
        self.sens = sensitivity.measure(model, self.found, ids, config.block_size, config.sensitivity_seconds,
                                        config.progress, self.log)
        del model
        give_back_memory()
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


# ---------------------------------------------------------------- gate

def gate_candidates(plan: Plan, log: Log) -> Gated:
    """Gate the candidates against the reference the plan measured, smallest first, until one passes; a failed
    searched try may add a narrower one after it."""
    config, candidates, evals, ref = plan.config, plan.candidates, plan.evals, plan.reference
    assert evals is not None and ref is not None, "decoder_plan.plan measures the reference"
    i = 0
    while i < len(candidates):
        c = candidates[i]
        c.result = gate.lm_gate(c.ensure_built().folder, ref, config)
        unseal(c)
        say(c, log)
        if c.result.passed:
            c.why = ("the smallest scheme that passed the gate" if len(candidates) > 1
                     else "the scheme asked for, and it passed the gate") + (f"; {c.note}" if c.note else "")
            return Gated(c, evals, ref)
        nxt = c.retry(c.result) if c.retry else None
        if nxt is not None:
            candidates.insert(i + 1, nxt)
        i += 1
    return Gated(None, evals, ref)
