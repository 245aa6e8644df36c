"""Text generation on onnxruntime with a KV cache: prefill the prompt, then decode token by token.

Two kinds of decoder graph follow the artifact convention (see ``edgeft.artifact``):

- the onnxruntime-genai builder's fused graph (GroupQueryAttention). Its past and present
  caches can be ONE buffer: the cache for the whole generation is allocated once, bound
  as both input and output, and the kernel writes each new key/value in place
  (``past_present_share_buffer``, as onnxruntime-genai's own loop does). Nothing is
  copied or reallocated per token.
- a torch.onnx-exported graph, whose ``present`` outputs are ``past`` concatenated with
  the new step. onnxruntime allocates them; they are bound straight back as the next
  step's ``past`` (OrtValues, no numpy round trip).

Either way every input and output goes through one I/O binding per generation; a decode
step rebinds only the attention mask's length and writes one token id into a bound
buffer, and the graph's logits for that one position land in a preallocated array.
Prompts are prefilled in chunks (the logits output stays small), and a ``PromptCache``
lets a conversation's next turn reuse the keys and values of the tokens it repeats. A
prompt-lookup draft (``edgeft.runtime.speculate``) is verified as a short prefill of the
pending token and the draft; the rejected tail is then rewound out of the cache.

A split artifact (``edgeft.artifact.Trunk``) runs as two graphs per call: the trunk (shared
with every model tuned from the same base, ``edgeft.runtime.trunks``) holds the embeddings,
blocks 0..K-1 and their caches; the top, the blocks above, the head and their caches. Where the
head is the base's (``edgeft.artifact.Head``) it is a third graph, shared like the trunk, with no
cache: the top ends at its input. Each part has its own I/O binding; the tensors that cross pass
as OrtValues, never copied.

``KVDecoder`` knows token ids and logits only; ``Generator`` adds the tokenizer, chat
template, sampling, stop strings and incremental detokenization. Nothing here imports
torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeft.artifact import Check, Decoder, Manifest, Task, open_artifact
from edgeft.data import check_text
from edgeft.errors import EdgeftError
from edgeft.runtime import chat
from edgeft.runtime.detok import IncrementalDetokenizer
from edgeft.runtime.processors import LogitProcessor
from edgeft.runtime.sampling import Sampler, SamplingParams, TokenLogprob
from edgeft.runtime.session import default_threads, input_dtypes, open_session, output_dtypes, resolve_spin
from edgeft.runtime.speculate import SpecCounts, Speculator


# Prompt tokens per graph call during prefill: bounds the activations (and the logits output
# of graphs without ``logits_to_keep``, or when every position's logits are asked for).
PREFILL_CHUNK = 256
# ``logits_to_keep`` values, bound by address (so they live as long as the module)
_KEEP_LAST = np.array([1], dtype=np.int64)
_KEEP_ALL = np.array([0], dtype=np.int64)


class ContextLengthError(EdgeftError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass(frozen=True)
class Chunk:
    """One step of a stream: the text this token completed (may be "" while held back).

    ``token_id`` is the generated token, or None on a closing chunk that generated nothing
    new (an end-of-sequence token is not part of the output). ``finish_reason`` is None
    until the last chunk, then "stop" (EOS or a stop string) or "length" (or "cancelled"
    from the batching engine when the caller gave up).
    """

    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # when SamplingParams.logprobs is set


@dataclass(frozen=True)
class Completion:
    """A whole generation: text, generated ids (EOS excluded) and the counts an API reports."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for


# --------------------------------------------------------------------------- the engine


@dataclass
class Part:
    """One graph of a decoder: all of it, or a split artifact's trunk, top or head."""

    session: ort.InferenceSession
    inputs: set[str]
    layers: list[tuple[str, str, str, str]]  # past key, past value, present key, present value
    sends: list[str]  # tensors the next part reads (a trunk's boundary); empty for the last part

    def output_names(self, last: bool) -> list[str]:
        """Bound outputs in binding order (a rebound name keeps its place): presents, sends, logits."""
        return [n for _, _, ok, ov in self.layers for n in (ok, ov)] + self.sends + (["logits"] if last else [])


