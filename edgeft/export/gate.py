"""The gate: measure an artifact with edgeft's own runtime against the PyTorch model.

Causal LMs: perplexity of both on held-out texts (ratio), greedy-token agreement (the
artifact's argmax against PyTorch's greedy continuation of held-out prompts, teacher
forced, so one early difference does not hide the rest), and degenerate repetition (the
share of repeated 4-grams in the artifact's own greedy continuations, against
PyTorch's: int4 SmolLM2-135M was seen looping on one phrase). Classifiers: accuracy of
both on labelled held-out texts (drop in points, with a paired-bootstrap 95% interval and
McNemar's exact p, since on a few hundred texts a point or two can be noise) and label
agreement; a drop fails when it is over the budget and significant, or over a hard
ceiling of 3x the budget whatever the interval.
Embeddings: the mean cosine similarity of the artifact's vectors to PyTorch's on
held-out texts (a bare base model: the built-in texts).

The PyTorch side is measured once (``Reference``) and every candidate artifact (int4,
mixed, int8...) is compared with it. The artifact side goes only through
``edgeft.runtime`` (``Generator.score/generate``, ``TextClassifier.predict_proba``),
so the gate measures exactly what users will run. This module knows torch and the
runtime; it knows nothing of how graphs are built.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeft import data
from edgeft.errors import EdgeftError
from edgeft.artifact import Task
from edgeft.export.config import ExportConfig

# Used only when neither --eval-data nor a run's data is available (a bare base model).
BUILTIN_TEXTS = (
    "The history of the city begins with a small fishing village on the northern bank of the river.",
    "To make the bread, mix the flour and water, let the dough rest for an hour, then bake it until golden.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "The committee met on Tuesday to discuss the budget for the coming year and the repairs to the school.",
    "Photosynthesis converts light energy into chemical energy that plants store as sugar.",
    "She opened the letter slowly, afraid of what it might say, and read it twice before she spoke.",
    "A good test suite runs quickly, fails for one reason at a time and says clearly what went wrong.",
    "The train left the station at dawn, carrying passengers through fields of wheat and quiet towns.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature in the mountains.",
    "In the morning the market fills with traders selling fruit, fish, cloth and spices from far away.",
    "He argued that the plan was too expensive, yet he admitted that nothing better had been proposed.",
    "The museum's new exhibition shows paintings from the early twentieth century and a few sculptures.",
    "When the storm passed, the children ran outside to look at the fallen branches and the deep puddles.",
    "Regular exercise improves sleep, mood and the health of the heart at every age.",
    "The old lighthouse keeper wrote in his journal every night, describing the ships and the weather.",
    "Please summarize the main arguments of the article in three short sentences.",
)
PROMPT_TOKENS = 24
# Classifiers: a drop over the budget fails when significant; over this many budgets, always.
DROP_CEILING_FACTOR = 3.0
BOOTSTRAP_RESAMPLES = 2000
SIGNIFICANCE = 0.05
MAX_TEXT_TOKENS = 128
# A causal LM's gate scores at least this many tokens: a run whose held-out split is one short text gets
# texts of its training part added (``_at_least``), and the gate's line says so.
MIN_GATE_TOKENS = 1024
NGRAM = 4


@dataclass
class EvalSet:
    """Held-out data for the gate: texts (and labels for classifiers), plus prompts."""

    texts: list[Any]  # strings, or (text, text_pair) pairs for a pair classifier
    labels: list[str] | None = None
    prompts: list[str] = field(default_factory=list)
    whole_prompts: bool = False  # chat prompts are kept whole (their end is the assistant's turn)
    origin: str = "built-in"
    sha256: str | None = None


@dataclass
class Reference:
    """The PyTorch model's figures on the eval set, measured once."""

    metrics: dict[str, float]
    token_ids: list[list[int]] = field(default_factory=list)  # scored sequences (causal LM)
    nll: float = 0.0
    count: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)
    probs: np.ndarray | None = None  # classifier


@dataclass
class GateResult:
    passed: bool
    metrics: dict[str, float]
    failures: list[str]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.metrics, "failures": self.failures}


