"""Packed sequences must not attend across samples and must keep their loss masks.

A packed (padding-free) batch, as TRL's collator builds it for `sample_packing=True`, must give the same
loss as the same samples padded side by side. Runs plain transformers in this process (no Unsloth).
"""

import pytest
import torch

from training_hub.data import load_examples, tokenize_examples
from training_hub.tiny import build_model

from sample_data import greeting_conversations


@pytest.fixture(scope="module")
def tokenized(tokenizer_factory):
    tok = tokenizer_factory("chatml")
    rows = greeting_conversations(4)
    rows[1]["messages"] = [{"role": "system", "content": "Be brief."}, *rows[1]["messages"]]
    data = tokenize_examples(load_examples(rows), tok, max_seq_len=128, cache_dir="none")
    return tok, [data.dataset[i] for i in range(4)]


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_packed_loss_equals_unpacked(architecture, tokenized):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, rows = tokenized
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    assert len({len(e["input_ids"]) for e in examples}) > 1, "want samples of different lengths"
    model = build_model(tok, architecture=architecture).eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)
    # Supervised tokens are the same set: the collator only masks each sample's first token, never trained on.
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()


def test_packing_without_position_ids_would_leak(tokenized):
    """The control: the same flat sequence without restarting positions attends across samples."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, rows = tokenized
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    model = build_model(tok).eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    packed.pop("position_ids")
    with torch.no_grad():
        leaked = model(**packed, use_cache=False).loss
        clean = model(**padded, use_cache=False).loss
    assert not torch.allclose(leaked, clean, atol=1e-4)
