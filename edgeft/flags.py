"""How a config field appears on the command line, declared beside the field.

A stage's config dataclass (``TuneConfig``, ``ExportConfig``, ``ServeConfig``...) is the
one place a setting exists: its type, its default, its attribute docstring (the help
text). ``flag(...)`` adds what only the command line needs, as the field's metadata:

    host: str = field(default="127.0.0.1", metadata=flag(env="EDGEFT_HOST"))
    '''Address to bind. 0.0.0.0 exposes the server to the network.'''

A field's allowed range is declared there too (``flag(min=1)``, ``flag(above=0, max=1)``),
and ``check_fields(config)``, called once in each config's ``__post_init__``, refuses a
value out of range, and a float that is NaN or infinite whatever its range, as one line.
So a library caller gets the same checks as the command line.

``edgeft.cli.options`` turns the fields into typer options. This module is standard
library only, so a config module (the torch-free runtime's included) can use it without
importing typer.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from edgeft.errors import EdgeftError

KEY = "edgeft.flag"


@dataclass(frozen=True)
class Flag:
    """The command-line side of one config field (see ``flag``)."""

    names: tuple[str, ...] = ()
    env: str | None = None
    panel: str | None = None
    negative: str | None = None
    argument: bool = False
    metavar: str | None = None
    show_default: bool | str = True
    blank_is_none: bool = False
    cli: bool = True
    comma: bool = False
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    nonblank: bool = False


def flag(*names: str, env: str | None = None, panel: str | None = None,
         negative: str | None = None, argument: bool = False, metavar: str | None = None,
         show_default: bool | str = True, blank_is_none: bool = False, cli: bool = True,
         comma: bool = False, min: float | None = None, max: float | None = None,
         above: float | None = None, below: float | None = None, nonblank: bool = False) -> dict[str, Any]:
    """Field metadata for the command line.

    ``names``: the option's spellings (default ``--field-name``), short ones included
    (``"-m"``); ``env``: an ``EDGEFT_*`` variable that sets it; ``panel``: its ``--help``
    section; ``negative``: the off switch of a boolean (``--fp32-activations``; default ``--no-x``);
    ``argument``: positional instead of an option; ``show_default``: False, or the text to
    show; ``blank_is_none``: an empty value (``EDGEFT_API_KEY=``) means unset; ``cli=False``:
    not on the command line at all; ``comma``: a tuple given as one comma-separated value.

    The value's range (each item's, for a tuple; None always passes): ``min``/``max``
    inclusive, ``above``/``below`` exclusive; ``nonblank``: a string (or each one) has text.
    A float must be finite whether or not a range is given (see ``check_fields``).
    """
    return {KEY: Flag(names, env, panel, negative, argument, metavar, show_default,
                      blank_is_none, cli, comma, min, max, above, below, nonblank)}


def enum_value(klass: type[enum.Enum], value: Any, name: str) -> Any:
    """``value`` (a member or its value) as a member of ``klass``; else one line naming flag ``name``."""
    try:
        return klass(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in klass)
        raise EdgeftError(f"{name} must be one of {allowed}, not {value!r}") from None


def flag_of(f: dataclasses.Field) -> Flag:
    return f.metadata.get(KEY) or Flag()


def option_name(f: dataclasses.Field) -> str:
    """How an error names a field: its long option (``--lr``), else ``--field-name``."""
    return next((n for n in flag_of(f).names if n.startswith("--")), "--" + f.name.replace("_", "-"))


def check_fields(config: Any) -> None:
    """Refuse a field value outside its declared range, or a NaN or infinite float: one line.

    Call it in a config's ``__post_init__`` once its values have their final types.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            problem = _problem(flag_of(f), item)
            if problem:
                raise EdgeftError(f"{option_name(f)} {problem}, got {item!r}")


def field_problem(f: dataclasses.Field, value: Any) -> str:
    """What ``value`` breaks of field ``f``'s declared constraints ("must be ...", or "" when nothing)."""
    return _problem(flag_of(f), value)


def range_text(meta: Flag) -> str:
    """The declared range in words ("at least 1", "above 0 and at most 1"); "" when there is none."""
    parts = [f"{word} {_num(bound)}" for word, bound in (("at least", meta.min), ("above", meta.above),
                                                          ("at most", meta.max), ("below", meta.below))
             if bound is not None]
    return " and ".join(parts)


def _problem(meta: Flag, value: Any) -> str:
    """What ``value`` breaks of ``meta``'s constraints ("must be ...", or "" when nothing)."""
    if isinstance(value, str) and meta.nonblank and not value.strip():
        return "must not be empty"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    rng = range_text(meta)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{', ' + rng if rng else ''}"
    if ((meta.min is not None and value < meta.min) or (meta.max is not None and value > meta.max)
            or (meta.above is not None and value <= meta.above) or (meta.below is not None and value >= meta.below)):
        return f"must be {rng}"
    return ""


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of a dataclass, read from its source (and its bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs
