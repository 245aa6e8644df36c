"""Which GPU cards a CUDA `edgeft tune` fits on, COMPUTED from a stated formula (not measured).

No GPU was lent while this was written, so `benchmarks/gpu_tuning.py` has not measured the
1B, 3B and 8B shapes yet; until it does, the README's card table is this module's arithmetic,
marked as such. The formula follows what `edgeft tune` holds on CUDA (`edgeft/tune/model.py`):

- frozen blocks: bitsandbytes LLM.int8, 1 byte per weight of their Linear layers (plus one fp32
  scale per row, ignored);
- the embedding and an untied head: kept out of 8-bit and loaded in fp32 (4 bytes a weight; a
  tied head shares the embedding);
- the top N blocks, the final norm: fp32 weights, fp32 gradients and AdamW's two fp32 moments
  (16 bytes a weight);
- activations of the trained blocks under bf16 autocast: about 34 x hidden + 6 x intermediate
  bytes per token per block (attention's q, k, v, scores through flash/SDPA, the MLP's gate, up
  and product, norms, kept for backward), the frozen blocks' only transiently (no grad);
- logits: batch x length x vocab x 10 bytes (bf16 logits, their fp32 upcast for the loss, and
  its gradient);
- 0.8 GiB of CUDA context and allocator slack.

A card "fits" when the estimate is at most 90% of its memory. `python -m benchmarks.gpu_fit`
prints the table; the README's block is generated from `table()`.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
CARDS_GB = (8, 12, 16, 24)
CONTEXT_BYTES = 0.8 * GIB
TRAINED_BLOCKS, BATCH, LENGTH = 2, 4, 512


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def block_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * (self.heads * head_dim) * 2 + self.hidden * (self.kv_heads * head_dim) * 2
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden


SHAPES = (
    Shape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151_936, True),
    Shape("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128_256, True),
    Shape("Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128_256, True),
    Shape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128_256, False),
)


def estimate(s: Shape, trained: int = TRAINED_BLOCKS, batch: int = BATCH, length: int = LENGTH) -> float:
    """Peak CUDA bytes of `edgeft tune -n trained -b batch --max-length length` over an 8-bit base."""
    frozen = (s.layers - trained) * s.block_params() * 1
    embeddings = s.vocab * s.hidden * 4 * (1 if s.tied else 2)
    top = (trained * s.block_params() + s.hidden) * 16
    tokens = batch * length
    activations = tokens * trained * (34 * s.hidden + 6 * s.intermediate)
    logits = tokens * s.vocab * 10
    return frozen + embeddings + top + activations + logits + CONTEXT_BYTES


def table() -> str:
    head = " | ".join(f"{gb} GB" for gb in CARDS_GB)
    rows = [f"Computed, not measured (`benchmarks/gpu_fit.py` states the formula): `tune -n {TRAINED_BLOCKS} "
            f"-b {BATCH} --max-length {LENGTH}` over an 8-bit base on one CUDA card; fits = at most 90% of the "
            "card.", "", f"| base shape | estimated peak | {head} |", "|---|---|" + "---|" * len(CARDS_GB)]
    for s in SHAPES:
        need = estimate(s)
        fits = " | ".join("fits" if need <= 0.9 * gb * 1e9 else "no" for gb in CARDS_GB)
        rows.append(f"| {s.name} | {need / GIB:.1f} GiB | {fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