# ---------------------------------------------------------------- eval data

def eval_set(config: ExportConfig, task: Task, run_config: dict[str, Any], tokenizer: Any,
             labels: list[str] | None) -> EvalSet:
    """The gate's data: --eval-data, else the run's eval data, else its held-out split, else built-in."""
    from edgeft import data

    path, from_training = _eval_path(config, run_config)
    split = _held_out(run_config, path) if from_training else (lambda items: items)
    limit = config.gate_texts or (32 if task is Task.causal_lm else 1000)
    if path is None:
        if task is Task.classification:
            raise EdgeftError("the classification gate needs labelled data: pass --eval-data (text and label columns)")
        texts = list(BUILTIN_TEXTS)
        return EvalSet(texts=texts[:limit], prompts=texts[:config.gate_prompts])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if task is Task.embedding:  # any file of texts: a classifier's labels are not needed
        texts = split(data.load_texts(path, run_config.get("text_column")))
        return EvalSet([texts[i] for i in _spread(len(texts), limit)], origin=str(path), sha256=digest)
    if task is Task.classification:
        texts, got = data.load_classification(path, run_config.get("text_column"), run_config.get("label_column"),
                                              run_config.get("pair_column"))
        texts, got = (list(x) for x in zip(*split(list(zip(texts, got, strict=True))), strict=True))
        unknown = sorted(set(got) - set(labels or []))
        if unknown:
            raise EdgeftError(f"{path}: labels {', '.join(unknown[:3])} are not the model's ({', '.join(labels or [])})")
        idx = _spread(len(texts), limit)
        return EvalSet([texts[i] for i in idx], [got[i] for i in idx], origin=str(path), sha256=digest)
    if data.is_chat_file(path):
        rows = data.load_chat(path)
        pairs = [data.render_chat(tokenizer, m) for m in split(rows)]
        idx = _spread(len(pairs), limit)
        texts = [pairs[i][0] + pairs[i][1] for i in idx]
        prompts = [pairs[i][0] for i in idx[:config.gate_prompts]]

        def trained() -> list[str]:  # rendered only when the held-out texts are too few
            return [p + a for p, a in (data.render_chat(tokenizer, m) for m in _rest(rows, split))]

        texts, origin = _at_least(texts, trained if from_training else None, tokenizer, str(path))
        return EvalSet(texts, prompts=prompts, whole_prompts=True, origin=origin, sha256=digest)
    rows = data.load_texts(path, run_config.get("text_column"))
    texts = split(rows)
    idx = _spread(len(texts), limit)
    texts = [texts[i] for i in idx]
    prompts = texts[:config.gate_prompts]
    texts, origin = _at_least(texts, (lambda: _rest(rows, split)) if from_training else None, tokenizer, str(path))
    return EvalSet(texts, prompts=prompts, origin=origin, sha256=digest)


def _rest(items: list[Any], split: Any) -> list[Any]:
    """The items of the training file that its held-out split does not hold (those tune trained on)."""
    held = split(list(range(len(items))))
    return [x for i, x in enumerate(items) if i not in set(held)]


