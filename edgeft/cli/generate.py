"""``edgeft generate``: continue a prompt with a causal-LM artifact, streaming to the terminal,
or a whole file of prompts (``--input prompts.jsonl``) decoded together by the batching engine.

Flags: ``GenerateConfig``'s fields and, over the artifact's defaults, ``SamplingParams``'
(``sampling_flags``, which ``edgeft chat`` shares); ``ChatConfig`` (what chat shares) and
``GenerateConfig`` are declared here, next to the commands. Imports the runtime inside the command
only (never torch).
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgeft.cli.app import app
from edgeft.cli.classify import check_output
from edgeft.cli.options import from_config
from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, flag
from edgeft.fsutil import refuse_overlap, require_file, write_output
from edgeft.runtime.params import SamplingParams, Spin

if TYPE_CHECKING:
    from edgeft.runtime import Generator


# --help panels of edgeft generate.
CONSTRAIN, FILE = "Constrained output", "A file of prompts"


@dataclass(frozen=True)
class ChatConfig:
    """What ``edgeft chat`` and ``edgeft generate`` share (their sampling flags are ``SamplingParams``)."""

    artifact: str = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file (from `edgeft export`)."""
    system: str | None = None
    """A system message that starts the conversation (generate: with --chat)."""
    threads: int | None = field(default=None, metadata=flag(env="EDGEFT_THREADS", min=1))
    """onnxruntime threads [default: all usable cores]."""
    spin: Spin = field(default=Spin.auto, metadata=flag(env="EDGEFT_SPIN"))
    """Idle onnxruntime threads spin (on) or sleep (off); auto: spin only when the cores the threads take
    are idle at load. Env: EDGEFT_SPIN (1, 0 or auto)."""
    stats: bool = False
    """Print token counts, tokens/s and the draft acceptance rate to stderr at the end (chat: of each reply)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class GenerateConfig(ChatConfig):
    """``edgeft generate``: one prompt streamed, or a file of prompts decoded together."""

    prompt: str | None = field(default=None, metadata=flag(argument=True))
    """The prompt; omit it or pass '-' to read it from stdin."""
    chat: bool = False
    """Send the prompt as one user message through the chat template."""
    json_schema: Path | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to JSON valid under the JSON schema in this file (with --input: every prompt's)."""
    regex: str | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to match this regular expression (with --input: every prompt's)."""
    choice: str | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to one of these comma-separated strings (with --input: every prompt's)."""
    input: Path | None = field(default=None, metadata=flag("--input", "-i", panel=FILE))
    """A JSONL file of prompts (strings, or objects with 'prompt' or 'messages', and optionally their own
    'json_schema'), generated together; one JSON result per line out."""
    output: Path | None = field(default=None, metadata=flag("--output", "-o", panel=FILE))
    """With --input: write the results here, not to stdout."""
    parallel: int = field(default=8, metadata=flag(panel=FILE, min=1))
    """With --input: prompts decoded together in one batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(x is not None for x in (self.json_schema, self.regex, self.choice)) > 1:
            raise EdgeftError("give at most one of --json-schema, --regex and --choice")
        if self.input is not None and self.prompt is not None:
            raise EdgeftError("give a prompt or --input FILE, not both")


def constraint_from_config(config: GenerateConfig):
    """``--json-schema FILE``, ``--regex`` or ``--choice A,B,C`` as a ``Constraint`` (None: free text)."""
    from edgeft.runtime.constrain import Constraint

    if config.json_schema is not None:
        require_file(config.json_schema, "--json-schema")
        try:
            return Constraint.json_schema(config.json_schema.read_text(encoding="utf-8"))
        except RecursionError:
            raise EdgeftError(f"--json-schema {config.json_schema} nests too deeply to read") from None
    if config.regex is not None:
        return Constraint.regex(config.regex)
    if config.choice is not None:
        return Constraint.choice([c.strip() for c in config.choice.split(",") if c.strip()])
    return None


def sampling_params(gen: "Generator", sampling: dict[str, Any]) -> SamplingParams:
    """The sampling flags given (``sampling``) over the artifact's defaults (``manifest.generation``)."""
    return SamplingParams.over(gen.manifest.generation, **sampling)


# The sampling flags of generate and chat: SamplingParams' fields, over the artifact's defaults.
sampling_flags = from_config(SamplingParams, into="sampling", over="the artifact's")


def stream_to_terminal(gen: "Generator", prompt: str | list[int], params: "SamplingParams",
                       cache=None, processors=(), counts=None) -> tuple[str, int, float, str]:
    """Print chunks as they come; return (text, tokens, seconds, finish_reason).

    ``counts`` (a ``SpecCounts``) gathers the speculative steps' drafted and accepted tokens."""
    pieces, tokens, reason = [], 0, "length"
    start = time.perf_counter()
    for chunk in gen.stream(prompt, params, cache=cache, processors=processors, counts=counts):
        if chunk.text:
            typer.echo(chunk.text, nl=False)
            sys.stdout.flush()
            pieces.append(chunk.text)
        tokens += chunk.token_id is not None
        reason = chunk.finish_reason or reason
    typer.echo("")
    return "".join(pieces), tokens, time.perf_counter() - start, reason


def stats_line(prompt_tokens: int, tokens: int, seconds: float, reason: str, counts) -> str:
    """What --stats prints: token counts, tokens/s, the draft acceptance rate, the finish reason."""
    drafts = (f"drafts: {counts.accepted}/{counts.drafted} accepted ({100 * counts.rate:.0f}%) in {counts.steps} "
              "steps" if counts.drafted else "drafts: none")
    return (f"[{prompt_tokens} prompt tokens, {tokens} generated in {seconds:.2f}s "
            f"({tokens / max(seconds, 1e-9):.1f} tok/s), {drafts}, finish: {reason}]")


def _read_stdin() -> str:
    from edgeft.errors import EdgeftError

    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeftError(f"the prompt on stdin is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start})") from None


@app.command()
@from_config(GenerateConfig)
@sampling_flags
def generate(config: GenerateConfig, sampling: dict[str, Any]) -> None:
    """Continue a prompt with a causal-LM artifact, streaming the text as it is generated.

    --json-schema, --regex or --choice constrain the output (a mask on every step's tokens)."""
    from edgeft.artifact import Check
    from edgeft.runtime import Generator, compile_for
    from edgeft.runtime.speculate import SpecCounts

    constraint = constraint_from_config(config)
    if config.output is not None:  # before loading the model
        if config.input is not None:
            refuse_overlap(config.output, config.input, "--output", "--input")
        check_output(config.output)
    if config.input is not None:
        gen = Generator.open(config.artifact, threads=config.threads, spin=config.spin)
        return generate_file(gen, config, sampling_params(gen, sampling), constraint)
    prompt = _read_stdin() if config.prompt in (None, "-") else config.prompt
    gen = Generator.open(config.artifact, threads=config.threads, check=Check.quick, spin=config.spin)
    params = sampling_params(gen, sampling)
    if config.chat:
        system = [{"role": "system", "content": config.system}] if config.system else []
        prompt = gen.render_chat(system + [{"role": "user", "content": prompt}])
    ids = gen.encode(prompt)
    processors = [compile_for(gen, constraint).mask()] if constraint is not None else []
    counts = SpecCounts()
    _, tokens, seconds, reason = stream_to_terminal(gen, ids, params, processors=processors, counts=counts)
    if config.stats:
        typer.echo(stats_line(len(ids), tokens, seconds, reason, counts), err=True)


def read_prompts(path: Path) -> list[dict]:
    """Rows of a JSONL prompt file: each a string or an object with 'prompt' or 'messages' (other keys kept;
    'json_schema', when there, an object: the row's own output schema)."""
    from edgeft.data import read_text

    require_file(path, "--input")
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
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
        if "json_schema" in obj and not isinstance(obj["json_schema"], dict):
            raise EdgeftError(f"{path}:{n}: 'json_schema' must be a JSON schema object")
        rows.append(obj)
    if not rows:
        raise EdgeftError(f"{path} holds no prompts")
    return rows


def row_grammars(gen: "Generator", rows: list[dict], constraint: Any, path: Path) -> list:
    """Each row's compiled constraint: its own 'json_schema', else the flags' (None: free text); each
    distinct constraint compiled once, a bad one named by its line."""
    from edgeft.runtime import compile_for
    from edgeft.runtime.constrain import Constraint, ConstraintError

    compiled: dict[Any, Any] = {}
    out = []
    for n, row in enumerate(rows, 1):
        c = Constraint.json_schema(row["json_schema"]) if "json_schema" in row else constraint
        if c is not None and c not in compiled:
            try:
                compiled[c] = compile_for(gen, c)
            except ConstraintError as exc:
                raise EdgeftError(f"{path}, prompt {n}: {exc}" if c is not constraint else str(exc)) from None
        out.append(None if c is None else compiled[c])
    return out


def generate_file(gen: "Generator", config: GenerateConfig, params: SamplingParams, constraint: Any = None) -> None:
    """Every prompt of ``config.input`` through ``Generator.generate_batch``, with a progress bar on stderr
    (``constraint``: the flags', for every prompt without its own 'json_schema')."""
    assert config.input is not None
    path, output = config.input, config.output
    rows = read_prompts(path)
    prompts = []
    for row in rows:
        if "messages" in row:
            prompts.append(gen.render_chat(row["messages"]))
        elif config.chat:
            sys_msg = [{"role": "system", "content": config.system}] if config.system else []
            prompts.append(gen.render_chat(sys_msg + [{"role": "user", "content": row["prompt"]}]))
        else:
            prompts.append(row["prompt"])
    ids: list[str | list[int]] = [gen.encode(p) for p in prompts]
    grammars = row_grammars(gen, rows, constraint, path)
    masks = lambda i: [grammars[i].mask()] if grammars[i] is not None else []  # noqa: E731
    start = time.perf_counter()
    with typer.progressbar(length=len(ids), label="generating", file=sys.stderr) as bar:
        outs = gen.generate_batch(ids, params, parallel=config.parallel, on_done=lambda i: bar.update(1),
                                  processors=masks)
    seconds = time.perf_counter() - start
    buf = io.StringIO()
    for i, (row, out) in enumerate(zip(rows, outs)):
        result = {"index": i, **({"id": row["id"]} if "id" in row else {}), "text": out.text,
                  "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                  "completion_tokens": out.completion_tokens}
        buf.write(json.dumps(result, ensure_ascii=False) + "\n")
    if output is not None:
        write_output(output, buf.getvalue().encode("utf-8"))
    else:
        sys.stdout.write(buf.getvalue())
    tokens = sum(o.completion_tokens for o in outs)
    typer.echo(f"{len(outs)} prompts, {tokens} tokens generated in {seconds:.1f}s "
               f"({tokens / max(seconds, 1e-9):.1f} tok/s){f' -> {output}' if output else ''}", err=True)
