"""Which weights can go to 4 bits: each tensor group's cost in held-out perplexity, and the narrowest mix.

A tensor group is one weight-only quantizable MatMul of the exported fp32 graph: per block
the attention's input projection(s) (``qkv_proj`` when the builder packs them, else q/k/v),
its output projection, the MLP's gate/up/down; and the head, which carries the token
embedding when the two are tied. Each group is measured in PyTorch with simulated
quantization that is exactly what ``MatMulNBits`` will store: onnxruntime's own block
quantizer runs on the graph's [K, N] weight and the blocks are de-quantized back into the
torch model (``fake_quant``). The group goes to 4 bits while every other group sits at 8,
and the mean negative log-likelihood over a fixed set of held-out token ids is compared
with the all-8-bit model's: that rise is the group's cost. Blocks below the group are not
recomputed (their outputs are replayed from the all-8-bit run).

``measure`` spends at most a time budget, the groups that save the most bytes first;
a group left unmeasured stays at 8 bits. Results are cached under
``$EDGEFT_HOME/sensitivity/``, keyed by the sha256 of the weights, of the token ids and of
the quantization scheme, so a second export of the same model (or a run continued within a
bigger budget) measures only what is missing. ``choose`` then takes groups to 4 bits,
cheapest per byte saved first, while the predicted perplexity rise (the 8-bit baseline plus
the sum of the chosen groups' costs, each the KL divergence of its 4-bit model from the
all-8-bit one, which unlike a few hundred tokens' NLL rise is never negative) stays within a target; the export's gate then measures
the real artifact, and the pipeline narrows the target when it fails.

This module knows torch, the fp32 ONNX graph and onnxruntime's quantize kernels; it knows
nothing of the gate, the runtime or the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "sensitivity-v2"  # bump when what a cached figure means changes
CHUNK = 128  # tokens per scored row
BATCH = 4  # rows per forward pass


@dataclass
class Group:
    """One quantizable MatMul of the graph and the torch weights it was made from."""

    name: str  # "block.3.attn.qkv_proj", "head"
    node: str  # the ONNX MatMul node
    weight: str  # its initializer
    block: int | None
    params: int
    bytes4: int
    bytes8: int
    symmetric4: bool  # the head's 4-bit blocks stay symmetric (the embedding may share them)
    parts: list[tuple[str, int, int, bool]] = field(default_factory=list)  # (torch module, column, width, Linear?)

    @property
    def saving(self) -> int:
        return self.bytes8 - self.bytes4


@dataclass
class Sensitivity:
    """What ``measure`` found (or read from the cache): mean NLL per token, and each group's rise."""

    key: str
    reference_nll: float  # fp32
    baseline_nll: float  # every group at 8 bits
    tokens: int
    deltas: dict[str, float]  # group -> rise in mean NLL when it alone is at 4 bits
    baseline_kl: float = 0.0  # mean KL(fp32 || all at 8 bits) per token
    kl: dict[str, float] = field(default_factory=dict)  # group -> mean KL(all at 8 || it alone at 4) per token
    seconds: float = 0.0  # spent measuring, over every run that filled this cache entry
    from_cache: int = 0  # how many groups came from the cache this time

    def increase_pct(self, four_bit: Sequence[str]) -> float:
        """Predicted perplexity rise over fp32, in percent, with ``four_bit`` at 4 bits and the rest at 8.

        Costs are KL divergences, not label NLL rises: on a few hundred tokens a group's NLL rise is
        mostly noise of either sign (SmolLM2-135M: -4% to +15% per group), while the KL to the
        8-bit model's own predictions is never negative and adds up; for a small change the
        expected rise in NLL is that KL.
        """
        rise = self.baseline_kl + sum(self.kl[g] for g in four_bit)
        return 100.0 * (math.exp(rise) - 1.0)


@dataclass
class Choice:
    four_bit: list[str]
    predicted_pct: float
    target_pct: float
    why: str


# ---------------------------------------------------------------- the exact blocks MatMulNBits stores