def _tokens(tokenizer: Any, text: str) -> int:
    return min(MAX_TEXT_TOKENS, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _at_least(texts: list[str], more: Callable[[], list[str]] | None, tokenizer: Any,
              origin: str) -> tuple[list[str], str]:
    """A causal LM's scored texts topped up to ``MIN_GATE_TOKENS`` (each counted up to ``MAX_TEXT_TOKENS``).

    When the held-out texts carry fewer tokens, texts of the training part of the file (``more()``: the
    gate compares the artifact with PyTorch on them, which is no less fair for tune having seen them) are
    added, spread over it, and the origin says so; without such texts it says how few were scored.
    """
    if tokenizer is None:
        return texts, origin
    have = sum(_tokens(tokenizer, t) for t in texts)
    if have >= MIN_GATE_TOKENS:
        return texts, origin
    held = f"{len(texts)} held-out text{'s' * (len(texts) != 1)}, {have} tokens"
    extra = more() if more is not None else []
    added: list[str] = []
    for i in sorted(range(len(extra)), key=lambda i: (i * 0.6180339887) % 1.0):  # spread over the file
        added.append(extra[i])
        have += _tokens(tokenizer, extra[i])
        if have >= MIN_GATE_TOKENS:
            break
    if not added:
        return texts, f"{origin}; only {held}, under the gate's minimum of {MIN_GATE_TOKENS}"
    return texts + added, (f"{origin}; {held}, under the gate's minimum of {MIN_GATE_TOKENS}: "
                           f"{len(added)} training text{'s' * (len(added) != 1)} added, {have} tokens in all")


def calibration_texts(config: ExportConfig, task: Task, run_config: dict[str, Any], tokenizer: Any,
                      evals: EvalSet) -> tuple[list[str], bool]:
    """Held-out texts for the sensitivity pass: those of the gate's data that the gate does not score.

    With none left (the built-in texts, or a small file the gate scores whole), the gate's own
    texts, and True: the gate then judges on the texts the search chose on.
    """
    import dataclasses

    full = eval_set(dataclasses.replace(config, gate_texts=10**9), task, run_config, tokenizer, None)
    scored = set(evals.texts)
    rest = [data.pair_text(t) for t in full.texts if t not in scored]  # a pair as one text
    return (rest, False) if rest else ([data.pair_text(t) for t in evals.texts], True)


def pair_columns(config: ExportConfig, run_config: dict[str, Any]) -> tuple[str, str] | None:
    """The (text, pair) columns of the gate's data where it holds pairs: the classifier then reads pairs."""
    path, _ = _eval_path(config, run_config)
    if path is None or path.suffix.lower() == ".txt":
        return None
    return data.detect_pair_columns(path, run_config.get("text_column"), run_config.get("pair_column"))


def _eval_path(config: ExportConfig, run_config: dict[str, Any]) -> tuple[Path | None, bool]:
    """The gate's data file, and whether it is the run's training file (then split like tune did)."""
    if config.eval_data is not None:
        return config.eval_data, False
    for key in ("eval_data", "data"):
        value = run_config.get(key)
        if value and Path(value).is_file():
            return Path(value), key == "data"
    return None, False


def _held_out(run_config: dict[str, Any], path: Path):
    """The run's own held-out part of its training file: same fraction, same seed as ``edgeft tune``."""
    from edgeft import data

    fraction, seed = float(run_config.get("eval_fraction", 0.1)), int(run_config.get("seed", 0))
    return lambda items: data.held_out_split(items, fraction, seed, str(path))[1]


def _bar(items, desc: str, config: ExportConfig):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=not config.progress, unit="text")


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``n`` items (all when k >= n): deterministic, no seed."""
    if k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})


# ---------------------------------------------------------------- causal LM

def repetition(ids: list[int], n: int = NGRAM) -> float:
    """Share of repeated n-grams in a token sequence (0: none; near 1: one phrase looping)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


