"""Typer options built from a stage's config dataclass, so each flag is declared once.

``@from_config(ServeConfig)`` under ``@app.command()`` gives the command one option per
field: the field's type (``X | None`` optional, tuples repeatable, Enums as choices), its
default, its attribute docstring as the help text, and what ``edgeft.flags.flag`` adds
(short names, an ``EDGEFT_*`` variable, a help panel, a ``--x/--off`` pair). The command's own parameters (arguments and CLI-only flags) come first; the
function is called with them and ``config=`` the config built from the rest, so a bad
value fails in the config's own validation. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from edgeft.errors import EdgeftError
from edgeft.flags import Flag, enum_value, field_docs, flag_of, range_text

def _unwrap(tp: Any) -> tuple[Any, bool, bool]:
    """(base type, optional, repeated) of a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), optional, True
    return tp, optional, False


def _help(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (``...`` when it has none: the flag is required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def shown(value: Any) -> str:
    """A default as ``--help`` writes it: 0 and 1 for 0.0 and 1.0, an Enum's value, a tuple's items."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(shown(v) for v in value)
    return str(value)


def _over_help(text: str, default: Any, over: str) -> str:
    """An override flag's help: it defaults to ``over`` (the artifact's setting), else the field's default."""
    if default is None or default == ():
        return text
    return f"{text}  [default: {over}, else {shown(default)}]"


def _param(f: dataclasses.Field, hints: dict[str, Any], docs: dict[str, str],
           over: str | None = None) -> tuple[inspect.Parameter, Any]:
    meta: Flag = flag_of(f)
    base, optional, repeated = _unwrap(hints[f.name])
    default: Any = field_default(f)
    annotation: Any
    text = _help(docs.get(f.name, ""))
    if range_text(meta):  # the declared range, as check_fields enforces it
        text = f"{text} [{range_text(meta)}]"
    if over is not None:  # every flag optional: None (or nothing repeated) means "not given"
        text, default = _over_help(text, default, over), None
    if repeated and meta.comma:  # one value, "a,b,c"
        default, annotation = None, str
    elif repeated:
        default = list(default) if default not in (..., None) else default
        annotation = types.GenericAlias(list, (base,))  # list[base]
    else:
        annotation = base
    if isinstance(default, enum.Enum):
        default = default.value if not issubclass(base, enum.Enum) else default
    show = meta.show_default
    if default is None or default == [] or (base is str and optional and default is None):
        show = False if show is True else show
    common: dict[str, Any] = dict(help=text or None, envvar=meta.env, rich_help_panel=meta.panel,
                                  show_default=show, metavar=meta.metavar)
    if repeated and meta.env and not meta.comma:
        common["callback"] = _env_list(base)
    if _more_spellings(base):  # parsed by the Enum itself (EDGEFT_SPIN=1), shown as its choices
        common["parser"] = functools.partial(_parse_enum, base, _option_name(f.name))
        common["metavar"] = meta.metavar or "[" + "|".join(str(m.value) for m in base) + "]"
    if meta.argument:
        info = typer.Argument(default, **common)
    else:
        names = list(meta.names) or [_option_name(f.name)]
        if not any(n.startswith("--") for n in names):
            names.insert(0, _option_name(f.name))
        if base is bool and (default is True or meta.negative or over is not None):  # an off switch too
            long = next(n for n in names if n.startswith("--"))
            names = [f"{long}/{meta.negative or '--no-' + long[2:]}", *[n for n in names if n != long]]
        elif base is bool:  # off by default: a plain switch
            common["show_default"] = False
        info = typer.Option(default, *names, **common)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation), base


def _more_spellings(base: Any) -> bool:
    """An Enum that accepts spellings besides its values (it defines ``_missing_``, as ``Spin`` does)."""
    return isinstance(base, type) and issubclass(base, enum.Enum) and "_missing_" in vars(base)


def _parse_enum(klass: type[enum.Enum], name: str, value: Any) -> Any:
    try:
        return enum_value(klass, value, name)
    except EdgeftError as exc:
        raise ValueError(str(exc)) from None


