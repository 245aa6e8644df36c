"""Incremental detokenization: turn a growing list of token ids into text pieces safely.

Byte-level BPE splits multi-byte characters (emoji, CJK, accents) across tokens, and
SentencePiece-style decoders change a token's text depending on what comes before it.
So each step decodes a small window that starts a few tokens back and emits only what
the window adds beyond its known prefix, holding back text that ends in U+FFFD (an
incomplete UTF-8 sequence) until the next token completes it. This module knows the
``tokenizers`` decode call and nothing of models.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the new text each one completes (maybe "")."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: list[int] | None = None):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # A few context tokens (the prompt's tail) make the first piece decode as it would in place.
        self.ids: list[int] = list(context[-4:]) if context else []
        self.prefix = 0  # start of the window
        self.read = len(self.ids)  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text still held back at the end, without a trailing incomplete character."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):].rstrip(REPLACEMENT)