NLL_ROWS = 16  # logit rows taken to float64 at a time (all 128 of a 49k vocabulary at once: 3 arrays of 50 MB)


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given logits [len, vocab] (float64 maths, ``NLL_ROWS`` rows at a
    time: each row's figure is the same as all at once, and so is their sum)."""
    n = len(ids) - 1
    each = np.empty(n, dtype=np.float64)
    for start in range(0, n, NLL_ROWS):
        x = logits[start:min(n, start + NLL_ROWS)].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
        each[start:start + len(x)] = logz - x[np.arange(len(x)), ids[start + 1:start + 1 + len(x)]]
    return float(each.sum())


def lm_reference(model: Any, encode, evals: EvalSet, config: ExportConfig, eos_ids: set[int]) -> Reference:
    """PyTorch's perplexity and greedy continuations on the eval set. The heap's free pages go back to the
    system after each sequence (``trim_heap``): the pass runs beside every weight of the model, and the
    arrays of texts of different lengths otherwise leave the heap holding tens of MB more at its end."""
    import torch

    from edgeft.export.merge import trim_heap

    seqs = [ids[:MAX_TEXT_TOKENS] for ids in (encode(t) for t in evals.texts)]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise EdgeftError(f"the gate's eval data ({evals.origin}) has no text of two tokens or more")
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in _bar(seqs, "gate: PyTorch perplexity", config):
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            nll += _nll(logits, ids)
            count += len(ids) - 1
            del logits
            trim_heap()
        prompts = [encode(p)[-MAX_TEXT_TOKENS:] if evals.whole_prompts else encode(p)[:PROMPT_TOKENS]
                   for p in evals.prompts]
        prompts = [p for p in prompts if p]
        conts = [_greedy(model, p, config.gate_new_tokens, eos_ids, trim_heap)
                 for p in _bar(prompts, "gate: PyTorch greedy", config)]
    reps = [repetition(c) for c in conts]
    return Reference(
        metrics={"perplexity": math.exp(nll / count), "repetition": float(np.mean(reps)) if reps else 0.0},
        token_ids=seqs, nll=nll, count=count, prompts=prompts, continuations=conts)


def _greedy(model: Any, prompt: list[int], n: int, eos_ids: set[int],
            after: Callable[[], None] = lambda: None) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, num_beams=1,
                         pad_token_id=next(iter(eos_ids), 0), eos_token_id=sorted(eos_ids) or None)
    ids = out[0, len(prompt):].tolist()
    del out
    after()
    cut = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
    return ids[:cut]


def lm_gate(artifact: Path, ref: Reference, config: ExportConfig) -> GateResult:
    """Compare a decoder artifact, through ``edgeft.runtime.Generator``, with the reference."""
    from edgeft.runtime import Generator, SamplingParams

    start = time.perf_counter()
    gen = Generator.open(artifact, threads=config.threads)
    nll = 0.0
    for ids in _bar(ref.token_ids, "gate: artifact perplexity", config):
        nll += _nll(gen.score(ids), ids)
    agree, total, reps, exact = 0, 0, [], 0
    params = SamplingParams(max_new_tokens=config.gate_new_tokens, temperature=0.0)
    for prompt, cont in _bar(list(zip(ref.prompts, ref.continuations)), "gate: artifact greedy", config):
        if cont:
            logits = gen.score(prompt + cont)
            guess = logits[len(prompt) - 1:len(prompt) - 1 + len(cont)].argmax(axis=1)
            agree += int((guess == np.array(cont)).sum())
            total += len(cont)
        own = gen.generate(prompt, params).token_ids
        reps.append(repetition(own))
        exact += int(own == cont)
    ppl = math.exp(nll / ref.count)
    metrics = {
        "perplexity": ppl,
        "reference_perplexity": ref.metrics["perplexity"],
        "perplexity_increase_pct": 100.0 * (ppl / ref.metrics["perplexity"] - 1.0),
        "token_agreement": agree / total if total else 1.0,
        "repetition": float(np.mean(reps)) if reps else 0.0,
        "reference_repetition": ref.metrics["repetition"],
        "identical_continuations": exact / len(ref.prompts) if ref.prompts else 1.0,
        "texts": len(ref.token_ids), "tokens": ref.count, "prompts": len(ref.prompts),
    }
    failures = _lm_failures(metrics, config)
    return GateResult(not failures, _round(metrics), failures, time.perf_counter() - start)


def _lm_failures(m: dict[str, float], c: ExportConfig) -> list[str]:
    out = []
    if m["perplexity_increase_pct"] > c.max_perplexity_increase:
        out.append(f"perplexity {m['perplexity']:.3f} is {m['perplexity_increase_pct']:.2f}% above PyTorch's "
                   f"{m['reference_perplexity']:.3f} (allowed {c.max_perplexity_increase:g}%)")
    if m["token_agreement"] < c.min_token_agreement:
        out.append(f"greedy-token agreement {m['token_agreement']:.3f} is below {c.min_token_agreement:g}")
    rise = m["repetition"] - m["reference_repetition"]
    if rise > c.max_repetition_increase:
        out.append(f"degenerate repetition: {m['repetition']:.2f} of 4-grams repeat in greedy continuations, "
                   f"PyTorch {m['reference_repetition']:.2f} (allowed rise {c.max_repetition_increase:g})")
    return out


