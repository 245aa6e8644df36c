"""``edgeft generate``: continue a prompt with a causal-LM artifact, streaming to the terminal,
or a whole file of prompts (``--input prompts.jsonl``) decoded together by the batching engine.

Also holds the sampling flags that ``edgeft chat`` shares. Imports the runtime inside the
command only (never torch).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgeft.cli.app import app
from edgeft.errors import EdgeftError

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


def constraint_from_flags(json_schema: Path | None, regex: str | None, choice: str | None):
    """At most one of --json-schema FILE, --regex, --choice A,B,C as a ``Constraint`` (None: free text)."""
    from edgeft.runtime.constrain import Constraint

    if sum(x is not None for x in (json_schema, regex, choice)) > 1:
        raise EdgeftError("give at most one of --json-schema, --regex and --choice")
    if json_schema is not None:
        if not json_schema.is_file():
            raise EdgeftError(f"--json-schema {json_schema} is not a file")
        return Constraint.json_schema(json_schema.read_text(encoding="utf-8"))
    if regex is not None:
        return Constraint.regex(regex)
    if choice is not None:
        return Constraint.choice([c.strip() for c in choice.split(",") if c.strip()])
    return None


def sampling_params(gen: "Generator", max_new_tokens: int | None, temperature: float | None, top_k: int | None,
                    top_p: float | None, repetition_penalty: float | None, seed: int | None,
                    stop: list[str] | None) -> "SamplingParams":
    """Flags over the artifact's defaults (``manifest.generation``)."""
    from edgeft.runtime import SamplingParams

    return SamplingParams.over(gen.manifest.generation, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                               stop=tuple(stop or ()))


def stream_to_terminal(gen: "Generator", prompt: str | list[int], params: "SamplingParams",
                       cache=None, processors=()) -> tuple[str, int, float, str]:
    """Print chunks as they come; return (text, tokens, seconds, finish_reason)."""
    pieces, tokens, reason = [], 0, "length"
    start = time.perf_counter()
    for chunk in gen.stream(prompt, params, cache=cache, processors=processors):
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
    json_schema: Path = typer.Option(None, "--json-schema", show_default=False,
                                     help="Constrain the output to JSON valid under the JSON schema in this file."),
    regex: str = typer.Option(None, "--regex", show_default=False, help="Constrain the output to match this regular expression."),
    choice: str = typer.Option(None, "--choice", show_default=False, help="Constrain the output to one of these comma-separated strings."),
    input: Path = typer.Option(None, "--input", "-i", help="A JSONL file of prompts (strings, or objects with "
                               "'prompt' or 'messages'), generated together; one JSON result per line out."),
    output: Path = typer.Option(None, "--output", "-o", help="With --input: write the results here, not to stdout."),
    parallel: int = typer.Option(8, "--parallel", help="With --input: prompts decoded together in one batch."),
) -> None:
    """Continue a prompt with a causal-LM artifact, streaming the text as it is generated.

    --json-schema, --regex or --choice constrain the output (a mask on every step's tokens)."""
    from edgeft.artifact import Check
    from edgeft.runtime import Generator, compile_for

    constraint = constraint_from_flags(json_schema, regex, choice)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else max_new_tokens_n
    if input is not None:
        if prompt is not None:
            raise EdgeftError("give a prompt or --input FILE, not both")
        if constraint is not None:
            raise EdgeftError("--json-schema, --regex and --choice constrain one prompt: not with --input")
        gen = Generator.open(artifact, threads=threads)
        params = sampling_params(gen, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
        return generate_file(gen, input, output, params, parallel, chat, system)
    if prompt is None or prompt == "-":
        prompt = _read_stdin()
    gen = Generator.open(artifact, threads=threads, check=Check.quick)
    params = sampling_params(gen, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = gen.render_chat(messages)
    ids = gen.encode(prompt)
    processors = [compile_for(gen, constraint).mask()] if constraint is not None else []
    _, tokens, seconds, reason = stream_to_terminal(gen, ids, params, processors=processors)
    if stats:
        typer.echo(f"[{len(ids)} prompt tokens, {tokens} generated in {seconds:.2f}s "
                   f"({tokens / max(seconds, 1e-9):.1f} tok/s), finish: {reason}]", err=True)


def read_prompts(path: Path) -> list[dict]:
    """Rows of a JSONL prompt file: each a string or an object with 'prompt' or 'messages' (other keys kept)."""
    if not path.is_file():
        raise EdgeftError(f"{path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise EdgeftError(f"{path}:{n} is not a JSON line") from None
        obj = {"prompt": obj} if isinstance(obj, str) else obj
        ok = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or isinstance(obj.get("messages"), list))
        if not ok:
            raise EdgeftError(f"{path}:{n}: expected a string or an object with 'prompt' (a string) or 'messages'")
        rows.append(obj)
    if not rows:
        raise EdgeftError(f"{path} holds no prompts")
    return rows


def generate_file(gen: "Generator", path: Path, output: Path | None, params: "SamplingParams", parallel: int,
                  chat: bool, system: str | None) -> None:
    """Every prompt of ``path`` through ``Generator.generate_batch``, with a progress bar on stderr."""
    if parallel < 1:
        raise EdgeftError(f"--parallel must be at least 1, got {parallel}")
    rows = read_prompts(path)
    prompts = []
    for row in rows:
        if "messages" in row:
            prompts.append(gen.render_chat(row["messages"]))
        elif chat:
            sys_msg = [{"role": "system", "content": system}] if system else []
            prompts.append(gen.render_chat(sys_msg + [{"role": "user", "content": row["prompt"]}]))
        else:
            prompts.append(row["prompt"])
    ids = [gen.encode(p) for p in prompts]
    start = time.perf_counter()
    with typer.progressbar(length=len(ids), label="generating", file=sys.stderr) as bar:
        outs = gen.generate_batch(ids, params, parallel=parallel, on_done=lambda i: bar.update(1))
    seconds = time.perf_counter() - start
    buf = io.StringIO()
    for i, (row, out) in enumerate(zip(rows, outs)):
        result = {"index": i, **({"id": row["id"]} if "id" in row else {}), "text": out.text,
                  "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                  "completion_tokens": out.completion_tokens}
        buf.write(json.dumps(result, ensure_ascii=False) + "\n")
    if output is not None:
        from edgeft.fsutil import atomic_write_bytes

        atomic_write_bytes(output, buf.getvalue().encode("utf-8"))
    else:
        sys.stdout.write(buf.getvalue())
    tokens = sum(o.completion_tokens for o in outs)
    typer.echo(f"{len(outs)} prompts, {tokens} tokens generated in {seconds:.1f}s "
               f"({tokens / max(seconds, 1e-9):.1f} tok/s){f' -> {output}' if output else ''}", err=True)
