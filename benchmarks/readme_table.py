"""The README's generated blocks: the current-results table (from one `peers` results file) and
the supported architectures (from ``edgeft.export.architectures``).

    python -m benchmarks.readme_table benchmarks/results/2026-12-04-vm-peers-avx512-offsets8.json

prints the Markdown block the README carries between its ``results`` markers: the machine
(CPU, instruction sets, date, load average) from the file's ``env``, then one row per system
with its perplexity against fp32, decode and 512-token prefill tokens/s, and the classifier
rows. ``--write`` replaces the block in README.md; ``tests/test_readme.py`` checks that the
README's block is what this prints for the file it names, so no figure there is typed by hand.

Blocks between ``<!-- generated: MODULE.FUNCTION -->`` and ``<!-- /generated -->`` (in the README
and in docs/) are that function's output; ``--write`` renders them too, and the test checks them.

It knows the results schema (``benchmarks/schema.py``'s JSON) and nothing about how the
figures were measured: the results file and its Markdown twin say that.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"<!-- results: (?P<file>\S+) -->\n")
END = "<!-- /results -->"
GENERATED = re.compile(r"<!-- generated: (?P<fn>[\w.]+) -->\n(?P<body>.*?)<!-- /generated -->", re.S)
PAGES = ("README.md", "docs/*.md")
ISA_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def _median(value: object) -> float:
    return float(value["median"]) if isinstance(value, dict) else float(value)  # type: ignore[arg-type]


def _by_system(results: dict) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for m in results["measurements"]:
        table.setdefault(m["system"], {})[m["metric"]] = _median(m["value"])
    return table


def machine_line(env: dict) -> str:
    isa = [f for f in ISA_SHOWN if f in env.get("isa", [])]
    load = env.get("load_average") or []
    load_text = f", load average {load[0]:.2f}" if load else ""
    return (f"{env['date']}, {env['cpu']} ({', '.join(isa) or 'no AVX2'}), {env['cores']} cores, "
            f"{env['threads']} threads{load_text}; onnxruntime {env['versions'].get('onnxruntime', '?')}")


def render(path: Path) -> str:
    results = json.loads(path.read_text())
    rows = _by_system(results)
    out = [f"Measured {machine_line(results['env'])}; from `{path.relative_to(REPO)}`:", "",
           "| system | perplexity vs fp32 | decode tok/s | prefill 512 tok/s |", "|---|---|---|---|"]
    for system, m in rows.items():
        if "decode_tps" not in m:
            continue
        ppl = f"{m['ppl_vs_fp32']:+.2f}%" if "ppl_vs_fp32" in m else "-"
        out.append(f"| {system} | {ppl} | {m['decode_tps']:.0f} | {m.get('prefill_tps', float('nan')):,.0f} |")
    classifiers = [(s, m) for s, m in rows.items() if "throughput" in m]
    if classifiers:
        out += ["", "| classifier (MiniLM-L6, SST-2 dev, batch 32) | texts/s | accuracy |", "|---|---|---|"]
        out += [f"| {s.removesuffix(' (classifier)')} | {m['throughput']:.0f} | {m.get('accuracy', float('nan')):.1f}% |"
                for s, m in classifiers]
    return "\n".join(out) + "\n"


def readme_block(readme: str) -> tuple[Path, str] | None:
    """(the results file the README names, the block it carries now), or None without markers."""
    start = BEGIN.search(readme)
    if not start:
        return None
    end = readme.index(END, start.end())
    return REPO / start["file"], readme[start.end():end]


def write(readme_path: Path = REPO / "README.md") -> None:
    readme = readme_path.read_text()
    found = readme_block(readme)
    if found is None:
        raise SystemExit("README.md has no '<!-- results: FILE -->' marker")
    start = BEGIN.search(readme)
    assert start is not None
    end = readme.index(END, start.end())
    readme_path.write_text(readme[:start.end()] + render(found[0]) + readme[end:])


def generated(fn: str) -> str:
    """What the block named ``module.function`` holds: the function's output and a final newline."""
    module, _, name = fn.rpartition(".")
    return getattr(importlib.import_module(module), name)().rstrip("\n") + "\n"


def generated_blocks(text: str) -> list[tuple[str, str]]:
    """(function name, the block's text now) for every generated block of a page."""
    return [(m["fn"], m["body"]) for m in GENERATED.finditer(text)]


def write_generated() -> None:
    for page in (p for pattern in PAGES for p in sorted(REPO.glob(pattern))):
        text = page.read_text()
        new = GENERATED.sub(lambda m: f"<!-- generated: {m['fn']} -->\n{generated(m['fn'])}<!-- /generated -->", text)
        if new != text:
            page.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, help="a results JSON (default: the one README.md names)")
    parser.add_argument("--write", action="store_true", help="rewrite README.md's block from the file it names")
    args = parser.parse_args()
    if args.write:
        write()
        write_generated()
        return
    found = readme_block((REPO / "README.md").read_text())
    path = args.results or (found[0] if found else None)
    if path is None:
        raise SystemExit("give a results JSON")
    print(render(Path(path).resolve()), end="")


if __name__ == "__main__":
    main()
