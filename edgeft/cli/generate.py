"""``edgeft generate``: continue a prompt with a causal-LM artifact, streaming to the terminal.

Also holds the sampling flags that ``edgeft chat`` shares. Imports the runtime inside the
command only (never torch).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import typer

from edgeft.cli.app import app

if TYPE_CHECKING:
    from edgeft.runtime import Generator, SamplingParams

ARTIFACT_HELP = "Artifact folder or packed .edgeft file (from `edgeft export`)."
MAX_NEW = typer.Option(None, "--max-new-tokens", help="Most tokens to generate [default: the artifact's, else 128].")
# -n was --max-new-tokens here; across commands it means tune's --trainable-layers. Still accepted, hidden.
MAX_NEW_N = typer.Option(None, "-n", hidden=True)
TEMPERATURE = typer.Option(None, "--temperature", "-t", help="0 is greedy; higher is more random [default: the artifact's, else 0].")
TOP_K = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens (0: off).")
TOP_P = typer.Option(None, "--top-p", help="Sample only among the most likely tokens holding this much probability (1: off).")
REPETITION = typer.Option(None, "--repetition-penalty", help="Above 1 discourages repeating tokens of the context (1: off).")
SEED = typer.Option(None, "--seed", help="Random seed: the same seed and flags give the same text.")
STOP = typer.Option(None, "--stop", help="End generation where this text appears (repeatable); it is not printed.")
THREADS = typer.Option(None, "--threads", help="onnxruntime threads [default: all usable cores, or $EDGEFT_THREADS].")


def sampling_params(gen: "Generator", max_new_tokens: int | None, temperature: float | None, top_k: int | None,
                    top_p: float | None, repetition_penalty: float | None, seed: int | None,
                    stop: list[str] | None) -> "SamplingParams":
    """Flags over the artifact's defaults (``manifest.generation``)."""
    from edgeft.runtime import SamplingParams

    return SamplingParams.over(gen.manifest.generation, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                               stop=tuple(stop or ()))


def stream_to_terminal(gen: "Generator", prompt: str | list[int], params: "SamplingParams",
                       cache=None) -> tuple[str, int, float, str]:
    """Print chunks as they come; return (text, tokens, seconds, finish_reason)."""
    pieces, tokens, reason = [], 0, "length"
    start = time.perf_counter()
    for chunk in gen.stream(prompt, params, cache=cache):
        if chunk.text:
            typer.echo(chunk.text, nl=False)
            sys.stdout.flush()
            pieces.append(chunk.text)
        tokens += chunk.token_id is not None
        reason = chunk.finish_reason or reason
    typer.echo("")
    return "".join(pieces), tokens, time.perf_counter() - start, reason


def _read_stdin() -> str:
    from edgeft.errors import EdgeftError

    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeftError(f"the prompt on stdin is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start})") from None


@app.command()
def generate(
    artifact: str = typer.Argument(..., help=ARTIFACT_HELP),
    prompt: str = typer.Argument(None, help="The prompt; omit it or pass '-' to read it from stdin."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as one user message through the chat template."),
    system: str = typer.Option(None, "--system", help="With --chat: a system message first."),
    max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P,
    repetition_penalty: float = REPETITION, seed: int = SEED, stop: list[str] = STOP, threads: int = THREADS,
    max_new_tokens_n: int = MAX_NEW_N,
    stats: bool = typer.Option(False, "--stats", help="Print token counts and tokens/s to stderr at the end."),
) -> None:
    """Continue a prompt with a causal-LM artifact, streaming the text as it is generated."""
    from edgeft.artifact import Check
    from edgeft.runtime import Generator

    if prompt is None or prompt == "-":
        prompt = _read_stdin()
    gen = Generator.open(artifact, threads=threads, check=Check.quick)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else max_new_tokens_n
    params = sampling_params(gen, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = gen.render_chat(messages)
    ids = gen.encode(prompt)
    _, tokens, seconds, reason = stream_to_terminal(gen, ids, params)
    if stats:
        typer.echo(f"[{len(ids)} prompt tokens, {tokens} generated in {seconds:.2f}s "
                   f"({tokens / max(seconds, 1e-9):.1f} tok/s), finish: {reason}]", err=True)
