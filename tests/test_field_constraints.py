"""Ranges declared on config fields (``flag(min=..., above=...)``), checked once by ``check_fields``.

Every float setting of every stage refuses NaN and infinity, from the command line (one
line, exit 2, nothing written) and from a library call alike; each range is the field's.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
from runtime_artifacts import run
from test_cli_badinput import one_line_error

from edgeft.bench_config import BenchConfig
from edgeft.errors import EdgeftError
from edgeft.export.config import ExportConfig
from edgeft.flags import check_fields, flag, flag_of, option_name
from edgeft.cli.generate import GenerateConfig
from edgeft.serve_config import ServeConfig
from edgeft.tune.config import TuneConfig


def _minimal(tmp_path: Path) -> dict[type, dict]:
    return {TuneConfig: dict(model="m", data=tmp_path / "d.csv", out=tmp_path / "run"),
            ExportConfig: dict(source="s", out=tmp_path / "art"),
            ServeConfig: dict(artifacts=(tmp_path / "a",)),
            BenchConfig: dict(artifact=tmp_path),
            GenerateConfig: dict(artifact="a")}


def _float_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_setting_of_every_config_refuses_nan_and_infinity(tmp_path, bad):
    checked = 0
    for cls, kw in _minimal(tmp_path).items():
        cls(**kw)  # the minimal config is valid
        for f in _float_fields(cls):
            with pytest.raises(EdgeftError, match=f"^{option_name(f)} must be a finite number"):
                cls(**kw, **{f.name: bad})
            checked += 1
    assert checked >= 15  # tune: 6, export: 7, serve: 2, and any added since


@pytest.mark.parametrize("args,words", [
    (["tune", "--lr", "inf"], ["--lr must be a finite number, above 0, got inf"]),
    (["tune", "--weight-decay", "nan"], ["--weight-decay must be a finite number", "got nan"]),
    (["tune", "--warmup", "nan"], ["--warmup must be a finite number", "got nan"]),
    (["tune", "--epochs", "-inf"], ["--epochs must be a finite number", "got -inf"]),
    (["export", "--max-accuracy-drop", "nan"], ["--max-accuracy-drop must be a finite number"]),
    (["export", "--max-perplexity-increase", "nan"], ["--max-perplexity-increase must be a finite number"]),
    (["export", "--min-cosine", "1.5"], ["--min-cosine must be at least 0 and at most 1, got 1.5"]),
    (["serve", "--batch-wait-ms", "inf"], ["--batch-wait-ms must be a finite number", "got inf"]),
    (["serve", "--drain-timeout", "nan"], ["--drain-timeout must be a finite number", "got nan"]),
    (["serve", "--name="], ["--name must not be empty"]),
    (["serve", "--port", "-1"], ["--port must be at least 0 and at most 65535, got -1"]),
])
def test_a_setting_out_of_its_declared_range_is_one_line_before_any_work(tmp_path, args, words):
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n" * 5)
    command, *rest = args
    positional = {"tune": ["-m", tmp_path / "no-model", "-d", data, "-o", tmp_path / "out"],
                  "export": [tmp_path / "no-run", "-o", tmp_path / "out"],
                  "serve": [tmp_path / "no-artifact"]}[command]
    one_line_error(run(command, *positional, *rest), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_range_is_declared_on_the_field_and_a_tuple_checks_each_item(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Conf:
        rate: float = dataclasses.field(default=0.5, metadata=flag(above=0, max=1))
        sizes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=flag("--size", min=1))
        untouched: float = 2.0

        def __post_init__(self) -> None:
            check_fields(self)

    rate = next(f for f in dataclasses.fields(Conf) if f.name == "rate")
    assert (flag_of(rate).above, flag_of(rate).max) == (0, 1)
    Conf(rate=1.0)
    with pytest.raises(EdgeftError, match=r"^--rate must be above 0 and at most 1, got 0\.0$"):
        Conf(rate=0.0)
    with pytest.raises(EdgeftError, match=r"^--size must be at least 1, got 0$"):
        Conf(sizes=(3, 0))
    with pytest.raises(EdgeftError, match=r"^--untouched must be a finite number, got nan$"):
        Conf(untouched=math.nan)


def test_an_artifact_list_of_empty_items_says_no_artifact_was_given():
    from typer.testing import CliRunner

    from edgeft.cli import app

    for value in ("::", ":"):
        res = CliRunner().invoke(app, ["serve"], env={"EDGEFT_ARTIFACTS": value})
        one_line_error(res, "no artifact was given")


def test_help_shows_each_declared_range():
    from typer.testing import CliRunner

    from edgeft.cli import app

    text = " ".join(CliRunner().invoke(app, ["tune", "--help"], terminal_width=200).output.split())
    assert "Held-out fraction when there is no --eval-data. [above 0 and below 1]" in text
    assert "Peak learning rate (default: 0.0001 for classification, 0.0001 for causal-lm). [above 0]" in text
