"""Chat templates: the artifact's Jinja template turns messages into one prompt string.

Templates come from the artifact (``manifest.tokenizer.chat_template`` names a file, or
``tokenizer_config.json`` carries ``chat_template``). They are untrusted code, so they are
rendered in jinja2's immutable sandbox with the same helpers transformers offers
(``raise_exception``, ``tojson``, ``strftime_now``, ``namespace``, loop controls), so a
template that works there works here. This module knows messages and strings, not tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(EdgeftError):
    """The template refused the conversation (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A sandboxed, compiled template (cached by its source)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=jinja2.utils.Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise EdgeftError(f"the artifact's chat template does not parse: {exc}") from None


def load_template(folder: Path, template_file: str | None, config_file: str | None) -> str | None:
    """The template source from the artifact, or None when it has none."""
    if template_file and (Path(folder) / template_file).is_file():
        return (Path(folder) / template_file).read_text()
    if config_file and (Path(folder) / config_file).is_file():
        tpl = json.loads((Path(folder) / config_file).read_text()).get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl if isinstance(tpl, str) else None
    return None


def check_messages(messages: list[dict]) -> list[dict]:
    """Messages are dicts with a known role and string content; one clear error otherwise."""
    if not isinstance(messages, list) or not messages:
        raise EdgeftError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise EdgeftError(f"message {i} needs a role among {', '.join(ROLES)}")
        if not isinstance(m.get("content", ""), str):
            raise EdgeftError(f"message {i}: content must be a string")
    return messages


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
    """The conversation as the model's prompt text, ending with the assistant's turn header."""
    import jinja2

    template = compile_template(source)
    try:
        return template.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **extra)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from None
