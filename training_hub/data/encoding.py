"""Batched tokenization with each token's position in the text, as cheaply as the tokenizer allows.

Loss masks need to know which characters each token covers. The Rust tokenizer reports character offsets,
but computing them costs about a third of its time. For byte-level BPE tokenizers (GPT-2, Llama 3,
Qwen2 and most recent models), every token covers exactly the bytes its vocabulary string stands for, so
the positions are the running sum of a per-token byte-length table: the tokenizer runs without offsets
(``encode_batch_fast``). The sum must equal the text's length in bytes; a row where it does not (an added
token that strips whitespace, say) is tokenized again with offsets. Other tokenizers always use offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Tokens:
    """One text's token ids and where each token starts and ends, in characters or (``in_bytes``) UTF-8 bytes."""

    ids: np.ndarray  # int64
    starts: np.ndarray
    ends: np.ndarray
    in_bytes: bool

    def token_range(self, text: str, span: tuple[int, int]) -> slice:
        """The tokens overlapping the character span ``span`` of ``text``."""
        start, end = span
        if self.in_bytes and not text.isascii():
            start, end = len(text[:start].encode()), len(text[:end].encode())
        first = int(np.searchsorted(self.ends, start, side="right"))  # first token ending after the span starts
        stop = int(np.searchsorted(self.starts, end, side="left"))  # first token starting at or after its end
        return slice(first, max(first, stop))

    def with_bos(self, bos_id: int) -> "Tokens":
        """The same tokens after a BOS token that covers no text."""
        zero = np.zeros(1, dtype=self.starts.dtype)
        return Tokens(np.concatenate([np.array([bos_id], dtype=np.int64), self.ids]), np.concatenate([zero, self.starts]),
                      np.concatenate([zero, self.ends]), self.in_bytes)


class Encoder:
    """Tokenizes batches of texts (no special tokens added) with token positions; built once per tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # A tokenizer file may configure truncation or padding, which transformers switches off for its calls:
        # call the backend directly only when there is none.
        self.backend = backend if backend is not None and backend.truncation is None and backend.padding is None else None
        self.byte_lengths, self.ascii_only = byte_length_table(self.backend) if self.backend else (None, False)

    def encode(self, texts: list[str]) -> list[Tokens]:
        if self.byte_lengths is None:
            return self.encode_with_offsets(texts)
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        out: list[Tokens] = []
        for text, encoding in zip(texts, encodings):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            ends = np.cumsum(self.byte_lengths[ids])
            exact = (not self.ascii_only or text.isascii()) and (ends[-1] if len(ends) else 0) == len(text.encode())
            out.append(Tokens(ids, ends - self.byte_lengths[ids], ends, True) if exact
                       else self.encode_with_offsets([text])[0])
        return out

    def encode_with_offsets(self, texts: list[str]) -> list[Tokens]:
        if self.backend is not None:
            pairs = [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        out = []
        for ids, offsets in pairs:
            spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            out.append(Tokens(np.asarray(ids, dtype=np.int64), spans[:, 0], spans[:, 1], False))
        return out


def byte_length_table(backend: Any) -> tuple[np.ndarray | None, bool]:
    """For a byte-level BPE tokenizer: the number of text bytes each token id covers, and whether only ASCII
    texts may use it (a normalizer that leaves ASCII alone, such as Qwen2's NFC). (None, False) otherwise."""
    config = json.loads(backend.to_str())
    normalizer = config.get("normalizer")
    if (config.get("model") or {}).get("type") != "BPE" or not is_byte_level(config.get("pre_tokenizer")):
        return None, False
    if normalizer is not None and normalizer.get("type") not in ("NFC", "NFKC"):
        return None, False
    vocab = backend.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, index in vocab.items():
        table[index] = len(token)  # one character of the byte-level alphabet per byte
    for index, added in backend.get_added_tokens_decoder().items():
        table[index] = len(added.content.encode())
    return table, normalizer is not None


def is_byte_level(pre_tokenizer: dict | None) -> bool:
    """ByteLevel (no added prefix space), alone or after splits that keep every character."""
    if pre_tokenizer is None:
        return False
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    keeps_text = all(s.get("type") in ("ByteLevel", "Digits") or (s.get("type") == "Split" and s.get("behavior") != "Removed")
                     for s in steps)
    return len(byte_level) == 1 and not byte_level[0].get("add_prefix_space") and keeps_text
