"""``edgeft chat``: an interactive multi-turn conversation with a causal-LM artifact.

Keeps the conversation as messages, renders it with the artifact's chat template each
turn, and streams the reply. ``/reset`` forgets the conversation, ``/exit`` leaves. When
the conversation outgrows the model's context the oldest turns are dropped. The KV cache
of each turn is kept, so a new turn computes only its own tokens. Flags: ``ChatConfig``'s
fields and ``edgeft generate``'s sampling flags.
"""

from __future__ import annotations

from typing import Any

import typer

from edgeft.cli.app import app
from edgeft.cli.generate import ChatConfig, sampling_flags, sampling_params, stats_line, stream_to_terminal
from edgeft.cli.options import from_config

HELP = "Commands: /reset (forget the conversation), /exit (leave). Ctrl-D also leaves."


def _fit(gen, system: list[dict], turns: list[dict], max_new: int) -> list[int] | None:
    """Prompt ids of the conversation, dropping the oldest turns until it fits the context."""
    while turns:
        ids = gen.encode(gen.render_chat(system + turns))
        if len(ids) + max_new <= gen.context_length:
            return ids
        turns[:] = turns[2:] if len(turns) > 2 else []
        typer.echo("[context full: dropped the oldest exchange]", err=True)
    return None


@app.command()
@from_config(ChatConfig)
@sampling_flags
def chat(config: ChatConfig, sampling: dict[str, Any]) -> None:
    """Chat with a causal-LM artifact in the terminal (multi-turn; /reset, /exit)."""
    import dataclasses

    from edgeft.artifact import Check
    from edgeft.errors import EdgeftError
    from edgeft.runtime import Generator
    from edgeft.runtime.generate import PromptCache
    from edgeft.runtime.speculate import SpecCounts

    gen = Generator.open(config.artifact, threads=config.threads, check=Check.quick, spin=config.spin)
    if gen.chat_template is None:
        raise EdgeftError(f"{config.artifact} has no chat template: use `edgeft generate` for plain prompts")
    params = sampling_params(gen, sampling)
    head = [{"role": "system", "content": config.system}] if config.system else []
    turns: list[dict] = []
    cache = PromptCache()
    typer.echo(HELP, err=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            return
        except UnicodeDecodeError:
            typer.echo("[that line is not UTF-8 text: not sent]", err=True)
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            turns.clear()
            cache.clear()
            typer.echo("[conversation reset]", err=True)
            continue
        if not text:
            continue
        turns.append({"role": "user", "content": line})
        max_new = min(params.max_new_tokens, gen.context_length // 2)
        ids = _fit(gen, head, turns, max_new)
        if ids is None:
            typer.echo("[that message alone is longer than the model's context]", err=True)
            continue
        typer.echo("assistant> ", nl=False)
        counts = SpecCounts()
        reply, tokens, seconds, reason = stream_to_terminal(gen, ids, dataclasses.replace(params, max_new_tokens=max_new),
                                                            cache, counts=counts)
        turns.append({"role": "assistant", "content": reply})
        if config.stats:
            typer.echo(stats_line(len(ids), tokens, seconds, reason, counts), err=True)
