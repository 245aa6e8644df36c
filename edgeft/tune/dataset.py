"""Training and evaluation examples as token ids, and the seeded order they are fed in.

An example is ``(input_ids, target)``: for classification the target is a class id (a
pair of texts is the tokenizer's pair encoding, its ``PairIds`` carrying the token type ids,
or one text through ``edgeft.data.PAIR_TEMPLATE`` for a decoder);
for causal LM it is a list of labels (``-100`` where no loss is taken: the prompt of
an instruction row, padding). Plain text is joined with the end-of-text token and cut
into blocks of ``max_length`` tokens. Instruction and chat rows are rendered with the
model's chat template (see ``edgeft.data.render_chat``) and the loss is on the answer.

The order of micro-batches depends only on the seed and the epoch, so a resumed run
feeds exactly what an uninterrupted one would. This module knows the tokenizer's
interface and torch tensors; it knows nothing of models or optimizers.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import data as D
from edgeft.artifact import Task
from edgeft.errors import EdgeftError

IGNORE = -100
Example = tuple[list[int], Any]


class PairIds(list):
    """The token ids of a pair's encoding, with its ``type_ids`` (0 for the text, 1 for the pair)
    where the tokenizer gives them: ``collate`` feeds them as ``token_type_ids``."""

    type_ids: list[int] | None = None


@dataclass
class Prepared:
    """Tokenized train and eval examples for one task."""

    task: Task
    train: list[Example]
    eval: list[Example]
    labels: list[str] | None
    kind: str  # "classification", "text" or "chat"
    truncated: int = 0
    total: int = 0

    @functools.cached_property
    def train_lengths(self) -> tuple[int, ...]:
        """Token count of every training example (the length grouping reads it every step)."""
        return tuple(len(x) for x, _ in self.train)


def label_names(labels: list[str]) -> list[str]:
    """Sorted label names (numerically when they are all integers)."""
    names = set(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    texts = [D.clip_for_tokens(t, max_length) for t in texts]
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    cut = sum(len(x) > max_length for x in ids)
    if cut:
        keep_last = tokenizer.sep_token_id is not None  # BERT-style: keep the closing [SEP]
        ids = [x if len(x) <= max_length else (x[: max_length - 1] + x[-1:] if keep_last else x[:max_length])
               for x in ids]
    return ids, cut


def _encode_pairs(tokenizer: Any, pairs: list[D.Pair], max_length: int) -> tuple[list[list[int]], int]:
    """The tokenizer's pair encoding (``[CLS] a [SEP] b [SEP]`` and token type ids for BERT), cut
    longest-first to ``max_length`` as the runtime's tokenizer cuts it."""
    if D.uses_pair_template(tokenizer):
        return _encode(tokenizer, [D.pair_text(p) for p in pairs], max_length)
    firsts = [D.clip_for_tokens(a, max_length) for a, _ in pairs]
    seconds = [D.clip_for_tokens(b, max_length) for _, b in pairs]
    whole = tokenizer(firsts, seconds, add_special_tokens=True, truncation=False, return_token_type_ids=True)
    cut = sum(len(x) > max_length for x in whole["input_ids"])
    enc = tokenizer(firsts, seconds, add_special_tokens=True, truncation="longest_first", max_length=max_length,
                    return_token_type_ids=True) if cut else whole
    types = enc.get("token_type_ids")
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        x = PairIds(ids)
        x.type_ids = list(types[i]) if types is not None else None
        out.append(x)
    return out, cut


def encode_inputs(tokenizer: Any, items: list[D.Input], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of texts or of ``(text, text_pair)`` pairs (all of one kind), and how many were cut."""
    if items and not isinstance(items[0], str):
        return _encode_pairs(tokenizer, items, max_length)  # type: ignore[arg-type]
    return _encode(tokenizer, items, max_length)  # type: ignore[arg-type]


def prepare_classification(tokenizer: Any, train_path: Path, eval_path: Path | None, fraction: float,
                           seed: int, max_length: int, text_column: str | None, label_column: str | None,
                           pair_column: str | None = None) -> Prepared:
    texts, labels = D.load_classification(train_path, text_column, label_column, pair_column)
    rows = list(zip(texts, labels, strict=True))
    if eval_path is None:
        rows, held = D.held_out_split(rows, fraction, seed, str(train_path))
    else:
        e_texts, e_labels = D.load_classification(eval_path, text_column, label_column, pair_column)
        if isinstance(e_texts[0], str) != isinstance(texts[0], str):
            raise EdgeftError(f"{eval_path}: the eval data must be pairs when the training data is, and texts "
                              "when it is texts")
        held = list(zip(e_texts, e_labels, strict=True))
    names = label_names([lab for _, lab in rows])
    if len(names) < 2:
        raise EdgeftError(f"{train_path}: classification needs at least two labels, found {names}")
    unknown = sorted({lab for _, lab in held} - set(names))
    if unknown:
        raise EdgeftError(f"unknown label {unknown[0]!r} in the eval data (train labels: {', '.join(names)})")
    index = {n: i for i, n in enumerate(names)}
    tr_ids, cut1 = encode_inputs(tokenizer, [t for t, _ in rows], max_length)
    ev_ids, cut2 = encode_inputs(tokenizer, [t for t, _ in held], max_length)
    return Prepared(Task.classification, list(zip(tr_ids, [index[lab] for _, lab in rows], strict=True)),
                    list(zip(ev_ids, [index[lab] for _, lab in held], strict=True)), names, "classification",
                    truncated=cut1 + cut2, total=len(tr_ids) + len(ev_ids))


def _blocks(tokenizer: Any, texts: list[str], max_length: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    out = []
    for start in range(0, len(stream), max_length):
        block = stream[start:start + max_length]
        if len(block) >= 2:
            out.append((block, list(block)))
    return out


def _chat_examples(tokenizer: Any, convs: list[list[D.Message]], max_length: int) -> tuple[list[Example], int]:
    out, cut = [], 0
    for msgs in convs:
        prompt, answer = D.render_chat(tokenizer, msgs)
        # only the first max_length tokens of prompt + answer are kept: cut each before tokenizing
        prompt, answer = D.clip_for_tokens(prompt, max_length), D.clip_for_tokens(answer, max_length)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids, labels = p + a, [IGNORE] * len(p) + a
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if any(x != IGNORE for x in labels[1:]):  # a prompt that fills the context leaves nothing to learn
            out.append((ids, labels))
    return out, cut


def prepare_causal(tokenizer: Any, train_path: Path, eval_path: Path | None, fraction: float,
                   seed: int, max_length: int, text_column: str | None) -> Prepared:
    chat = D.is_chat_file(train_path)
    if chat:
        items = D.load_chat(train_path)
        held = D.load_chat(eval_path) if eval_path else None
    else:
        items = D.load_texts(train_path, text_column)
        held = D.load_texts(eval_path, text_column) if eval_path else None
    if held is None:
        items, held = D.held_out_split(items, fraction, seed, str(train_path))
    if chat:
        train, cut1 = _chat_examples(tokenizer, items, max_length)
        ev, cut2 = _chat_examples(tokenizer, held, max_length)
        if not train:
            raise EdgeftError(f"{train_path}: no row keeps an answer within --max-length {max_length}")
        return Prepared(Task.causal_lm, train, ev, None, "chat", truncated=cut1 + cut2, total=len(items) + len(held))
    train, ev = _blocks(tokenizer, items, max_length), _blocks(tokenizer, held, max_length)
    if not train or not ev:
        raise EdgeftError(f"{train_path}: too little text for training and evaluation blocks")
    return Prepared(Task.causal_lm, train, ev, None, "text")


def warn_truncation(prep: Prepared, max_length: int) -> None:
    """One warning line on stderr when some examples were longer than the context."""
    if prep.truncated:
        print(f"warning: {prep.truncated} of {prep.total} examples are longer than {max_length} tokens "
              "and were truncated", file=sys.stderr)


# ---- batching -------------------------------------------------------------------------

def micro_batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The example order of one epoch: depends only on (seed, epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


GROUP = 64  # micro-batches per length-sorted group


@functools.lru_cache(maxsize=4)
def epoch_batches(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int,
                  by_length: bool) -> tuple[tuple[int, ...], ...]:
    """The micro-batches (example indices) of one epoch: depends only on (seed, epoch).

    With ``by_length``, the shuffled examples are taken ``GROUP`` batches at a time and
    sorted by length inside the group, so a batch pads little; the batches are then
    shuffled again, so lengths do not come in order.
    """
    import torch

    order = list(epoch_order(len(lengths), seed, epoch))
    if by_length:
        span = batch_size * GROUP
        order = [i for k in range(0, len(order), span)
                 for i in sorted(order[k:k + span], key=lambda j: lengths[j])]
    batches = [tuple(order[k:k + batch_size]) for k in range(0, len(order), batch_size)]
    if by_length:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7919)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return tuple(batches)


def micro_batch_index(lengths: tuple[int, ...], batch_size: int, seed: int, index: int,
                      by_length: bool = False) -> tuple[int, ...]:
    """Example indices of the ``index``-th micro-batch of the endless, seeded stream of epochs
    (``lengths``: every example's token count)."""
    per_epoch = micro_batches_per_epoch(len(lengths), batch_size)
    epoch, i = divmod(index, per_epoch)
    return epoch_batches(lengths, batch_size, seed, epoch, by_length)[i]


def micro_batch(examples: list[Example], batch_size: int, seed: int, index: int,
                by_length: bool = False, lengths: tuple[int, ...] | None = None) -> list[Example]:
    """The ``index``-th micro-batch itself (see ``micro_batch_index``)."""
    lengths = lengths or tuple(len(x) for x, _ in examples)
    return [examples[j] for j in micro_batch_index(lengths, batch_size, seed, index, by_length)]


def collate(batch: list[Example], pad_id: int, task: Task) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (and token_type_ids for encoded pairs)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    types = torch.zeros((len(batch), width), dtype=torch.long)
    with_types = False
    for r, (x, _) in enumerate(batch):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
        if getattr(x, "type_ids", None) is not None:
            types[r, :len(x)] = torch.tensor(x.type_ids)  # type: ignore[attr-defined]
            with_types = True
    if task is Task.classification:
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    else:
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for r, (_, y) in enumerate(batch):
            labels[r, :len(y)] = torch.tensor(y)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_types:
        out["token_type_ids"] = types
    return out
