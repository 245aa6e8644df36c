"""How a config field appears on the command line, declared beside the field.

A stage's config dataclass (``TuneConfig``, ``ExportConfig``, ``ServeConfig``...) is the
one place a setting exists: its type, its default, its attribute docstring (the help
text). ``flag(...)`` adds what only the command line needs, as the field's metadata:

    host: str = field(default="127.0.0.1", metadata=flag(env="EDGEFT_HOST"))
    '''Address to bind. 0.0.0.0 exposes the server to the network.'''

``edgeft.cli.options`` turns the fields into typer options. This module is standard
library only, so a config module (the torch-free runtime's included) can use it without
importing typer.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

KEY = "edgeft.flag"


@dataclass(frozen=True)
class Flag:
    """The command-line side of one config field (see ``flag``)."""

    names: tuple[str, ...] = ()
    env: str | None = None
    panel: str | None = None
    aliases: tuple[str, ...] = ()
    negative: str | None = None
    argument: bool = False
    metavar: str | None = None
    show_default: bool | str = True
    blank_is_none: bool = False
    cli: bool = True
    comma: bool = False


def flag(*names: str, env: str | None = None, panel: str | None = None, aliases: tuple[str, ...] = (),
         negative: str | None = None, argument: bool = False, metavar: str | None = None,
         show_default: bool | str = True, blank_is_none: bool = False, cli: bool = True,
         comma: bool = False) -> dict[str, Any]:
    """Field metadata for the command line.

    ``names``: the option's spellings (default ``--field-name``), short ones included
    (``"-m"``); ``env``: an ``EDGEFT_*`` variable that sets it; ``panel``: its ``--help``
    section; ``aliases``: old spellings still accepted, hidden from ``--help``;
    ``negative``: the off switch of a boolean (``--fp32-activations``; default ``--no-x``);
    ``argument``: positional instead of an option; ``show_default``: False, or the text to
    show; ``blank_is_none``: an empty value (``EDGEFT_API_KEY=``) means unset; ``cli=False``:
    not on the command line at all; ``comma``: a tuple given as one comma-separated value.
    """
    return {KEY: Flag(names, env, panel, tuple(aliases), negative, argument, metavar, show_default,
                      blank_is_none, cli, comma)}


def flag_of(f: dataclasses.Field) -> Flag:
    return f.metadata.get(KEY) or Flag()


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
