"""The packed FlexAttention route (training_hub.models.attention): its forward pass on the CPU and its plan rules.

FlexAttention has no backward pass on the CPU; tests/test_gpu.py checks the backward (packed loss and gradients
equal the unpacked ones) on a GPU, with the same `packed_vs_unpacked` helper.
"""

from __future__ import annotations

import random

import pytest
import torch

from training_hub.models.attention import (FLEX_ATTENTION, flex_attention_problem, packed_flex_attention,
                                           register_flex_attention, static_packed_length)

DOC_LENGTHS = [37, 100, 5, 64]


def random_documents(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    """Rows of random token ids with the first third of each masked (-100), like prompt tokens."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return rows


def load_pair(model_dir, device: str, dtype):
    """The same weights twice: on the packed FlexAttention route, and on SDPA (the unpacked reference)."""
    from transformers import AutoModelForCausalLM

    register_flex_attention()
    models = [AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=impl,
                                                   device_map={"": device}) for impl in (FLEX_ATTENTION, "sdpa")]
    assert models[0].config._attn_implementation == FLEX_ATTENTION
    return models


def packed_vs_unpacked(flex_model, sdpa_model, rows: list[dict], pad_id: int, length: int, backward: bool = False):
    """Run `rows` packed into one row by TRL's padding-free collator (padded to `length`) through `flex_model`,
    and one by one through `sdpa_model`. Returns the two losses (mean over supervised tokens), the largest
    logit gap over real tokens, and with `backward` the relative gap of the first q_proj's weight gradient."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = flex_model.device
    batch = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True, pad_to_multiple_of=length)(rows)
    assert batch["input_ids"].shape == (1, length) and "attention_mask" not in batch
    batch = {k: v.to(device) for k, v in batch.items()}
    packed = flex_model(**batch, use_cache=False)
    counts = [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    unpacked_loss, start, gap = 0.0, 0, 0.0
    for row, count in zip(rows, counts):
        ids = torch.tensor([row["input_ids"]], device=device)
        out = sdpa_model(input_ids=ids, labels=torch.tensor([row["labels"]], device=device), use_cache=False)
        unpacked_loss = unpacked_loss + out.loss * count / sum(counts)
        n = len(row["input_ids"])
        gap = max(gap, (packed.logits[0, start:start + n].float() - out.logits[0].float()).abs().max().item())
        start += n
    result = {"packed_loss": packed.loss.item(), "unpacked_loss": unpacked_loss.item(), "max_logit_gap": gap,
              "max_abs_logit": packed.logits.float().abs().max().item()}
    if backward:
        packed.loss.backward()
        unpacked_loss.backward()
        grads = [m.model.layers[0].self_attn.q_proj.weight.grad.float() for m in (flex_model, sdpa_model)]
        result["grad_rel_gap"] = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    return result


def test_packed_forward_on_cpu_equals_unpacked(tiny_model_factory, tokenizer_factory):
    """The eager FlexAttention path (the CPU has no compiled one) keeps packed documents apart: fp32 logits and
    loss equal the unpacked SDPA ones, including the padding the static length adds."""
    tokenizer = tokenizer_factory("chatml")
    flex_model, sdpa_model = load_pair(tiny_model_factory("qwen2"), "cpu", torch.float32)
    rows = random_documents(len(tokenizer), DOC_LENGTHS)
    length = static_packed_length(2, 128)
    assert length == 256 > sum(DOC_LENGTHS)
    with torch.no_grad():
        result = packed_vs_unpacked(flex_model, sdpa_model, rows, tokenizer.pad_token_id, length)
    assert result["max_logit_gap"] < 1e-4 * max(1.0, result["max_abs_logit"]), result
    assert abs(result["packed_loss"] - result["unpacked_loss"]) < 1e-5 * result["unpacked_loss"], result


def test_kernel_refuses_a_missing_block_mask():
    """Without its BlockMask the kernel would attend across documents (and to the future): refused by name."""
    q = torch.zeros(1, 4, 8, 16)
    kv = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="needs the BlockMask"):
        packed_flex_attention(None, q, kv, kv, None)
    with pytest.raises(ValueError, match="no dropout"):
        packed_flex_attention(None, q, kv, kv, None, dropout=0.1)


@pytest.mark.parametrize("micro, seq, expected", [(8, 2048, 16384), (4, 2048, 8192), (2, 1000, 2048), (1, 128, 128)])
def test_static_length_covers_a_full_micro_batch_in_whole_blocks(micro, seq, expected):
    assert static_packed_length(micro, seq) == expected


def test_availability_names_what_is_missing():
    problem = flex_attention_problem()
    assert problem is None or "torch" in problem or "triton" in problem
