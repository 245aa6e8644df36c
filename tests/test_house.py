"""The house rules that a reader of the tree can check: each is a scan of ``edgeft/``'s source.

- Process settings (``EDGEFT_*`` and friends) are read at the command and server boundary
  only; the library is told them (``--threads``, ``--spin``, ``use_cache_root``).
- No function is over 60 lines (the known exceptions are named below, with their owner).
- The server package's modules stay under 400 lines each.
- The run folder has one owner (``edgeft.runs``): its file names appear nowhere else, and
  it imports no torch (the Hugging Face loaders live in ``edgeft.tune.hf``).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EDGEFT = ROOT / "edgeft"

# Where the process environment may be read: the commands, the server process, and torchrun's
# own protocol (RANK, WORLD_SIZE, MASTER_ADDR...), which tune/distributed.py speaks.
ENV_BOUNDARY = ("edgeft/cli/", "edgeft/runtime/serve/process.py", "edgeft/runtime/serve/state.py",
                "edgeft/tune/distributed.py")

MAX_FUNCTION_LINES = 60
# Known exceptions, each with its owner: to be split, not to grow.
LONG_FUNCTIONS: set[str] = set()  # known exceptions: none

MAX_SERVE_MODULE_LINES = 400

RUN_FILES = ("run.json", "trained.safetensors", "metrics.json", "labels.json", "log.jsonl", "loss.png")


def _modules() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(ROOT).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(EDGEFT.rglob("*.py"))]


def _reads_environment(tree: ast.Module) -> list[int]:
    """Lines that touch ``os.environ``/``os.getenv`` (or import ``environ``/``getenv`` from os)."""
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name) and node.value.id == "os"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "environb") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_command_and_server_boundary_reads_the_environment():
    found = {f"{name}:{line}" for name, tree in _modules() for line in _reads_environment(tree)
             if not name.startswith(ENV_BOUNDARY)}
    assert not found, f"the process environment is read outside the boundary {ENV_BOUNDARY}: {sorted(found)}"
    # the scan sees a read
    assert _reads_environment(ast.parse("import os\nx = os.environ.get('EDGEFT_HOME')\n")) == [2]
    assert _reads_environment(ast.parse("from os import getenv\n")) == [1]


def test_the_library_reads_no_edgeft_variable_the_commands_do(monkeypatch, tmp_path):
    from edgeft import artifact
    from edgeft.runtime import session
    from edgeft.runtime.params import Spin

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("EDGEFT_THREADS", "97")
    monkeypatch.setenv("EDGEFT_SPIN", "1")
    monkeypatch.setattr(session, "machine_cores", lambda: session.Cores(2, 2.0))  # busy: auto sleeps
    artifact.use_cache_root(None)
    assert artifact.cache_root() != tmp_path / "env-home"
    artifact.use_cache_root(tmp_path / "told")
    assert artifact.cache_root() == tmp_path / "told"
    assert session.default_threads() != 97
    assert session.resolve_spin(Spin.auto, 2)[0] is False
    # ... while a command reads EDGEFT_HOME and tells the library
    from typer.testing import CliRunner

    from edgeft.cli import app

    assert CliRunner().invoke(app, ["models"]).exit_code == 0
    assert artifact.cache_root() == tmp_path / "env-home"


def _long_functions() -> dict[str, int]:
    out = {}
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out[f"{name}:{node.name}"] = length
    return out


def test_no_function_over_60_lines():
    long = _long_functions()
    extra = {k: v for k, v in long.items() if k not in LONG_FUNCTIONS}
    assert not extra, f"functions over {MAX_FUNCTION_LINES} lines (split them): {extra}"


def test_the_serve_package_has_no_large_module():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (EDGEFT / "runtime" / "serve").glob("*.py")}
    assert sizes, "edgeft/runtime/serve/ is a package of modules"
    name, lines = max(sizes.items(), key=lambda kv: kv[1])
    assert lines < MAX_SERVE_MODULE_LINES, f"edgeft/runtime/serve/{name} has {lines} lines"


@pytest.mark.parametrize("path", ["edgeft/tune/train.py", "edgeft/cli/tune.py", "edgeft/export/merge.py"])
def test_run_folder_file_names_are_spelled_only_in_runs(path):
    strings = {n.value for n in ast.walk(ast.parse((ROOT / path).read_text()))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(RUN_FILES), f"{path} spells run-folder names itself: {sorted(strings & set(RUN_FILES))}"


def test_runs_imports_no_torch_side_library():
    tree = ast.parse((EDGEFT / "runs.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"torch", "transformers", "safetensors", "bitsandbytes"}, imported


def test_write_run_and_summary_are_one_format(tmp_path):
    from edgeft import runs
    from edgeft.artifact import Task

    info = runs.RunInfo(task=Task.classification, base_model="m", base_path="m", base_sha256="", architecture="bert",
                        trainable_layers=1, trained_parameters=["w"], labels=["neg", "pos"])
    metrics = {"task": "classification", "before": {"accuracy": 0.5, "macro_f1": 0.4},
               "after": {"accuracy": 0.9, "macro_f1": 0.85}, "best_step": 3, "steps": 4,
               "select_metric": "accuracy", "train_seconds": 12.3, "warnings": ["few examples"]}
    runs.write_run(tmp_path, info, {"lr": 1e-4, "text_col": "sentence"}, metrics, [{"step": 1, "loss": 0.7}])
    assert {p.name for p in tmp_path.iterdir()} == {runs.RUN_INFO, runs.CONFIG, runs.LABELS, runs.METRICS, runs.LOG}
    assert runs.read_run_config(tmp_path)["text_column"] == "sentence"
    assert json.loads((tmp_path / runs.LABELS).read_text())["label2id"] == {"neg": 0, "pos": 1}
    assert runs.read_metrics(tmp_path) == metrics
    assert runs.summary(tmp_path) == (f"{tmp_path}: accuracy 0.5000 -> 0.9000, macro F1 0.4000 -> 0.8500 "
                                      "(best step 3 of 4 by accuracy, 12s); WARNING: few examples")
    (tmp_path / runs.METRICS).write_text("{not json")
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match="cannot read"):
        runs.read_metrics(tmp_path)


def test_no_old_spellings_remain(tmp_path):
    """A 0.x package keeps no hidden aliases: old flag spellings (tested in test_cli_options) nor old values."""
    from edgeft.errors import EdgeftError
    from edgeft.flags import Flag
    from edgeft.tune.config import TuneConfig

    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\n")
    with pytest.raises(EdgeftError, match="--task must be one of .*not 'auto'"):
        TuneConfig(model="m", data=data, out=tmp_path / "o", task="auto")  # once the spelling of "by the data"
    assert "aliases" not in Flag.__dataclass_fields__