# ---------------------------------------------------------------- classification

def classifier_reference(model: Any, tokenizer_json: Path, evals: EvalSet, labels: list[str],
                         max_length: int, template: str | None = None) -> Reference:
    """PyTorch's probabilities on the eval texts (or pairs: ``template`` as in the manifest),
    tokenized exactly as the runtime does."""
    import torch
    from tokenizers import Tokenizer

    from edgeft.runtime.classify import encode_inputs

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length)
    encs = encode_inputs(tok, list(evals.texts), max_length, template)
    import inspect

    types = "token_type_ids" in inspect.signature(model.forward).parameters
    probs = []
    with torch.no_grad():
        for e in encs:
            kw = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.ones(1, len(e.ids), dtype=torch.long)}
            if types:
                kw["token_type_ids"] = torch.tensor([e.type_ids])
            logits = model(**kw).logits.float()  # one logit: its sigmoid, as the runtime reads it
            probs.append((torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, -1))[0].numpy())
    probs = np.stack(probs)
    metrics = {"accuracy": _accuracy(probs, evals.labels, labels)}
    return Reference(metrics=metrics, probs=probs)


def _accuracy(probs: np.ndarray, gold: list[str] | None, labels: list[str]) -> float:
    if not gold:
        return float("nan")
    index = {name: i for i, name in enumerate(labels)}
    return float(np.mean([int(p.argmax()) == index[g] for p, g in zip(probs, gold)]))


def classifier_gate(artifact: Path, ref: Reference, evals: EvalSet, config: ExportConfig) -> GateResult:
    """Compare a classifier artifact, through ``edgeft.runtime.TextClassifier``, with the reference."""
    from edgeft.runtime import TextClassifier

    clf = TextClassifier.open(artifact, threads=config.threads)
    clf.predict_proba(evals.texts[:8])  # warm up before timing
    start = time.perf_counter()
    probs = clf.predict_proba(evals.texts)
    seconds = time.perf_counter() - start
    acc = _accuracy(probs, evals.labels, clf.labels)
    metrics = {
        "accuracy": acc,
        "reference_accuracy": ref.metrics["accuracy"],
        "accuracy_drop_points": 100.0 * (ref.metrics["accuracy"] - acc),
        **accuracy_drop_interval(ref.probs, probs, evals.labels, clf.labels),
        "label_agreement": float(np.mean(probs.argmax(1) == ref.probs.argmax(1))),
        "max_probability_diff": float(np.abs(probs - ref.probs).max()),
        "texts": len(evals.texts),
        "ms_per_text": 1000.0 * seconds / max(1, len(evals.texts)),
    }
    failures = _drop_failures(metrics, config)
    if metrics["label_agreement"] < config.min_label_agreement:
        failures.append(f"label agreement {metrics['label_agreement']:.4f} is below {config.min_label_agreement:g}")
    return GateResult(not failures, _round(metrics), failures, seconds)


