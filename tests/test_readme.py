"""The README's figures come from results files, and its links lead somewhere.

The current-results block is rendered by ``benchmarks/readme_table.py`` from the results JSON the
README names; a hand edit of a figure there fails here. Every relative link in the README and in
``docs/`` must point at a file in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import readme_table

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_results_block_is_rendered_from_the_file_it_names():
    readme = (REPO / "README.md").read_text()
    found = readme_table.readme_block(readme)
    assert found is not None, "README.md lost its results markers"
    path, block = found
    assert path.is_file(), path
    assert block == readme_table.render(path)


def test_generated_blocks_are_what_their_functions_print():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [(page.name, fn, body) for page in pages for fn, body in readme_table.generated_blocks(page.read_text())]
    assert {fn for _, fn, _ in blocks} >= {"edgeft.export.architectures.summary", "edgeft.export.architectures.markdown"}
    for page, fn, body in blocks:
        assert body == readme_table.generated(fn), f"{page}: {fn} (python -m benchmarks.readme_table --write)"


def test_readme_is_one_page():
    assert len((REPO / "README.md").read_text().splitlines()) < 300


def test_relative_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [(page.name, target) for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []
