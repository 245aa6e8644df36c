"""Export benchmark: artifact size, export time and the gate's figures per quantization scheme.

Cases: SmolLM2-135M-Instruct as pulled (gated on instruction prompts), SmolLM2 tuned on the
sonnets (a run folder, gated on its own eval data) and the MiniLM-L6 SST-2 classifier (a run
folder, gated on SST-2 dev). Each scheme is exported with ``--allow-degraded`` so a failing
gate still reports its figures; the table says which passed. ``auto`` reports what it chose.

    EDGEFT_HOME=/tmp/edgeft-home .venv/bin/python -m benchmarks.export_quality \\
        --out benchmarks/work/export [--sonnets-run RUN] [--sst2-run RUN] [--cases smollm2,sonnets,sst2]

Without ``--sonnets-run`` / ``--sst2-run`` those cases are skipped. Results:
``OUT/export_quality.json`` and ``OUT/export_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.data import shared_data

DECODER_SCHEMES = ("none", "int8", "int4", "mixed", "auto")
CLASSIFIER_SCHEMES = ("none", "int8", "auto")


def run_case(name: str, source: str, schemes: tuple[str, ...], out: Path, **kw) -> list[dict]:
    from edgeft.export import ExportConfig, export

    rows = []
    for scheme in schemes:
        dest = out / f"{name}-{scheme}"
        start = time.perf_counter()
        export(ExportConfig(source=source, out=dest, quantize=scheme, overwrite=True, allow_degraded=True, **kw))
        seconds = time.perf_counter() - start
        m = json.loads((dest / "manifest.json").read_text())
        g = m["gate"]
        rows.append({
            "case": name, "scheme": scheme, "chosen": g["chosen"], "passed": g["passed"],
            "mb": round(sum(f["size"] for f in m["files"].values()) / 1e6, 1),
            "export_s": round(seconds, 1), "metrics": g["metrics"], "failures": g["failures"],
            "groups": m["quantization"].get("groups"), "method": m["quantization"].get("method"),
            "tried": {k: v["passed"] for k, v in g["candidates"].items()},
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | --quantize | kept | gate | size MB | export s | figures |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        if "perplexity" in m:
            fig = (f"ppl {m['perplexity']:.2f} ({m['perplexity_increase_pct']:+.2f}%), "
                   f"greedy agreement {m['token_agreement']:.3f}, repeated 4-grams {m['repetition']:.2f} "
                   f"(PyTorch {m['reference_repetition']:.2f})")
        else:
            fig = (f"acc {m['accuracy']:.4f} (PyTorch {m['reference_accuracy']:.4f}, drop {m['accuracy_drop_points']:+.2f} pt), "
                   f"agreement {m['label_agreement']:.4f}, {m['ms_per_text']:.2f} ms/text")
        kept = r["chosen"] if r["scheme"] in ("auto", "int8") else ""
        lines.append(f"| {r['case']} | {r['scheme']} | {kept} | {'pass' if r['passed'] else 'FAIL'} | {r['mb']} "
                     f"| {r['export_s']} | {fig} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/work/export"))
    ap.add_argument("--cases", default="smollm2,sonnets,sst2")
    ap.add_argument("--sonnets-run", default=None, help="run folder: SmolLM2 tuned on the sonnets")
    ap.add_argument("--sst2-run", default=None, help="run folder: MiniLM-L6 tuned on SST-2")
    ap.add_argument("--schemes", default=None, help="comma-separated subset of schemes")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = set(args.cases.split(","))
    pick = (lambda s: tuple(x for x in s if x in args.schemes.split(","))) if args.schemes else (lambda s: s)
    rows: list[dict] = []
    if "smollm2" in cases:
        rows += run_case("smollm2-135m", "smollm2-135m-instruct", pick(DECODER_SCHEMES), args.out,
                         eval_data=shared_data() / "instruct" / "alpaca_small_2k.json", threads=args.threads)
    if "sonnets" in cases and args.sonnets_run:
        rows += run_case("smollm2-sonnets", args.sonnets_run, pick(DECODER_SCHEMES), args.out, threads=args.threads)
    if "sst2" in cases and args.sst2_run:
        rows += run_case("minilm-sst2", args.sst2_run, pick(CLASSIFIER_SCHEMES), args.out,
                         eval_data=shared_data() / "sst2" / "dev.tsv", threads=args.threads)
    (args.out / "export_quality.json").write_text(json.dumps(rows, indent=2))
    (args.out / "export_quality.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