class ChainedBinding:
    """An I/O binding over a split decoder's parts, used as one: an input goes to every part that
    reads it, an output to the part that makes it; ``run`` runs the parts in order, each part's
    ``sends`` bound as OrtValues into the next; ``get_outputs`` are the last part's."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.ios = [part.session.io_binding() for part in parts]
        self.out_of = {name: i for i, part in enumerate(parts) for name in part.output_names(part is parts[-1])}
        self.bound: list[list[str]] = [[] for _ in parts]  # each part's outputs in binding order
        for part in parts:
            for name in part.sends:
                self.bind_output(name, "cpu")

    def bind_input(self, name: str, *args) -> None:
        for part, io in zip(self.parts, self.ios):
            if name in part.inputs:
                io.bind_input(name, *args)

    def bind_output(self, name: str, *args) -> None:
        i = self.out_of[name]
        self.ios[i].bind_output(name, *args)
        if name not in self.bound[i]:  # a rebound name keeps its place
            self.bound[i].append(name)

    def get_outputs(self) -> list[ort.OrtValue]:
        return self.ios[-1].get_outputs()

    def run(self) -> None:
        for i, (part, io) in enumerate(zip(self.parts, self.ios)):
            part.session.run_with_iobinding(io)
            if part.sends:
                outs = dict(zip(self.bound[i], io.get_outputs()))
                for name in part.sends:
                    self.ios[i + 1].bind_ortvalue_input(name, outs[name])
                    io.bind_output(name, "cpu")  # allocated afresh next run (its length changes)


class KVDecoder:
    """Drives one decoder graph: ``start`` a cache, ``prefill`` a prompt, ``step`` one token.

    With ``trunk`` (a split artifact's shared trunk, ``edgeft.runtime.trunks.SharedTrunk``),
    ``session`` is the top: the trunk runs first on every call and owns the caches of its
    ``blocks`` lowest layers. With ``head`` too (``SharedHead``), the top ends at the head's
    input and the head makes the logits."""

    def __init__(self, session: ort.InferenceSession, decoder: Decoder, share_buffer: bool, trunk=None,
                 head=None) -> None:
        self.session = session
        self.decoder = decoder
        self.trunk, self.head = trunk, head
        names = [i.name for i in session.get_inputs()]
        top_inputs = set(names)
        if trunk is not None:
            names += [i.name for i in trunk.session.get_inputs()]
        self.inputs = set(names)
        dtypes = {**input_dtypes(session), **(trunk.dtypes if trunk is not None else {})}
        self.ids_dtype = dtypes["input_ids"]
        self.mask_dtype = dtypes.get("attention_mask", np.int64)
        self.pos_dtype = dtypes.get("position_ids", np.int64)
        self.uses_positions = "position_ids" in self.inputs
        self.layers = [(decoder.past_key.format(i=i), decoder.past_value.format(i=i),
                        decoder.present_key.format(i=i), decoder.present_value.format(i=i))
                       for i in range(decoder.num_layers)]
        missing = [n for layer in self.layers for n in layer[:2] if n not in self.inputs]
        if missing or "input_ids" not in self.inputs:
            raise EdgeftError(f"the decoder graph lacks inputs the manifest names: {', '.join(missing[:3]) or 'input_ids'}")
        if trunk is None:
            if head is not None:
                raise EdgeftError("a decoder's head is a graph of its own only where the decoder is split")
            self.parts = [Part(session, top_inputs, self.layers, [])]
        else:
            below = {i.name for i in trunk.session.get_inputs()}
            k = trunk.blocks
            above = top_inputs | {i.name for i in session.get_overridable_initializers()}  # logits_to_keep
            self.parts = [Part(trunk.session, below, self.layers[:k], list(trunk.outputs)),
                          Part(session, above, self.layers[k:], [head.input] if head is not None else [])]
            if any(n not in below for layer in self.layers[:k] for n in layer[:2]) or set(trunk.outputs) - top_inputs:
                raise EdgeftError(f"the trunk and top graphs do not meet at block {k} as the manifest says")
            if head is not None:
                if head.input not in output_dtypes(session):
                    raise EdgeftError(f"the top graph does not end at the head's input {head.input!r} as the manifest says")
                self.parts.append(Part(head.session, {head.input}, [], []))
            if not share_buffer:
                raise EdgeftError("a split decoder runs on the builder's graph, whose past and present share one buffer")
        self.kv_dtype = dtypes[self.layers[0][0]]
        self.logits_dtype = output_dtypes(head.session if head is not None else session)["logits"]
        self.share_buffer = share_buffer
        self.vocab = decoder.vocab_size
        self.keep = decoder.logits_to_keep  # None: the graph computes every position's logits
        overridable = {i.name for i in session.get_overridable_initializers()}
        if self.keep and self.keep not in overridable | self.inputs:
            raise EdgeftError(f"the decoder graph lacks the {self.keep} input the manifest names")

    def io_binding(self):
        """A binding for one call of the whole model: the session's own, or one over a split model's parts."""
        return self.session.io_binding() if self.trunk is None else ChainedBinding(self.parts)

    def run(self, io) -> None:
        """Run the model on ``io`` (from ``io_binding``)."""
        if self.trunk is None:
            self.session.run_with_iobinding(io)
        else:
            io.run()

    def top_hidden(self, io) -> ort.OrtValue:
        """Run the top alone on ``io`` (a binding of the top's session, its inputs and caches bound by the caller)
        up to the head's input: that tensor ``[rows, positions, hidden]``, for the shared head (a model with one)."""
        io.bind_output(self.head.input, "cpu")  # bound last
        self.parts[1].session.run_with_iobinding(io)
        return io.get_outputs()[-1]

    def top_logits(self, io, rows: int) -> np.ndarray:
        """Run the top alone on ``io`` (as ``top_hidden``, one position per row), then the head where the model
        has its own graph for it: the rows' logits ``[rows, 1, vocab]``."""
        logits = np.empty((rows, 1, self.vocab), dtype=self.logits_dtype)
        if self.head is not None:
            return self.head.run(self.top_hidden(io), out=logits)
        io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.parts[1].session.run_with_iobinding(io)
        return logits

    def bind_keep(self, io, last_only: bool) -> None:
        """Ask ``io``'s next run for the last position's logits only, or for every position's."""
        if self.keep:
            arr = _KEEP_LAST if last_only else _KEEP_ALL
            io.bind_input(self.keep, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def start(self, capacity: int) -> "DecodeState":
        """A fresh cache for up to ``capacity`` tokens (prompt and generated)."""
        return DecodeState(self, capacity)


class DecodeState:
    """The cache and I/O binding of one sequence being generated."""

    def __init__(self, eng: KVDecoder, capacity: int) -> None:
        self.eng = eng
        self.capacity = capacity
        self.length = 0  # tokens already in the cache
        self.io = eng.io_binding()  # over the trunk and the top, for a split model
        self.mask = np.ones((1, capacity), dtype=eng.mask_dtype)
        self.positions = np.arange(capacity, dtype=eng.pos_dtype)[None, :]
        self.token = np.zeros((1, 1), dtype=eng.ids_dtype)
        self.logits = np.empty((1, 1, eng.vocab), dtype=eng.logits_dtype)
        self._decode_bound = False
        d = eng.decoder
        if eng.share_buffer:
            # One buffer per layer and per key/value, bound as past AND present: written in place.
            shape = (1, d.num_kv_heads, capacity, d.head_dim)
            self.cache = [np.empty(shape, dtype=eng.kv_dtype) for _ in range(2 * d.num_layers)]
            for (pk, pv, ok, ov), k, v in zip(eng.layers, self.cache[0::2], self.cache[1::2]):
                for name_in, name_out, buf in ((pk, ok, k), (pv, ov, v)):
                    self._bind_in(name_in, buf, buf.shape)
                    self.io.bind_output(name_out, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            empty = np.zeros((1, d.num_kv_heads, 0, d.head_dim), dtype=eng.kv_dtype)
            self.cache = [empty]
            for pk, pv, ok, ov in eng.layers:
                self._bind_in(pk, empty, empty.shape)
                self._bind_in(pv, empty, empty.shape)
                self.io.bind_output(ok, "cpu")
                self.io.bind_output(ov, "cpu")
        self.io.bind_output("logits", "cpu")

    def _bind_in(self, name: str, arr: np.ndarray, shape, offset: int = 0) -> None:
        self.io.bind_input(name, "cpu", 0, arr.dtype, list(shape), arr.ctypes.data + offset * arr.itemsize)

    def _run(self, n: int) -> None:
        """Run the graph on ``n`` new tokens already bound as input_ids."""
        eng = self.eng
        total = self.length + n
        if total > self.capacity:
            raise ContextLengthError(f"the cache holds {self.capacity} tokens; {total} needed")
        if "attention_mask" in eng.inputs:
            self._bind_in("attention_mask", self.mask, (1, total))
        if eng.uses_positions:
            self._bind_in("position_ids", self.positions, (1, n), offset=self.length)
        eng.run(self.io)
        self.length = total
        if not eng.share_buffer:  # the new presents become the next pasts, as OrtValues
            outs = dict(zip(self._output_names(), self.io.get_outputs()))
            self.pasts = [outs[name] for _, _, ok, ov in eng.layers for name in (ok, ov)]
            for pk, pv, ok, ov in eng.layers:
                self.io.bind_ortvalue_input(pk, outs[ok])
                self.io.bind_ortvalue_input(pv, outs[ov])
                self.io.bind_output(ok, "cpu")  # unallocated again: the next present is one longer
                self.io.bind_output(ov, "cpu")

    def rewind(self, length: int) -> None:
        """Forget every cached token after the first ``length`` (to reuse a shared prefix)."""
        if length >= self.length:
            return
        if not self.eng.share_buffer:  # the pasts are exact-length tensors: bind shortened copies
            self.cache = [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.pasts]
            for (pk, pv, _, _), k, v in zip(self.eng.layers, self.cache[0::2], self.cache[1::2]):
                self._bind_in(pk, k, k.shape)
                self._bind_in(pv, v, v.shape)
        self.length = length  # a shared buffer just gets overwritten from there on

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens, keeping what is cached."""
        if capacity <= self.capacity:
            return
        self.mask = np.ones((1, capacity), dtype=self.eng.mask_dtype)
        self.positions = np.arange(capacity, dtype=self.eng.pos_dtype)[None, :]
        if self.eng.share_buffer:
            old, n = self.cache, self.length
            self.cache = []
            for (pk, pv, ok, ov), k, v in zip(self.eng.layers, old[0::2], old[1::2]):
                for name_in, name_out, buf in ((pk, ok, k), (pv, ov, v)):
                    grown = np.empty(buf.shape[:2] + (capacity,) + buf.shape[3:], dtype=buf.dtype)
                    grown[:, :, :n] = buf[:, :, :n]
                    self.cache.append(grown)
                    self._bind_in(name_in, grown, grown.shape)
                    self.io.bind_output(name_out, "cpu", 0, grown.dtype, list(grown.shape), grown.ctypes.data)
        self.capacity = capacity

    def _output_names(self) -> list[str]:
        """Bound outputs in binding order (a rebound name keeps its place): presents, then logits."""
        return [n for _, _, ok, ov in self.eng.layers for n in (ok, ov)] + ["logits"]

    def prefill(self, ids: list[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Feed prompt tokens; return the last position's logits [vocab] (or every position's).

        Long prompts go in chunks of ``PREFILL_CHUNK`` tokens, so the graph's logits output
        (every position x the vocabulary) stays small: 256 x 49k floats, not 8k x 49k.
        """
        arr = np.ascontiguousarray(np.asarray(ids, dtype=self.eng.ids_dtype).reshape(1, -1))
        if arr.shape[1] == 0:
            raise EdgeftError("the prompt is empty: nothing to continue from")
        rows = []
        self.eng.bind_keep(self.io, last_only=not all_logits)
        for start in range(0, arr.shape[1], PREFILL_CHUNK):
            chunk = arr[:, start:start + PREFILL_CHUNK]
            self._bind_in("input_ids", chunk, chunk.shape)
            self.io.bind_output("logits", "cpu")  # allocated by onnxruntime: [1, len(chunk), vocab]
            self._decode_bound = False
            self._run(chunk.shape[1])
            logits = self._logits_output()
            if all_logits:
                rows.append(logits[0].astype(np.float32))
        return np.concatenate(rows) if all_logits else logits[0, -1].astype(np.float32)

    def _logits_output(self) -> np.ndarray:
        return self.io.get_outputs()[-1].numpy()  # logits are bound last

    def step(self, token: int) -> np.ndarray:
        """Feed one generated token; return the next position's logits [vocab] (float32)."""
        if not self._decode_bound:  # from now on one token in, one row of logits out, no allocation
            self._bind_in("input_ids", self.token, (1, 1))
            self.io.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape),
                                self.logits.ctypes.data)
            self._decode_bound = True
        self.token[0, 0] = token
        self._run(1)
        row = self.logits[0, 0]
        return row.astype(np.float32) if row.dtype != np.float32 else row.copy()


# --------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Cuts the output at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def finish(self, text: str) -> tuple[str, bool]:
        """At the end: whatever is left, cut at a stop string if one completed."""
        out, hit = self.feed(text)
        rest, self.held = self.held, ""
        return (out if hit else out + rest), hit


# --------------------------------------------------------------------------- the generator


class PromptCache:
    """The KV cache a conversation leaves behind, reused by its next turn.

    Each turn's prompt repeats the previous turns; only the tokens after the longest
    common prefix with what the cache holds are computed. One per conversation; not
    thread-safe (one stream at a time).
    """

    def __init__(self) -> None:
        self.state: DecodeState | None = None
        self.tokens: list[int] = []  # the tokens whose keys and values the state holds
        self.reused = 0  # prompt tokens not recomputed, over the cache's life

    def clear(self) -> None:
        self.state, self.tokens = None, []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _shares_buffer(folder: Path, manifest: Manifest) -> bool:
    """Whether the graph's past and present caches may be one buffer (the genai builder's GQA)."""
    if manifest.graph.genai_config and (folder / manifest.graph.genai_config).is_file():
        cfg = json.loads((folder / manifest.graph.genai_config).read_text())
        return bool(cfg.get("search", {}).get("past_present_share_buffer", False))
    return manifest.graph.builder == "onnxruntime-genai" and manifest.graph.fused


class Generator:
    """A causal language model artifact, ready to continue prompts and chats."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None,
                 profile_prefix: str | None = None, spin=None, reserve: float = 0.0) -> None:
        if manifest.task is not Task.causal_lm:
            raise EdgeftError(f"{folder} is a {manifest.task.value} artifact, not a text generator")
        self.folder, self.manifest = Path(folder), manifest
        from edgeft.runtime import trunks

        # one tokenizer per tokenizer file (by its sha256) in this process
        tok_file = manifest.tokenizer.file
        digest = manifest.files.get(tok_file, {}).get("sha256") or str(self.folder / tok_file)
        self.tokenizer = trunks.load_tokenizer(self.folder / tok_file, digest)
        self.decoder = manifest.decoder
        threads = threads or default_threads()
        # spinning or sleeping pool threads: an explicit Spin, else what the machine shows now
        self.spinning, self.spin_reason = resolve_spin(spin, threads, reserve, split=manifest.trunk is not None)
        session = open_session(self.folder / manifest.graph.file, threads, spin=self.spinning,
                               profile_prefix=profile_prefix)
        shared = head = None
        if manifest.trunk is not None:  # one session per trunk (and head) digest in this process
            shared = trunks.load(self.folder, manifest.trunk, threads, self.spinning)
            if manifest.head is not None:
                head = trunks.load_head(self.folder, manifest.head, threads, self.spinning)
        self.engine = KVDecoder(session, self.decoder, _shares_buffer(self.folder, manifest), shared, head)
        tok = manifest.tokenizer
        self.eos_ids = frozenset(tok.eos_token_ids) or self._token_ids(tok.eos_token)
        self.bos_id = self.tokenizer.token_to_id(tok.bos_token) if tok.bos_token else None
        self.chat_template = chat.load_template(self.folder, tok.chat_template, tok.config_file)

    @classmethod
    def open(cls, path: str | Path, threads: int | None = None, check: Check = Check.full,
             trusted_keys: Sequence = (), profile_prefix: str | None = None, spin=None) -> "Generator":
        """Open an artifact folder or packed ``.edgeft`` file, checked (``edgeft.artifact.open_artifact``).

        ``profile_prefix``: onnxruntime profiles every session run into ``<prefix>*.json`` (per-op
        times; ``engine.session.end_profiling()`` writes the file); off by default. ``spin``: the
        thread policy (``edgeft.runtime.session.resolve_spin``).
        """
        folder, manifest = open_artifact(path, check, trusted_keys)
        return cls(folder, manifest, threads, profile_prefix, spin=spin)

    def _token_ids(self, token: str | None) -> frozenset[int]:
        tid = self.tokenizer.token_to_id(token) if token else None
        return frozenset() if tid is None else frozenset({tid})

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    # ---- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the special tokens the model expects (BOS where it needs one)."""
        ids = self.tokenizer.encode(check_text(text, "the prompt"), add_special_tokens=True).ids
        if self.manifest.tokenizer.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as prompt text via the artifact's chat template, ending in the assistant's turn."""
        if self.chat_template is None:
            raise EdgeftError(f"{self.folder.name} has no chat template: use plain prompts (edgeft generate)")
        tok = self.manifest.tokenizer
        return chat.render(self.chat_template, messages, add_generation_prompt=True,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.decoder.vocab_size]
        if bad:
            raise EdgeftError(f"token id {bad[0]} is outside the vocabulary (0..{self.decoder.vocab_size - 1})")
        return ids

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ``ContextLengthError`` when the prompt and the tokens asked for exceed the context."""
        ctx = self.decoder.context_length
        if prompt_tokens + max_new_tokens > ctx:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                f"{prompt_tokens + max_new_tokens} exceeds the model's context of {ctx} tokens"
            )

    # ---- the model

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for every position, in one pass without a cache."""
        ids = self._prompt_ids(ids)
        self.check_context(len(ids), 0)
        return self.engine.start(len(ids)).prefill(ids, all_logits=True)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               cache: "PromptCache | None" = None, processors: Iterable[LogitProcessor] = (),
               counts: SpecCounts | None = None) -> Iterator[Chunk]:
        """Generate token by token; each chunk carries the text that token completed.

        With a ``PromptCache`` (one per conversation, never shared between concurrent
        streams) the tokens this prompt shares with the previous one are not computed again.
        ``processors`` join the sampling chain (``edgeft.runtime.processors``), for this stream only.
        Drafted and accepted tokens of speculative steps (``params.speculate``) are added to ``counts``.
        """
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        if not ids:
            raise EdgeftError("the prompt is empty: nothing to continue from")
        self.check_context(len(ids), params.max_new_tokens)
        return self._stream(ids, params, cache, processors, counts)

    def _prefill(self, ids: list[int], capacity: int, cache: "PromptCache | None") -> tuple["DecodeState", np.ndarray]:
        """A state holding ``ids`` (reusing the cache's common prefix) and the next logits."""
        if cache is None or cache.state is None or cache.state.eng is not self.engine:
            state = self.engine.start(capacity)
            logits = state.prefill(ids)
        else:
            state = cache.state
            keep = min(_common_prefix(cache.tokens, ids), len(ids) - 1)  # at least one token to feed
            state.rewind(keep)
            state.reserve(capacity)
            cache.reused += keep
            logits = state.prefill(ids[keep:])
        if cache is not None:
            cache.state, cache.tokens = state, list(ids)
        return state, logits

    def _stream(self, ids: list[int], params: SamplingParams, cache: "PromptCache | None" = None,
                processors: Iterable[LogitProcessor] = (), counts: SpecCounts | None = None) -> Iterator[Chunk]:
        seq = SequenceOutput(self, ids, params, processors, counts)
        state, logits = self._prefill(ids, len(ids) + params.max_new_tokens, cache)
        chunks = [seq.advance(logits)]
        while True:
            yield from chunks
            if chunks[-1].finish_reason is not None:
                return
            fed = [chunks[-1].token_id, *seq.draft(state.capacity - state.length - 1)]
            if len(fed) > 1:  # the pending token and a draft, verified in one multi-token step
                rows = state.prefill(fed, all_logits=True)
                chunks, accepted = seq.verify(rows, fed[1:])
                fed = fed[:1 + accepted]
                state.rewind(state.length - len(rows) + len(fed))  # drop the rejected drafts' keys and values
            else:
                chunks = [seq.advance(state.step(fed[0]))]
            if cache is not None:
                cache.tokens.extend(fed)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 processors: Iterable[LogitProcessor] = ()) -> Completion:
        """Generate to the end and return the whole completion."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        return collect(self.stream(ids, params, processors=processors), len(ids), params)

    def generate_batch(self, prompts: list[str | list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None,
                       parallel: int = 8, on_done=None, processors=None) -> list[Completion]:
        """Every prompt to the end, decoded together (continuous batching, ``parallel`` at a time).

        One ``SamplingParams`` for all prompts or one per prompt (``processors(i)``: prompt ``i``'s
        own logit processors, such as a grammar mask); ``Completion``s come back in
        the prompts' order, each equal to what ``generate`` gives that prompt alone (within
        float tolerance: a batched matrix product may round differently).
        """
        from edgeft.runtime.engine import generate_batch

        ids = [self._prompt_ids(p) for p in prompts]
        if any(not i for i in ids):
            raise EdgeftError("a prompt is empty: nothing to continue from")
        return generate_batch(self, ids, params or SamplingParams(), parallel, on_done, processors)


def collect(chunks: Iterable[Chunk], prompt_tokens: int, params: SamplingParams) -> Completion:
    """The ``Completion`` a stream of chunks adds up to."""
    texts, out, lps, reason = [], [], [], "length"
    for chunk in chunks:
        texts.append(chunk.text)
        if chunk.token_id is not None:
            out.append(chunk.token_id)
            if chunk.logprob is not None:
                lps.append(chunk.logprob)
        reason = chunk.finish_reason or reason
    return Completion("".join(texts), out, prompt_tokens, len(out), reason,
                      lps if params.logprobs is not None else None)


class SequenceOutput:
    """One sequence's side of decoding: sampler, stop strings, detokenizer, token budget.

    ``advance(logits)`` picks the next token and returns its ``Chunk``; a chunk with a
    ``finish_reason`` is the last. Shared by the one-sequence loop and the batching engine,
    so both end, cut and detokenize a sequence the same way.
    """

    def __init__(self, gen: "Generator", ids: list[int], params: SamplingParams,
                 processors: Iterable[LogitProcessor] = (), counts: SpecCounts | None = None) -> None:
        self.params = params
        self.sampler = Sampler(params, gen.decoder.vocab_size, seen=ids, processors=processors)
        self.detok = IncrementalDetokenizer(gen.tokenizer, context=ids)
        self.stops = StopMatcher(params.stop)
        self.eos_ids = frozenset() if params.ignore_eos else gen.eos_ids
        self.produced = 0
        self.spec = Speculator(ids, params.speculate, counts=counts)

    def advance(self, logits: np.ndarray) -> Chunk:
        token, lp = self.sampler.pick(logits)
        if token in self.eos_ids:
            text, _ = self.stops.finish(self.detok.flush())
            return Chunk(text, None, "stop")
        self.produced += 1
        self.sampler.accept(token)
        self.spec.extend((token,))
        text, hit = self.stops.feed(self.detok.add(token))
        if hit:
            return Chunk(text, token, "stop", lp)
        if self.produced >= self.params.max_new_tokens:
            rest, hit = self.stops.finish(self.detok.flush())
            return Chunk(text + rest, token, "stop" if hit else "length", lp)
        return Chunk(text, token, None, lp)

    def draft(self, room: int) -> list[int]:
        """Draft tokens to verify after the pending one (at most ``room``, and never past the budget)."""
        return self.spec.draft(min(room, self.params.max_new_tokens - self.produced - 1))

    def verify(self, rows: np.ndarray, draft: list[int]) -> tuple[list[Chunk], int]:
        """The chunks of one verification step and how many drafted tokens were accepted.

        ``rows[i]`` are the logits after the pending token and ``draft[:i]``. Each position is
        sampled in order as ``advance`` would; the step ends at the first sampled token that
        differs from the draft (it is kept), at the last row, or when the sequence finishes.
        """
        chunks: list[Chunk] = []
        for i, row in enumerate(rows):
            chunk = self.advance(row)
            chunks.append(chunk)
            if chunk.finish_reason is not None or i == len(draft) or chunk.token_id != draft[i]:
                break
        accepted = sum(1 for c, d in zip(chunks, draft) if c.token_id == d)
        self.spec.record(len(draft), accepted)
        return chunks, accepted