def _split(text: str | None, f: dataclasses.Field, annotation: Any) -> Any:
    """A comma-separated value as the field's tuple; nothing given: the field's default."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        return f.default
    base = _unwrap(annotation)[0]
    try:
        return tuple(base(x) for x in items)
    except ValueError:
        raise EdgeftError(f"{_option_name(f.name)} takes {base.__name__} values separated by commas, "
                          f"not {text!r}") from None


def _env_list(base: Any) -> Callable[..., Any]:
    """A typer callback: a repeated flag read from its ``EDGEFT_*`` variable, less the empty items.

    ``EDGEFT_ARTIFACTS="a::b"`` (or ``"::"``) splits into empty items too, each of which would
    become the path ``.``; only the items with text are meant.
    """
    def callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        source = ctx.get_parameter_source(param.name or "")
        if source is None or source.name != "ENVIRONMENT":
            return value
        raw = param.resolve_envvar_value(ctx) or ""
        splitter = getattr(getattr(param, "type_descriptor", None), "envvar_list_splitter", None)
        items = raw.split(splitter) if splitter else raw.split()
        return [base(x) for x in items if x.strip()]

    return callback


def from_config(config_cls: type, skip: tuple[str, ...] = (), extra: Callable[[dict[str, Any]], dict] | None = None,
                into: str = "config", over: str | None = None):
    """Decorate a command ``fn(..., config)`` so its options are ``config_cls``'s fields (minus ``skip``).

    ``extra(values)`` may return more keyword arguments for the config (values the command
    computes from its own parameters). ``into`` names the parameter the config is passed as.
    ``over``: the flags override settings found elsewhere (an artifact's sampling defaults,
    named by ``over`` in the help): each is optional, and ``fn`` gets a dict of the values
    given instead of a config (``SamplingParams.over(defaults, **given)`` builds it).
    Decorators stack: ``@from_config(GenerateConfig)`` over ``@from_config(SamplingParams, ...)``.
    """
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.name not in skip and flag_of(f).cli]

    def wrap(fn: Callable) -> Callable:
        own = inspect.signature(fn)
        own_hints = typing.get_type_hints(fn)
        kept = [p.replace(annotation=own_hints.get(p.name, p.annotation))
                for p in own.parameters.values() if p.name != into]
        params = [_param(f, hints, docs, over)[0] for f in fields]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {f.name: _field_value(f, kwargs.pop(f.name), hints[f.name]) for f in fields}
            if extra is not None:
                values.update(extra(dict(kwargs)))
            if over is not None:
                return _run(fn, {**kwargs, into: {k: v for k, v in values.items() if v not in (None, ())}})
            return _run(fn, {**kwargs, into: config_cls(**values)})

        command.__signature__ = inspect.Signature([*kept, *params])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in (*kept, *params)}
        del command.__wrapped__  # typer must read the signature above, not fn's
        # what the flags come from, outermost last (tests check --help against these fields)
        sources = [*getattr(fn, "edgeft_configs", []), Source(config_cls, skip, into, over)]
        command.edgeft_configs = sources  # type: ignore[attr-defined]
        return command

    return wrap


def _field_value(f: dataclasses.Field, value: Any, annotation: Any) -> Any:
    """What typer handed for field ``f`` as the config takes it: blanks as None, comma lists and lists as tuples."""
    meta = flag_of(f)
    if meta.blank_is_none and isinstance(value, str) and not value.strip():
        value = None
    if meta.comma:
        value = _split(value, f, annotation)
    if isinstance(value, list) or (value is None and meta.env and _unwrap(annotation)[2]):
        value = tuple(value or ())  # an env list of empty items only: typer hands None
    return value


@dataclasses.dataclass(frozen=True)
class Source:
    """One ``from_config`` on a command: the config class, the fields left out, how it is passed."""

    config_cls: type
    skip: tuple[str, ...]
    into: str
    over: str | None

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.config_cls) if f.name not in self.skip and flag_of(f).cli]


def _run(fn: Callable, kwargs: dict[str, Any]) -> Any:
    """Call the command's function (one seam, so a test can see what a command line builds)."""
    return fn(**kwargs)


__all__ = ["from_config", "field_default", "shown"]
