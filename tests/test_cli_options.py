"""Flags built from config dataclasses (``edgeft.cli.options``): one declaration per setting.

Each command's options come from its config's fields; these tests check that the defaults,
help texts, environment variables and old spellings behave as the fields declare.
"""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

import edgeft.cli.options as O
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
    assert res.exit_code == 2 and "--port must be at least 0 and at most 65535, got 70000" in res.output, res.output


def test_tune_flags_come_from_tuneconfig_with_short_names_panels_and_no_old_spellings(tmp_path, monkeypatch):
    import edgeft.tune as T

    text = _help("tune")
    assert "-m, --model" in text and "-n, --trainable-layers" in text and "-b, --batch-size" in text
    assert "--text-column" in text and "--text-col " not in text
    assert "--group-by-length / --no-group-by-length" in text and "--untie-head / " not in text
    seen = []
    monkeypatch.setattr(T, "tune", lambda config: seen.append(config) or (_ for _ in ()).throw(SystemExit(0)))
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\na,0\n")
    base = ["tune", "-m", "x", "-d", str(data), "-o", str(tmp_path / "o")]
    assert CliRunner().invoke(app, [*base, "--text-column", "sentence", "-n", "3", "--untie-head"]).exit_code == 0
    cfg = seen[-1]
    assert cfg.text_column == "sentence" and cfg.trainable_layers == 3 and cfg.untie_head and cfg.group_by_length
    assert cfg.batch_size is None and cfg.task is None  # defaults from the dataclass (None: by task)
    for old in ("--text-col", "--label-col"):  # old spellings of a 0.x package are gone, not hidden
        res = CliRunner().invoke(app, [*base, old, "a"])
        assert res.exit_code == 2 and "No such option" in res.output, res.output
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "hi", "-n", "3"])
    assert res.exit_code == 2 and "No such option" in res.output, res.output


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


# ---- every command built from a config: defaults, help texts and old spellings ----------------

def _commands():
    """(command name, click command, its from_config sources) for every command with config-built flags."""
    import typer

    group = typer.main.get_command(app)
    out = []
    for info in app.registered_commands:
        sources = getattr(info.callback, "edgeft_configs", [])
        if sources:
            name = info.name or info.callback.__name__.replace("_", "-")
            out.append((name, group.commands[name], sources))
    return out


def _record(cmd, name: str) -> str:
    import click

    param = next(p for p in cmd.params if p.name == name)
    with click.Context(cmd, info_name=cmd.name, terminal_width=400) as ctx:
        record = param.get_help_record(ctx)
    return " ".join(" ".join(record).split()) if record else ""


def test_every_config_built_command_is_found():
    names = {name for name, _, _ in _commands()}
    assert {"generate", "chat", "classify", "embed", "bench", "verify", "pack", "sign", "keygen", "pull",
            "serve", "tune", "export"} <= names


def test_every_flag_shows_its_fields_default_and_docstring():
    from edgeft.cli.options import field_default, shown

    for name, cmd, sources in _commands():
        for src in sources:
            docs = field_docs(src.config_cls)
            for f in src.fields():
                text, default, where = _record(cmd, f.name), field_default(f), f"{name} {f.name}"
                assert " ".join(docs[f.name].replace("``", "").split()) in text, where
                if default is ...:
                    assert "required" in text, where
                elif src.over is not None:  # an override: the artifact's setting, else the field's default
                    if default not in (None, ()):
                        assert f"[default: {src.over}, else {shown(default)}]" in text, where
                elif default not in (None, (), False) and O.flag_of(f).show_default is True:
                    assert f"default: {_as_click_shows(f, default)}]" in text, where


def _as_click_shows(f, default) -> str:
    import enum

    if default is True:  # a --x/--no-x pair shows its on switch
        names = [n for n in O.flag_of(f).names if n.startswith("--")] or [O._option_name(f.name)]
        return names[0][2:]
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, tuple):
        return ", ".join(map(str, default))
    return str(default)


def test_sampling_flags_and_manifest_defaults_are_samplingparams():
    from edgeft.artifact import Generation
    from edgeft.runtime.params import SamplingParams

    text = _help("generate")
    assert "-t, --temperature" in text and "[default: the artifact's, else 128]" in text
    assert " -n" not in text  # -n is tune's --trainable-layers; here a hidden old spelling
    assert "Sampling: --max-new-tokens" in text and "Constrained output:" in text  # panels in plain --help
    base = SamplingParams()
    for f in dataclasses.fields(Generation):
        assert getattr(Generation(), f.name) == getattr(base, f.name), f.name


def _dummy(tp, tmp_path):
    """A command-line value for a field type, and the value the config should hold."""
    import enum
    from pathlib import Path

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        member = list(tp)[-1]
        return member.value, member
    if tp is Path:
        p = tmp_path / "given.csv"
        p.write_text("text,label\na,0\n")
        return str(p), p
    return {int: ("3", 3), float: ("0.5", 0.5)}.get(tp, ("given", "given"))


def test_sampling_flags_pass_only_what_was_given(monkeypatch):
    """Unset sampling flags stay unset (the artifact's defaults then apply); repeated --stop is a tuple."""
    seen = []
    monkeypatch.setattr(O, "_run", lambda fn, kw: fn(**kw) if hasattr(fn, "edgeft_configs") else seen.append(kw))
    res = CliRunner().invoke(app, ["generate", "art", "hi", "--stop", "a", "--stop", "b", "-t", "0.5",
                                   "--chat", "--system", "be brief"])
    assert res.exit_code == 0, res.output
    assert seen[-1]["sampling"] == {"stop": ("a", "b"), "temperature": 0.5}
    cfg = seen[-1]["config"]
    assert cfg.chat and cfg.system == "be brief" and cfg.prompt == "hi" and cfg.parallel == 8
    res = CliRunner().invoke(app, ["generate", "art", "--regex", "a", "--choice", "b"])
    assert res.exit_code == 2 and "at most one of --json-schema, --regex and --choice" in res.output
