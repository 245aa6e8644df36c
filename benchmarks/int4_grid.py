"""Can onnxruntime's 4-bit matmul hold the shipped Q4_1 weights without a second rounding?

    .venv/bin/python -m benchmarks.int4_grid [--model DIR] [--out benchmarks/results/int4_grid.md]

The bundled SmolLM2 comes as a Q4_1 GGUF: each block of 32 weights is ``m + d*q`` with a float
offset ``m`` and ``q`` in 0..15, and edgeft's reference fp32 weights are exactly those values.
``MatMulNBits`` stores ``s*(q - z)`` with an integer zero point ``z`` (uint8, 0..15), so it holds a
Q4_1 block exactly only when ``-m/d`` happens to be an integer; a float zero point would hold it,
and the op accepts one. This measures both sides of that:

- representation: per weight matrix, whether the values lie on a 16-level grid (Q4_1) or a
  255-level one (Q8_0), and the relative RMS error of re-quantizing them as ``MatMulNBits`` does
  (min/max asymmetric, integer zero point), of the best integer-zero-point (scale, zero) per block
  found by a grid search, and of edgeft's own 8-bit symmetric blocks
  (``edgeft.export.quantize.block_quantize_rows``);
- speed: one ``MatMulNBits`` (4 bits, block 32, accuracy level 4, one thread, M = 1) with uint8
  and with float zero points, alternating, at the MLP's shape.

It knows safetensors files and onnxruntime's contrib op; of edgeft's export only its 8-bit block
quantizer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgeft.bench import cpu_isa, cpu_name, isa_summary
from edgeft.export.quantize import block_quantize_rows

BLOCK = 32
MATRICES = ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.10.self_attn.q_proj.weight", "model.layers.10.self_attn.v_proj.weight",
            "model.layers.10.mlp.down_proj.weight", "model.layers.29.mlp.up_proj.weight")


def _rel(rec: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((rec - b) ** 2).sum() / (b ** 2).sum()))


def representation(w: np.ndarray, search_rows: int = 20000) -> dict:
    b = w.astype(np.float32).reshape(-1, BLOCK)
    mn, mx = b.min(-1), b.max(-1)
    d = np.where(mx > mn, (mx - mn) / 15, 1e-12)
    off16 = (b - mn[:, None]) / d[:, None]
    on16 = float(np.abs(off16 - np.round(off16)).max())
    data, scales = block_quantize_rows(b, 8, BLOCK)  # one block a row
    r8 = (data.astype(np.float32) - 128) * scales
    z = np.clip(np.round(-mn / d), 0, 15)
    q = np.clip(np.round(b / d[:, None] + z[:, None]), 0, 15)
    minmax = _rel((q - z[:, None]) * d[:, None], b)
    sub, dsub = b[:search_rows], d[:search_rows]
    best = np.full(len(sub), np.inf)
    for f in np.linspace(0.85, 1.3, 91):  # the scale around d, every integer zero point
        s = dsub * f
        for zz in range(16):
            qq = np.clip(np.round(sub / s[:, None] + zz), 0, 15)
            best = np.minimum(best, (((qq - zz) * s[:, None] - sub) ** 2).sum(-1))
    return {"shape": list(w.shape), "q4_1_grid": on16 < 1e-3, "q8_0_grid": _rel(r8, b) < 1e-6,
            "int4_minmax": minmax, "int4_best": float(np.sqrt(best.sum() / (sub ** 2).sum())),
            "int8_sym": _rel(r8, b)}


def _nbits_model(k: int, n: int, zero: str, rng) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    nb = k // BLOCK
    q = rng.integers(0, 16, (n, nb, BLOCK), dtype=np.uint8)
    inits = [numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), "B"),
             numpy_helper.from_array(rng.random(n * nb, dtype=np.float32) * 0.01, "S")]
    if zero == "uint8":
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, (nb + 1) // 2), dtype=np.uint8), "Z"))
    else:
        inits.append(numpy_helper.from_array(rng.random(n * nb, dtype=np.float32) * 15, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=BLOCK, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def speed(k: int = 576, n: int = 3072, rounds: int = 3, calls: int = 500) -> dict[str, list[float]]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a = rng.standard_normal((1, k), dtype=np.float32)
    sessions = {z: ort.InferenceSession(_nbits_model(k, n, z, rng), so) for z in ("uint8", "float")}
    out: dict[str, list[float]] = {z: [] for z in sessions}
    for _ in range(rounds):
        for z, s in sessions.items():
            for _ in range(20):
                s.run(None, {"A": a})
            t = time.perf_counter()
            for _ in range(calls):
                s.run(None, {"A": a})
            out[z].append((time.perf_counter() - t) / calls * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/edgeft/models/smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int4_grid.md")
    args = ap.parse_args()
    from safetensors.numpy import load_file

    weights = load_file(str(args.model / "model.safetensors"))
    lines = [f"# {__doc__.splitlines()[0]}", "",
             f"`python -m benchmarks.int4_grid --model {args.model}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
             f" CPU: {cpu_name()}, {isa_summary(cpu_isa())} ({' '.join(cpu_isa())}).", "",
             "| matrix | shape | on a Q4_1 grid | on a Q8_0 grid | int4, min/max, integer zero | int4, best integer zero"
             " (searched, first 20k blocks) | int8 symmetric |", "|---|---|---|---|---|---|---|"]
    for name in MATRICES:
        r = representation(weights[name])
        lines.append(f"| `{name}` | {r['shape']} | {'yes' if r['q4_1_grid'] else 'no'} | "
                     f"{'yes' if r['q8_0_grid'] else 'no'} | {r['int4_minmax']:.2%} | {r['int4_best']:.2%} | "
                     f"{r['int8_sym']:.3%} |")
    sp = speed()
    med = {z: float(np.median(v)) for z, v in sp.items()}
    lines += ["", "Relative RMS error of the re-quantized weights against the reference values.", "",
              "| MatMulNBits zero points (K 576, N 3072, 4 bits, block 32, accuracy level 4, 1 thread, M 1) |"
              " µs per call (median of 3 alternating rounds of 500) | rounds |", "|---|---|---|"]
    lines += [f"| {z} | {med[z]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |" for z, v in sp.items()]
    lines += ["", f"Float zero points cost {med['float'] / med['uint8']:.0f}x the uint8 ones per call."]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
