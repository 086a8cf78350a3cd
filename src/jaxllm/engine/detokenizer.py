"""Incremental detokenization and stop strings, on the host.

Decoding each new token alone gets spaces and multi-byte characters wrong (SentencePiece drops the
leading space of a lone token; a UTF-8 character can span tokens). The standard remedy, used here:
decode a short window of tokens before the new ones and emit only the text past the window's own
text, holding back output while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, so the first token gets its space


def decode_text(tokenizer, ids, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
    """Token ids to text. Kept special tokens are set apart by single spaces from the text around
    them when spaces_between_special_tokens (transformers' slow tokenizers and vLLM do this; the
    fast tokenizers' own decode does not)."""
    if skip_special_tokens or not spaces_between_special_tokens:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    special = set(tokenizer.all_special_ids)
    parts, run = [], []
    for t in ids:
        if t in special:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(tokenizer.decode([t]))
        else:
            run.append(t)
    if run:
        parts.append(tokenizer.decode(run))
    return " ".join(parts)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids):
        return decode_text(self.tok, ids, self.skip, self.spaces)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes (possibly "" while a character is partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += new
            return new
        return ""


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last `new_len` characters of text: (index, stop)."""
    best = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