def accuracy_drop_interval(ref_probs: np.ndarray, probs: np.ndarray, gold: list[str] | None,
                           labels: list[str], resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """How sure the accuracy drop is: a paired bootstrap 95% interval (in points) and McNemar's exact p.

    Both models judge the same texts, so the texts are resampled in pairs: the interval is
    that of the drop itself, not of two independent accuracies (seeded: the same inputs give
    the same interval). The drop is significant when McNemar's exact test on the texts only
    one of them got right says p < 0.05: with a handful of such texts the exact test holds
    where a percentile interval is too eager (4 texts worse, none better: p = 0.125).
    """
    if not gold:
        return {"accuracy_drop_ci95": None, "accuracy_drop_significant": False, "mcnemar_p": None}
    index = {name: i for i, name in enumerate(labels)}
    truth = np.array([index[g] for g in gold])
    ref_ok, art_ok = ref_probs.argmax(1) == truth, probs.argmax(1) == truth
    diff = ref_ok.astype(np.float64) - art_ok.astype(np.float64)
    rng = np.random.default_rng(0)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for 1,000 texts x 2,000 resamples
        rows = rng.integers(0, len(diff), size=(min(256, resamples - start), len(diff)))
        means[start:start + len(rows)] = diff[rows].mean(axis=1)
    lo, hi = (100.0 * float(q) for q in np.percentile(means, [2.5, 97.5]))
    worse, better = int((ref_ok & ~art_ok).sum()), int((~ref_ok & art_ok).sum())
    p = mcnemar_exact(worse, better)
    return {"accuracy_drop_ci95": [round(lo, 4), round(hi, 4)], "accuracy_drop_significant": bool(p < SIGNIFICANCE),
            "mcnemar_p": round(p, 6), "texts_worse": worse, "texts_better": better}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` texts only the reference got right, ``c`` only the candidate."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def _drop_failures(m: dict[str, Any], c: ExportConfig) -> list[str]:
    """Fail on a drop over the budget that the interval says is real, or on any drop over the hard ceiling."""
    drop, budget = m["accuracy_drop_points"], c.max_accuracy_drop
    ceiling = DROP_CEILING_FACTOR * budget
    ci = m["accuracy_drop_ci95"]
    what = (f"accuracy {m['accuracy']:.4f} is {drop:.2f} points below PyTorch's {m['reference_accuracy']:.4f}"
            + (f" (95% interval {ci[0]:.2f} to {ci[1]:.2f}; {m['texts_worse']} texts worse, "
               f"{m['texts_better']} better, McNemar p {m['mcnemar_p']:.3g})" if ci else ""))
    if drop > ceiling:
        return [f"{what}: over the hard ceiling of {ceiling:g} points ({DROP_CEILING_FACTOR:g}x the budget)"]
    if drop > budget and m["accuracy_drop_significant"]:
        return [f"{what}: significantly over the budget of {budget:g} points"]
    return []


# ---------------------------------------------------------------- embeddings

def embedding_reference(model: Any, tokenizer_json: Path, evals: EvalSet, spec: Any) -> Reference:
    """PyTorch's pooled vectors on the eval texts (``spec``: the manifest's ``Embedding``)."""
    from edgeft.export.embedding import torch_vectors

    vectors = torch_vectors(model, tokenizer_json, evals.texts, spec.pooling, spec.normalize, spec.max_length)
    return Reference(metrics={"texts": len(evals.texts)}, probs=vectors)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, dim] arrays (float64 maths)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def embedding_gate(artifact: Path, ref: Reference, evals: EvalSet, config: ExportConfig) -> GateResult:
    """Compare an embedding artifact, through ``edgeft.runtime.TextEmbedder``, with PyTorch's vectors."""
    from edgeft.runtime import TextEmbedder

    emb = TextEmbedder.open(artifact, threads=config.threads)
    emb.embed(evals.texts[:8])  # warm up before timing
    start = time.perf_counter()
    vectors = emb.embed(evals.texts)
    seconds = time.perf_counter() - start
    cos = cosines(vectors, ref.probs)
    metrics = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "texts": len(evals.texts),
               "ms_per_text": 1000.0 * seconds / max(1, len(evals.texts))}
    failures = []
    if metrics["mean_cosine"] < config.min_cosine:
        failures.append(f"mean cosine similarity to PyTorch's vectors {metrics['mean_cosine']:.4f} is below "
                        f"{config.min_cosine:g}")
    return GateResult(not failures, _round(metrics), failures, seconds)


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}


def thresholds(config: ExportConfig, task: Task) -> dict[str, float]:
    if task is Task.embedding:
        return {"min_mean_cosine": config.min_cosine}
    if task is Task.classification:
        return {"max_accuracy_drop_points": config.max_accuracy_drop,
                "accuracy_drop_ceiling_points": DROP_CEILING_FACTOR * config.max_accuracy_drop,
                "accuracy_drop_rule": "fail when the drop is over the budget and significant (McNemar exact "
                                      f"p < {SIGNIFICANCE:g}), or over the ceiling whatever the test says",
                "min_label_agreement": config.min_label_agreement}
    return {"max_perplexity_increase_pct": config.max_perplexity_increase,
            "min_token_agreement": config.min_token_agreement,
            "max_repetition_increase": config.max_repetition_increase}
