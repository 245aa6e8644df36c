"""The runtime and the generate, chat, classify, embed and serve commands never import torch or transformers.

The runtime itself (every module of ``edgeft.runtime`` and what they import) does not import
the CLI's libraries either: no typer, no click (uvicorn brings click once a server starts).
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import edgeft.runtime
from edgeft.runtime import Generator, TextClassifier, TextEmbedder, SamplingParams, Completion, Chunk, load
import edgeft.runtime.generate, edgeft.runtime.classify, edgeft.runtime.embed, edgeft.runtime.chat, edgeft.runtime.detok
import edgeft.runtime.sampling, edgeft.runtime.session
import edgeft.cli.generate, edgeft.cli.chat, edgeft.cli.classify, edgeft.cli.embed
import importlib.util
for name in ("edgeft.runtime.serve.process", "edgeft.cli.serve"):
    if importlib.util.find_spec(name) is not None:
        __import__(name)
from typer.testing import CliRunner
from edgeft.cli import app
for cmd in ("generate", "chat", "classify", "embed", "serve"):
    assert CliRunner().invoke(app, [cmd, "--help"]).exit_code == 0, cmd
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("HEAVY", heavy)
"""


def test_runtime_and_commands_do_not_import_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_running_a_command_stays_torch_free(tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom edgeft.cli import app\n"
            f"r = CliRunner().invoke(app, ['classify', {str(tmp_path / 'missing')!r}, 'x'])\n"
            "assert r.exit_code == 2, r.output\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


CLI_FREE = """
import importlib, importlib.util, pkgutil, sys
import edgeft.runtime
for m in pkgutil.iter_modules(edgeft.runtime.__path__):
    name = "edgeft.runtime." + m.name
    if name == "edgeft.runtime.serve" and importlib.util.find_spec("starlette") is None:
        continue
    importlib.import_module(name)
import edgeft.errors, edgeft.artifact
print("RUNTIME", sorted(m for m in sys.modules if m.startswith("edgeft.runtime.")))
print("CLI", sorted(m for m in sys.modules if m.split(".")[0] in ("typer", "click", "torch", "transformers")))
"""


def test_runtime_imports_no_cli_library():
    out = subprocess.run([sys.executable, "-c", CLI_FREE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "edgeft.runtime.generate" in out.stdout and "edgeft.runtime.session" in out.stdout, out.stdout
    assert "CLI []" in out.stdout, out.stdout
