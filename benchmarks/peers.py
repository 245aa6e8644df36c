"""The native peers installed as their users install them: OpenVINO GenAI and CTranslate2.

    python -m benchmarks.peers            # make the venv and every converted model; print where

They live in their own venv, ``benchmarks/work/peers-venv`` (``pip install`` of the packages
below, nothing pinned beyond what pip resolves), so the project's ``.venv`` never sees
their dependencies. Each model is converted from the same local Hugging Face folder
edgeft exports from (``edgeft pull``'s fp32 weights) with the peer's own documented tool:

- OpenVINO: ``optimum-cli export openvino --weight-format int8|int4`` (optimum-intel with
  NNCF weight compression, at its defaults but for int4's group size, which must divide
  576), run by ``openvino_genai.LLMPipeline``;
  the classifier with ``--task text-classification --weight-format int8``.
- CTranslate2: ``ct2-transformers-converter --quantization int8``, run by
  ``ctranslate2.Generator`` on the CPU; the classifier's encoder by ``ctranslate2.Encoder``
  (its pooled output through the tuned head's one linear layer).

A peer that cannot be installed or converted here raises ``Unavailable`` with the reason,
which the suite lists as a skipped row. The measuring code is ``benchmarks.peer_workers``,
run by this venv's interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.prepare import WORK, Unavailable, run_logged

VENV = WORK / "peers-venv"
# torch (the CPU wheel the project pins) is what optimum-intel and the CTranslate2 converter load
# the Hugging Face model with.
PACKAGES = ("torch==2.13.0", "openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel[openvino]", "nncf",
            "ctranslate2", "transformers")
MODULES = {"openvino": "openvino_genai", "ctranslate2": "ctranslate2"}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """The peers' interpreter, with every package installed (made once, ~5 min of downloads)."""
    marker = VENV / ".installed"
    if not marker.is_file():
        from benchmarks import prepare

        prepare._may_make("the peers' venv", VENV)
        if not python().is_file():
            run_logged([sys.executable, "-m", "venv", str(VENV)], WORK / "logs" / "peers-venv.log", "python -m venv")
        run_logged([str(python()), "-m", "pip", "install", "-q", *PACKAGES], WORK / "logs" / "peers-pip.log",
                   "pip install of the peers")
        # optimum-intel pulls torchvision, and the wheel pip picks is built for another torch: its ops
        # fail to register ("torchvision::nms does not exist"), which breaks transformers' imports.
        # Text models never use it.
        run_logged([str(python()), "-m", "pip", "uninstall", "-y", "-q", "torchvision"],
                   WORK / "logs" / "peers-pip.log", "pip uninstall torchvision")
        marker.write_text("\n".join(PACKAGES) + "\n")
    return python()


def versions() -> dict[str, str]:
    """Installed versions of the peers' packages (empty when the venv is absent)."""
    if not python().is_file():
        return {}
    code = ("import json; from importlib import metadata as m\nout = {}\n"
            "for n in ('openvino', 'openvino-genai', 'openvino-tokenizers', 'optimum-intel', 'nncf', 'ctranslate2', "
            "'transformers', 'torch'):\n"
            "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: out[n] = 'absent'\n"
            "print(json.dumps(out))")
    res = subprocess.run([str(python()), "-c", code], capture_output=True, text=True)
    import json

    return json.loads(res.stdout) if res.returncode == 0 else {}


def need(peer: str) -> Path:
    """The venv's interpreter when ``peer`` (openvino, ctranslate2) imports there."""
    py = ensure_venv()
    res = subprocess.run([str(py), "-c", f"import {MODULES[peer]}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise Unavailable(f"{peer} does not import in {VENV.name}: {(res.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return py


def _convert(name: str, cmd: list[str], check: str) -> Path:
    """Run a converter into work/peers/NAME.partial, then move it in place (cached)."""
    out = WORK / "peers" / name
    if (out / check).is_file():
        return out
    from benchmarks import prepare

    prepare._may_make(f"peer model {name}", out)
    tmp = out.with_name(name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    secs = run_logged([*cmd, str(tmp)], WORK / "logs" / f"peer-{name}.log", f"converting {name}")
    (WORK / "logs" / f"peer-{name}.seconds").write_text(f"{secs:.2f}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def openvino_lm(hf_folder: Path, weights: str) -> Path:
    """SmolLM2 as an OpenVINO IR with int8 or int4 weights (optimum-cli's defaults).

    int4 needs one non-default flag: the default group of 128 does not divide SmolLM2's 576
    channels (NNCF refuses), so int4 uses groups of 64, the next size its error message allows.
    """
    py = need("openvino")
    cli = py.with_name("optimum-cli")
    extra = ["--group-size", "64"] if weights == "int4" else []
    return _convert(f"openvino-lm-{weights}", [str(cli), "export", "openvino", "--model", str(hf_folder),
                                               "--task", "text-generation-with-past", "--weight-format", weights,
                                               *extra], "openvino_model.xml")


def openvino_classifier(hf_folder: Path, tag: str) -> Path:
    py = need("openvino")
    cli = py.with_name("optimum-cli")
    return _convert(f"openvino-cls-{tag}-int8", [str(cli), "export", "openvino", "--model", str(hf_folder),
                                                 "--task", "text-classification", "--weight-format", "int8"],
                    "openvino_model.xml")


def ctranslate2_lm(hf_folder: Path) -> Path:
    """SmolLM2 converted by CTranslate2's own converter with int8 weights."""
    py = need("ctranslate2")
    cli = py.with_name("ct2-transformers-converter")
    return _convert("ctranslate2-lm-int8", [str(cli), "--model", str(hf_folder), "--quantization", "int8",
                                           "--copy_files", "tokenizer.json", "--output_dir"], "model.bin")


def ctranslate2_encoder(hf_folder: Path, tag: str) -> Path:
    """The classifier's encoder converted by CTranslate2 with int8 weights (its BERT loader keeps the
    pooler; the classification head, one small linear layer, is applied by the worker from the HF folder)."""
    py = need("ctranslate2")
    cli = py.with_name("ct2-transformers-converter")
    return _convert(f"ctranslate2-cls-{tag}-int8", [str(cli), "--model", str(hf_folder), "--quantization", "int8",
                                                    "--output_dir"], "model.bin")


def main() -> int:
    from benchmarks.prepare import LM, ensure_model

    src = ensure_model(LM)
    for what, fn in (("openvino int8", lambda: openvino_lm(src, "int8")), ("openvino int4", lambda: openvino_lm(src, "int4")),
                     ("ctranslate2 int8", lambda: ctranslate2_lm(src))):
        try:
            print(what, fn())
        except Unavailable as exc:
            print(what, "skipped:", exc)
    print(versions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
