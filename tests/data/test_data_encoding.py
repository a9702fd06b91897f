"""Token positions: the byte-length path (byte-level BPE) agrees with the tokenizer's own offsets."""

from __future__ import annotations

import numpy as np

from training_hub.data.encoding import Encoder
from training_hub.tiny import build_tokenizer

TEXTS = ["<|im_start|>user\nHello, Alice!<|im_end|>\n", "Grüße, naïve café — 東京 🙂<|im_end|>", "", "  spaced\n\n out  "]


def offsets_path(encoder: Encoder, texts):
    return encoder.encode_with_offsets(texts)


def test_byte_lengths_give_the_same_tokens_and_spans_as_offsets():
    encoder = Encoder(build_tokenizer("chatml"))
    assert encoder.byte_lengths is not None and not encoder.ascii_only
    fast, slow = encoder.encode(TEXTS), offsets_path(encoder, TEXTS)
    for text, a, b in zip(TEXTS, fast, slow):
        assert a.in_bytes and not b.in_bytes and a.ids.tolist() == b.ids.tolist()
        # Every span between character boundaries selects the same tokens (a token may hold part of a character).
        for start in range(len(text) + 1):
            for end in range(start, len(text) + 1):
                assert a.token_range(text, (start, end)) == b.token_range(text, (start, end)), (text, start, end)


def test_an_added_token_that_strips_spaces_falls_back_to_offsets():
    from tokenizers import AddedToken

    tokenizer = build_tokenizer("chatml")
    tokenizer.add_tokens([AddedToken("<tool>", lstrip=True)])
    encoder = Encoder(tokenizer)
    text = "call   <tool> now"
    (tokens,) = encoder.encode([text])
    assert not tokens.in_bytes  # the byte lengths did not add up, so offsets were asked for
    assert tokens.ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_normalizer_limits_the_byte_path_to_ascii_rows():
    from tokenizers import normalizers

    tokenizer = build_tokenizer("chatml")
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    encoder = Encoder(tokenizer)
    assert encoder.ascii_only
    ascii_row, other = encoder.encode(["plain text", "cafe\u0301"])
    assert ascii_row.in_bytes and not other.in_bytes
    assert other.ids.tolist() == tokenizer("cafe\u0301", add_special_tokens=False)["input_ids"]


def test_with_bos_covers_no_text():
    encoder = Encoder(build_tokenizer("llama3"))
    (tokens,) = encoder.encode(["Hi"])
    with_bos = tokens.with_bos(7)
    assert with_bos.ids[0] == 7 and with_bos.starts[0] == with_bos.ends[0] == 0
    assert with_bos.token_range("Hi", (0, 2)) == slice(1, len(with_bos.ids))
    assert isinstance(with_bos.ids, np.ndarray)
