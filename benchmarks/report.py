"""Writers: a suite result -> a Markdown report and PNG charts.

The Markdown opens with the headline ratios (edgeft / alternative) and the goals, then
one table per case with every figure as median [q1-q3] and the machine it ran on.
Charts are matplotlib bar charts (Agg backend, no display needed), one per case that
has figures. This module formats; it measures nothing.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.headline import goals, headline_ratios
from benchmarks.schema import Measurement, SuiteResult
from edgeft.bench import Stat, isa_summary

CASE_TITLES = {
    "generation": "Generation: SmolLM2-135M-Instruct",
    "bandwidth": "The physical limit: memory bandwidth / weight bytes per token",
    "classification": "Classification: MiniLM-L6 tuned on SST-2",
    "quality": "Quality",
    "tuning": "Tuning: same model, data and steps",
    "footprint": "Footprint",
    "profile": "Where edgeft's decode time goes (profile)",
    "peers": "Native peers: alternating rounds, each system at its own thread defaults",
    "tune_minilm_sst2": "Tuning MiniLM-L6 on SST-2: top 2 over int8 beside full fine-tuning",
    "tune_smollm2_sonnets": "Tuning SmolLM2-135M on the sonnets: top 4 over int8",
}  # a case without a title here is shown under its name


def fmt(x: float) -> str:
    """A figure with 3 significant digits, plain for ordinary magnitudes."""
    if x != x:  # NaN
        return "n/a"
    if x == float("inf"):
        return "inf"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1 or a == 0:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_value(m: Measurement) -> str:
    if isinstance(m.value, Stat):
        v = m.value
        return f"{fmt(v.median)} [{fmt(v.q1)}-{fmt(v.q3)}]"
    return fmt(float(m.value))


def _params_key(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def case_table(res: SuiteResult, case: str) -> str:
    """Rows = systems, columns = metric(+params) of that case."""
    ms = [m for m in res.measurements if m.case == case]
    cols: list[tuple[str, str, str]] = []  # (metric, params key, unit)
    for m in ms:
        key = (m.metric, _params_key(m.params), m.unit)
        if key not in cols:
            cols.append(key)
    headers = ["system"] + [f"{metric}{f' ({p})' if p else ''} [{unit}]" for metric, p, unit in cols]
    rows = []
    for system in res.systems(case):
        row = [system]
        for metric, p, _ in cols:
            hit = next((m for m in ms if m.system == system and m.metric == metric
                        and _params_key(m.params) == p), None)
            row.append(fmt_value(hit) if hit else "")
        rows.append(row)
    return md_table(headers, rows)


def headline_table(res: SuiteResult) -> str:
    rows = [[r.label, f"**{fmt(r.value)}x**", f"{fmt(r.low)}-{fmt(r.high)}"] for r in headline_ratios(res)]
    return md_table(["ratio (edgeft / alternative)", "median", "range (quartiles)"], rows)


def goals_table(res: SuiteResult) -> str:
    rows = [[g.name, "" if g.value is None else fmt(g.value), f"{g.kind} {fmt(g.target)}", g.verdict]
            for g in goals(res)]
    return md_table(["goal", "measured", "target", "verdict"], rows)


def gates_table(res: SuiteResult) -> str:
    def figures(metrics: dict) -> str:
        return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))

    rows = [[g.system, g.case, "passed" if g.passed else "**failed**", g.chosen,
             figures(g.metrics) or ("(verdict read from a note: a result from before gates were fields)"
                                    if g.origin == "note" else ""), "; ".join(g.failures)] for g in res.gates]
    return md_table(["system", "case", "gate", "kept", "figures", "failures"], rows)


def env_lines(res: SuiteResult) -> list[str]:
    e = res.env
    vers = ", ".join(f"{k} {v}" for k, v in sorted(e.versions.items()))
    lines = [f"- Machine: {e.cpu}, {e.cores} cores, {e.memory_gib:.0f} GiB; host `{e.host}`; {e.date}",
             f"- Instruction sets: {isa_summary(e.isa)}: {' '.join(e.isa)}" if e.isa else
             "- Instruction sets: not recorded (results from before the suite recorded them)",
             f"- Threads per system: {e.threads}; Python {e.python}",
             f"- Versions: {vers}",
             f"- Every figure: median [first-third quartile] of several runs after a warm-up"
             f"{' (quick run: fewer repeats and tokens)' if e.quick else ''}; suite took {res.seconds / 60:.1f} min"]
    if e.shared_machine:
        lines.append(f"- Note: {e.shared_machine}")
    if e.load_average:
        lines.append(f"- Load average at start: {', '.join(f'{x:.2f}' for x in e.load_average)}")
    return lines


def write_markdown(res: SuiteResult, path: Path, charts: list[Path] | None = None) -> Path:
    """The full report: headline, goals, environment, one table per case, skips, notes."""
    parts = ["# edgeft benchmarks", "", "## Headline", "", headline_table(res), "",
             "## Goals", "", goals_table(res), "", "## Environment", "", *env_lines(res), ""]
    cases = list(dict.fromkeys([*CASE_TITLES, *(m.case for m in res.measurements)]))
    for case in cases:
        title = CASE_TITLES.get(case, case)
        if any(m.case == case for m in res.measurements):
            parts += [f"## {title}", "", case_table(res, case), ""]
            notes = sorted({m.note for m in res.measurements if m.case == case and m.note})
            parts += [f"- {n}" for n in notes] + ([""] if notes else [])
    if res.gates:
        parts += ["## Export gates (from the artifacts' manifests)", "", gates_table(res), ""]
    if res.skipped:
        parts += ["## Skipped", ""] + [f"- {s.case} / {s.system}: {s.reason}" for s in res.skipped] + [""]
    if res.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    for c in charts or []:
        parts += [f"![{c.stem}]({c.name})", ""]
    Path(path).write_text("\n".join(parts))
    return Path(path)


# ---------------------------------------------------------------- charts

CHARTS = {  # chart name -> (case, metric, title, unit label)
    "decode": ("generation", "decode_tps", "Decode tokens/s (higher is better)"),
    "prefill": ("generation", "prefill_tps", "Prefill tokens/s (higher is better)"),
    "bandwidth": ("bandwidth", "bandwidth_share", "Share of the memory-bandwidth limit"),
    "classification": ("classification", "throughput", "Classification texts/s (higher is better)"),
    "tuning": ("tuning", None, "Tuning: peak memory, time per step, metric"),
}


def _bar_chart(ax, ms: list[Measurement], title: str) -> None:
    groups = sorted({_params_key(m.params) for m in ms})
    systems = list(dict.fromkeys(m.system for m in ms))
    width = 0.8 / max(len(groups), 1)
    for gi, g in enumerate(groups):
        xs, hs, errs = [], [], [[], []]
        for si, s in enumerate(systems):
            hit = next((m for m in ms if m.system == s and _params_key(m.params) == g), None)
            if hit is None:
                continue
            xs.append(si + gi * width)
            hs.append(hit.median)
            lo, hi = (hit.value.q1, hit.value.q3) if isinstance(hit.value, Stat) else (hit.median, hit.median)
            errs[0].append(max(hit.median - lo, 0))
            errs[1].append(max(hi - hit.median, 0))
        ax.bar(xs, hs, width, yerr=errs, capsize=2, label=g or None)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(systems))])
    ax.set_xticklabels(systems, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if any(groups):
        ax.legend(fontsize=7)


def write_charts(res: SuiteResult, folder: Path, stem: str) -> list[Path]:
    """One PNG per chart that has data; returns the files written (none where matplotlib is absent)."""
    try:
        import matplotlib
    except ImportError:
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, (case, metric, title) in CHARTS.items():
        if metric is None:
            ms_all = [m for m in res.measurements if m.case == case]
            metrics = list(dict.fromkeys(m.metric for m in ms_all))
            if not metrics:
                continue
            fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), squeeze=False)
            for ax, met in zip(axes[0], metrics):
                sel = [m for m in ms_all if m.metric == met]
                _bar_chart(ax, sel, f"{met} [{sel[0].unit}]")
            fig.suptitle(title)
        else:
            ms = [m for m in res.measurements if m.case == case and m.metric == metric]
            if not ms:
                continue
            fig, ax = plt.subplots(figsize=(max(6, len(set(m.system for m in ms)) * 0.9), 4))
            _bar_chart(ax, ms, f"{title} [{ms[0].unit}]")
        fig.tight_layout()
        path = Path(folder) / f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
