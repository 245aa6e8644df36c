"""Case ``export_quality``: artifact size, export time and the gate's figures per quantization scheme.

    python -m benchmarks.run --cases export_quality      # BENCH_QUICK=1: the pulled SmolLM2 at int8 only

Sources: SmolLM2-135M-Instruct as pulled (gated on instruction prompts), SmolLM2 tuned on the
sonnets (the quality case's run folder, gated on its own eval data) and the MiniLM-L6 SST-2
classifier (the classification case's run folder, gated on SST-2 dev); the runs are made (and
cached) when missing. Each scheme is exported by ``edgeft export`` with ``--allow-degraded`` so a
failing gate still reports its figures; every gate is recorded as a field of the result
(``SuiteResult.gates``: verdict, the candidate kept, its figures and failures) and its figures also
as measurements. ``auto`` reports what it chose. Artifacts are the suite's (cached in work/, shared
with the generation and classification cases).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "export_quality"
DECODER_SCHEMES = ("fp32", "int8", "int4", "mixed", "auto")
CLASSIFIER_SCHEMES = ("fp32", "int8", "auto")
UNITS = {"perplexity_increase_pct": "%", "accuracy_drop_points": "points", "ms_per_text": "ms"}


def case(ctx: Context) -> None:
    from benchmarks.cases import lm_artifact, sonnets_run, sst2_run

    sources = [("smollm2-135m", DECODER_SCHEMES if not ctx.quick else ("int8",), lambda q: lm_artifact(ctx, q))]
    if not ctx.quick:
        sources += [("smollm2-sonnets", DECODER_SCHEMES, lambda q: lm_artifact(ctx, q, str(sonnets_run(ctx)), "sonnets")),
                    ("minilm-sst2", CLASSIFIER_SCHEMES,
                     lambda q: prepare.ensure_exported(f"minilm-sst2-{q}", sst2_run(ctx), q))]
    for label, schemes, make in sources:
        for scheme in schemes:
            system = f"{label} --quantize {scheme}"
            try:
                record(ctx, system, make(scheme))
            except prepare.Unavailable as exc:
                ctx.res.skip(CASE, system, str(exc))


def record(ctx: Context, system: str, art) -> None:
    from benchmarks.cases import record_gate

    m = json.loads((art / "manifest.json").read_text())
    record_gate(ctx, CASE, system, art)
    g = m["gate"]
    tried = ", ".join(f"{k} {'passed' if v['passed'] else 'failed'}" for k, v in g.get("candidates", {}).items())
    ctx.add(CASE, system, "passed", float(bool(g["passed"])), "yes=1",
            note=f"{system}: kept {g.get('chosen')} ({m['quantization'].get('method', '')}); tried: {tried}")
    ctx.add(CASE, system, "artifact_mb", sum(f["size"] for f in m["files"].values()) / 1e6, "MB", higher=False)
    secs = prepare.logged_seconds("export", art.name) or g.get("export_seconds")
    if secs:
        ctx.add(CASE, system, "export_s", secs, "s", higher=False)
    for k, v in g.get("metrics", {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            ctx.add(CASE, system, k, v, UNITS.get(k, ""), higher=k not in UNITS and k != "repetition")
