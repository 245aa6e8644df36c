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
