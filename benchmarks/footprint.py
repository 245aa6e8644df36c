"""Installed size of edgeft's extras: what a laptop (runtime) carries against a trainer (train).

Two ways: ``extra_installed_mib`` walks the extra's requirements through the installed
distributions' metadata and sums the files each one's RECORD lists (no network, exact for
this environment); ``fresh_venv_mib`` installs the extra into a new venv with pip and
measures its site-packages (the honest check that no torch comes along). Standard
library only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.data import REPO
from benchmarks.prepare import WORK, Unavailable

_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[([^\]]*)\])?")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str, extras: set[str]) -> list[tuple[str, set[str]]]:
    """(name, extras) a distribution requires with ``extras`` on, markers evaluated here."""
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for r in reqs:
        spec, _, marker = r.partition(";")
        if marker.strip():
            wanted = [e for e in extras if f'extra == "{e}"' in marker or f"extra == '{e}'" in marker]
            if "extra ==" in marker and not wanted:
                continue
            if "extra ==" not in marker and not _marker_true(marker):
                continue
        m = _NAME.match(spec)
        if m:
            out.append((m.group(1), {e.strip() for e in (m.group(3) or "").split(",") if e.strip()}))
    return out


def _marker_true(marker: str) -> bool:
    try:
        from packaging.markers import Marker

        return Marker(marker).evaluate()
    except Exception:  # no packaging: count the requirement
        return True


def closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution ``root[extras]`` pulls in (itself excluded), as normalized names."""
    seen: set[str] = set()
    todo = _requirements(root, extras)
    while todo:
        name, ex = todo.pop()
        key = _norm(name)
        if key == _norm(root):
            todo += _requirements(root, ex)
            continue
        if key in seen:
            continue
        seen.add(key)
        todo += _requirements(name, ex)
    return seen


def dist_mib(name: str) -> float:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0.0
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total / 2**20


def extra_installed_mib(extra: str, root: str = "edgeft") -> float:
    """Installed MiB of what ``root[extra]`` requires, from this environment's metadata."""
    return sum(dist_mib(n) for n in closure(root, {extra}))


def fresh_venv_mib(extra: str) -> tuple[float, bool]:
    """pip install ``.[extra]`` into a new venv; (site-packages MiB, whether torch came along)."""
    venv = WORK / f"venv-{extra}"
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", f"{REPO}[{extra}]"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise Unavailable(f"pip install .[{extra}] failed: {(res.stderr.strip().splitlines() or [''])[-1][:200]}")
    site = next((venv / "lib").glob("python*/site-packages"))
    total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    pip_dirs = [p for p in site.iterdir() if p.name.startswith(("pip", "setuptools", "_distutils"))]
    total -= sum(q.stat().st_size for d in pip_dirs for q in ([d] if d.is_file() else d.rglob("*")) if q.is_file())
    return total / 2**20, (site / "torch").exists()