def fake_quant(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """``w`` [K, N] as ``MatMulNBits`` will compute with it: quantized by onnxruntime's own kernel
    (blocks of ``block_size`` along K, per column), then de-quantized."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    kb = -(-k // block_size)
    padded = np.zeros((kb * block_size, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, kb, block_size * bits // 8), np.uint8)
    zero = np.zeros((n, -(-kb * bits // 8)), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, padded, scales, zero, block_size, n, kb * block_size, symmetric)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, block_size)
        z = np.stack([zero & 0x0F, zero >> 4], axis=-1).reshape(n, -1)[:, :kb] if not symmetric else 8
    else:
        q = packed.reshape(n, kb, block_size)
        z = zero[:, :kb] if not symmetric else 128
    z = np.broadcast_to(np.asarray(z, np.float32), (n, kb))
    deq = (q.astype(np.float32) - z[:, :, None]) * scales[:, :, None]
    return np.ascontiguousarray(deq.reshape(n, kb * block_size)[:, :k].T)


def stored_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of one quantized [K, N] weight: packed values, fp32 scales, zero points when asymmetric."""
    kb = -(-k // block_size)
    zero = 0 if symmetric else n * -(-kb * bits // 8)
    return n * kb * block_size * bits // 8 + 4 * n * kb + zero


# ---------------------------------------------------------------- groups: graph MatMuls <-> torch weights

def groups(graph_path: Path, model: Any, vocab_size: int, block_size: int) -> tuple[list[Group], list[str]]:
    """The graph's quantizable MatMuls, each tied to the torch weights it holds; also the names of
    MatMuls no torch weight matched (they stay at 8 bits, unmeasured)."""
    from onnx import numpy_helper

    from edgeft.export import quantize

    onnx_model = quantize.load(graph_path)
    quantize.gemm_to_matmul(onnx_model)
    inits = {t.name: t for t in onnx_model.graph.initializer}
    index = _torch_columns(model)
    out, unmatched = [], []
    for t in quantize.matmul_targets(onnx_model, vocab_size):
        w = numpy_helper.to_array(inits[t.weight])
        parts = _match(w, index)
        if parts is None:
            unmatched.append(t.node)
            continue
        k, n = w.shape
        head = t.group == "head"
        out.append(Group(name="head" if head else _group_name(t.node, t.group), node=t.node, weight=t.weight,
                         block=None if head or t.group == "other" else int(t.group.split(".")[1]), params=k * n,
                         bytes4=stored_bytes(k, n, 4, block_size, head), bytes8=stored_bytes(k, n, 8, block_size, True),
                         symmetric4=head, parts=parts))
    return out, unmatched


def _group_name(node: str, group: str) -> str:
    """``/model/layers.3/attn/qkv_proj/MatMul`` -> ``block.3.attn.qkv_proj``: the path below the block."""
    from edgeft.export.quantize import block_of

    segs = [s for s in node.split("/") if s]
    below = next((i for i, s in enumerate(segs) if block_of(s) is not None), None)
    tail = segs[below + 1:-1] if below is not None else segs[:-1]
    return ".".join([group, *tail]) if tail else f"{group}.{node}"


def _torch_columns(model: Any) -> dict[bytes, list[tuple[str, np.ndarray, bool]]]:
    """Every 2-D torch weight as the [K, N] matrix a MatMul would hold, indexed by its first values."""
    index: dict[bytes, list[tuple[str, np.ndarray, bool]]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        kind = type(mod).__name__
        if w is None or w.dim() != 2 or kind not in ("Linear", "Conv1D"):
            continue
        linear = kind == "Linear"
        kn = (w.detach().T if linear else w.detach()).float().numpy()
        index.setdefault(kn[0, :4].tobytes(), []).append((name, kn, linear))
    return index


def _match(w: np.ndarray, index: dict) -> list[tuple[str, int, int, bool]] | None:
    """The torch weights that lie side by side in ``w``'s columns (q, k, v packed into one), or None."""
    parts, col = [], 0
    while col < w.shape[1]:
        found = next(((n, kn, lin) for n, kn, lin in index.get(w[0, col:col + 4].tobytes(), [])
                      if kn.shape[0] == w.shape[0] and col + kn.shape[1] <= w.shape[1]
                      and np.array_equal(kn, w[:, col:col + kn.shape[1]])), None)
        if found is None:
            return None
        parts.append((found[0], col, found[1].shape[1], found[2]))
        col += found[1].shape[1]
    return parts


# ---------------------------------------------------------------- measuring

def chunks(seqs: Sequence[Sequence[int]], tokens: int) -> np.ndarray:
    """Held-out token ids laid end to end and cut into rows of ``CHUNK``: at most ``tokens`` of them."""
    flat = [t for s in seqs for t in s][:max(CHUNK, tokens)]
    rows = len(flat) // CHUNK
    if rows == 0:
        return np.array([flat], np.int64) if len(flat) >= 2 else np.zeros((0, 0), np.int64)
    return np.array(flat[:rows * CHUNK], np.int64).reshape(rows, CHUNK)


def weights_sha256(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, ids: np.ndarray, block_size: int, names: Sequence[str]) -> str:
    scheme = {"method": METHOD, "low": "int4 asymmetric (head symmetric)", "rest": "int8 symmetric",
              "block_size": block_size, "chunk": CHUNK}
    parts = [weights, hashlib.sha256(ids.tobytes()).hexdigest(), json.dumps(scheme, sort_keys=True),
             hashlib.sha256("\n".join(names).encode()).hexdigest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_path(key: str) -> Path:
    from edgeft.artifact import cache_root

    return cache_root() / "sensitivity" / f"{key[:40]}.json"


def _load_cache(key: str) -> Sensitivity | None:
    try:
        d = json.loads(cache_path(key).read_text())
        return Sensitivity(**d) if d.get("key") == key else None
    except (OSError, ValueError, TypeError):
        return None


def _save_cache(s: Sensitivity) -> None:
    from edgeft.fsutil import atomic_write_bytes

    path = cache_path(s.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({**asdict(s), "from_cache": 0}, indent=1, sort_keys=True).encode())


def measure(model: Any, found: list[Group], ids: np.ndarray, block_size: int, budget_s: float,
            progress: bool = True, log: Callable[[str], None] = lambda _m: None) -> Sensitivity:
    """Each group's rise in held-out NLL at 4 bits (the rest at 8), within ``budget_s`` seconds, cached.

    The torch model's weights are changed while measuring and restored before this returns.
    """
    key = cache_key(weights_sha256(model), ids, block_size, [g.name for g in found])
    cached = _load_cache(key)
    todo = [g for g in sorted(found, key=lambda g: -g.saving) if cached is None or g.name not in cached.deltas]
    if cached is not None and not todo:
        cached.from_cache = len(cached.deltas)
        return cached
    start = time.perf_counter()
    sim = _Simulator(model, found, block_size)
    try:
        reference, _ = sim.score(ids, keep=True)  # fp32 log-probs kept: the 8-bit model's KL is against them
        sim.set_all(8)
        baseline, baseline_kl = sim.score(ids, keep=True)  # now the 8-bit ones, and every block's output
        done = cached or Sensitivity(key, reference, baseline, int(ids.size - len(ids)), {}, baseline_kl)
        result = Sensitivity(key, reference, baseline, int(ids.size - len(ids)), dict(done.deltas), baseline_kl,
                             dict(done.kl), done.seconds, len(done.deltas))
        _measure_groups(sim, todo, ids, result, start, budget_s, progress)
    finally:
        sim.restore()
    result.seconds += time.perf_counter() - start
    _save_cache(result)
    left = len(found) - len(result.deltas)
    if left:
        log(f"sensitivity: time budget of {budget_s:g} s spent; {left} of {len(found)} groups unmeasured "
            "(they stay at 8 bits; a later export continues from the cache)")
    return result


def _measure_groups(sim: _Simulator, todo: list[Group], ids: np.ndarray, result: Sensitivity, start: float,
                    budget_s: float, progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="sensitivity", unit="group", leave=False, disable=not progress)
    for g in bar:
        if time.perf_counter() - start > budget_s:
            break
        sim.set(g, 4)
        nll, kl = sim.score(ids, replay_below=g.block)
        result.deltas[g.name], result.kl[g.name] = nll - result.baseline_nll, kl
        sim.set(g, 8)
        bar.set_postfix_str(g.name)
    bar.close()


class _Simulator:
    """The torch model with each group's weights settable to 8 or 4 bits (de-quantized), and a
    forward pass that replays the all-8-bit outputs of the blocks below a given one."""

    def __init__(self, model: Any, found: list[Group], block_size: int) -> None:
        import torch

        self.model, self.found, self.block_size, self.torch = model, found, block_size, torch
        self.modules = dict(model.named_modules())
        names = {p[0] for g in found for p in g.parts}
        self.original = {n: self.modules[n].weight.detach().clone() for n in names}
        self.kn = {g.name: self._kn(g) for g in found}
        self.deq8: dict[str, np.ndarray] = {}  # the 8-bit blocks, kept: every group returns to them
        self.layers = _decoder_layers(model)
        self.outputs: list[list[Any]] = []
        self.logps: list[Any] = []  # per batch: the log-probs the next scores' KL is measured from

    def _kn(self, g: Group) -> np.ndarray:
        cols = [(self.original[n].T if lin else self.original[n]).float().numpy() for n, _, _, lin in g.parts]
        return np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]

    def set(self, g: Group, bits: int) -> None:
        if bits == 8:
            if g.name not in self.deq8:
                self.deq8[g.name] = fake_quant(self.kn[g.name], 8, self.block_size, True)
            deq = self.deq8[g.name]
        else:
            deq = fake_quant(self.kn[g.name], bits, self.block_size, g.symmetric4)
        for name, col, width, linear in g.parts:
            block = deq[:, col:col + width]
            w = self.modules[name].weight
            w.data.copy_(self.torch.from_numpy(np.ascontiguousarray(block.T if linear else block)))

    def set_all(self, bits: int) -> None:
        for g in self.found:
            self.set(g, bits)

    def restore(self) -> None:
        for name, w in self.original.items():
            self.modules[name].weight.data.copy_(w)

    def score(self, ids: np.ndarray, replay_below: int | None = None, keep: bool = False) -> tuple[float, float]:
        """(mean NLL, mean KL from the kept log-probs) per scored token at the current weights.

        Blocks below ``replay_below`` return their recorded outputs; ``keep`` records this run's
        block outputs and log-probs for later runs to replay and compare with.
        """
        swapped = list(range(min(replay_below, len(self.layers)))) if (
            replay_below is not None and self.layers is not None and self.outputs) else []
        hooks, state = [], {"batch": 0}
        if keep and self.layers is not None:
            self.outputs = []
            hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: self._keep(state, i, out))
                     for i, layer in enumerate(self.layers)]
        logps, nll, kl, count = [], 0.0, 0.0, 0
        try:
            for b, batch in enumerate(self._batches(ids)):
                state["batch"] = b
                if keep and self.layers is not None:
                    self.outputs.append([None] * len(self.layers))
                originals = [self.layers[i] for i in swapped]
                for i in swapped:
                    self.layers[i] = _replay(self.outputs[b][i])
                try:
                    logp = self._logp(batch)
                finally:
                    for i, mod in zip(swapped, originals):
                        self.layers[i] = mod
                nll += float(-logp.gather(-1, batch[:, 1:, None]).sum())
                if self.logps:
                    ref = self.logps[b]
                    kl += float((ref.exp() * (ref - logp)).sum())
                count += batch[:, 1:].numel()
                if keep:
                    logps.append(logp)
        finally:
            for h in hooks:
                h.remove()
        if keep:
            self.logps = logps
        return nll / max(1, count), kl / max(1, count)

    def _keep(self, state: dict, i: int, out: Any) -> None:
        self.outputs[state["batch"]][i] = out

    def _batches(self, ids: np.ndarray):
        for start in range(0, len(ids), BATCH):
            yield self.torch.from_numpy(ids[start:start + BATCH])

    def _logp(self, batch: Any) -> Any:
        """Log-probabilities of the next token at every scored position: [rows, len - 1, vocab]."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=batch, use_cache=False).logits.float()
            return torch.log_softmax(logits[:, :-1], dim=-1)


def _replay(output: Any) -> Any:
    """A module that stands in for a decoder block: it returns what the block returned in the all-8-bit run."""
    import torch

    class Replay(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return output

    return Replay()


def _decoder_layers(model: Any):
    """The ModuleList of decoder blocks (``model.layers``, ``transformer.h``...), or None."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name.split(".")[-1] in ("layers", "h", "blocks"):
            return mod
    return None


# ---------------------------------------------------------------- choosing

def choose(found: list[Group], sens: Sensitivity, target_pct: float) -> Choice:
    """The most bytes at 4 bits whose predicted perplexity rise stays within ``target_pct``: groups
    taken cheapest (KL) per byte saved first, any that would overshoot skipped (greedy knapsack)."""
    measured = [g for g in found if g.name in sens.kl]
    order = sorted(measured, key=lambda g: (sens.kl[g.name] / max(1, g.saving), g.name))
    chosen: list[str] = []
    for g in order:
        if sens.increase_pct([*chosen, g.name]) <= target_pct:
            chosen.append(g.name)
    saved = sum(g.saving for g in found if g.name in chosen)
    total8 = sum(g.bytes8 for g in found)
    predicted = sens.increase_pct(chosen)
    why = (f"{len(chosen)} of {len(found)} groups at 4 bits ({saved / max(1, total8):.0%} of the 8-bit matmul bytes "
           f"saved), predicted perplexity {predicted:+.2f}% (target {target_pct:+.2f}%; all at 8 bits "
           f"{sens.increase_pct([]):+.2f}%), cheapest rise per byte first; "
           f"{len(found) - len(measured)} unmeasured groups stay at 8 bits")
    return Choice(chosen, predicted, target_pct, why)
