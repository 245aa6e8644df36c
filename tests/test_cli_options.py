"""Flags built from config dataclasses (``edgeft.cli.options``): one declaration per setting.

Each command's options come from its config's fields; these tests check that the defaults,
help texts, environment variables and old spellings behave as the fields declare.
"""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

from edgeft.cli import app
from edgeft.flags import field_docs
from edgeft.serve_config import ServeConfig


def _help(*cmd: str) -> str:
    res = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_serve_flags_are_servconfig_fields_with_their_docstrings_and_env_vars():
    text = _help("serve")
    docs = field_docs(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        assert " ".join(docs[f.name].split()) in text, f.name  # every field documented, help = docstring
    assert "--trusted-key" in text and "[env var: EDGEFT_HOST; default: 127.0.0.1]" in text
    assert "text|json" in text


def test_a_blank_env_key_means_no_key_and_bad_values_fail_in_the_config(tmp_path):
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")], env={"EDGEFT_API_KEY": ""})
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", "70000"])
    assert res.exit_code == 2 and "port must be in 0..65535" in res.output, res.output


def test_tune_flags_come_from_tuneconfig_with_short_names_panels_and_old_spellings(tmp_path, monkeypatch):
    import edgeft.tune as T

    text = _help("tune")
    assert "-m, --model" in text and "-n, --trainable-layers" in text and "-b, --batch-size" in text
    assert "--text-column" in text and "--text-col " not in text  # the old spelling works but is hidden
    assert "--group-by-length / --no-group-by-length" in text and "--untie-head / " not in text
    seen = []
    monkeypatch.setattr(T, "tune", lambda config: seen.append(config) or (_ for _ in ()).throw(SystemExit(0)))
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\na,0\n")
    base = ["tune", "-m", "x", "-d", str(data), "-o", str(tmp_path / "o")]
    assert CliRunner().invoke(app, [*base, "--text-col", "sentence", "-n", "3", "--untie-head"]).exit_code == 0
    cfg = seen[-1]
    assert cfg.text_column == "sentence" and cfg.trainable_layers == 3 and cfg.untie_head and cfg.group_by_length
    assert cfg.batch_size == 16 and cfg.task is None  # defaults from the dataclass
    both = CliRunner().invoke(app, [*base, "--text-col", "a", "--text-column", "b"])
    assert both.exit_code == 2 and "old spelling" in both.output


def test_export_flags_keep_their_spellings_and_parse_comma_lists(tmp_path, monkeypatch):
    import edgeft.export as E

    text = _help("export")
    assert "--int8-activations / --fp32-activations" in text and "-q, --quantize" in text and "--sign" in text
    assert "--gate-prompts" not in text  # not a command-line setting
    seen = []
    monkeypatch.setattr(E, "export", lambda config: seen.append(config) or tmp_path)
    res = CliRunner().invoke(app, ["export", "src", "-o", str(tmp_path / "a"), "--labels", "neg, pos",
                                   "--truncation-dims", "64,128", "--fp32-activations"])
    assert res.exit_code == 0, res.output
    cfg = seen[-1]
    assert cfg.labels == ("neg", "pos") and cfg.truncation_dims == (64, 128) and cfg.int8_activations is False
    res = CliRunner().invoke(app, ["export", "src", "-o", str(tmp_path / "a"), "--truncation-dims", "6x"])
    assert res.exit_code == 2 and "--truncation-dims takes int values separated by commas" in res.output
