"""Packed attention in one kernel per layer: FlexAttention with a document mask, through transformers' hooks.

Padding-free packing flattens a micro batch into one row whose position ids restart at every document.
transformers' masking utilities turn those restarts into a document-causal mask function
(`masking_utils.find_packed_sequence_indices`); `packed_block_mask` makes it a `BlockMask` once per forward
pass, shared by every layer. Each layer then makes one FlexAttention call for the whole micro batch, where
Unsloth's SDPA path makes one call per document.

Both pieces are registered under one name through transformers' public interfaces (`AttentionInterface`
for the kernel, `AttentionMaskInterface` for the mask builder) and picked with
`attn_implementation=FLEX_ATTENTION`.
FlexAttention is compiled, and compiled code wants static shapes: the trainer pads every packed row to one
length (`static_packed_length`), so it compiles once per process instead of once per step.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata

FLEX_ATTENTION = "training_hub_flex"
# FlexAttention's block size: padding the packed row to a multiple of it keeps every block whole.
FLEX_BLOCK_SIZE = 128
# torch 2.5 has FlexAttention, but lengths that are not a multiple of its block size need 2.6.
MIN_TORCH = (2, 6)


def flex_attention_problem() -> str | None:
    """Why FlexAttention cannot train here (None when it can): it needs torch >= 2.6 and Triton for its GPU
    kernels. Reads package metadata only (no torch import)."""
    try:
        version = tuple(int(part) for part in metadata.version("torch").split("+")[0].split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return "torch's version cannot be read"
    if version < MIN_TORCH:
        return f"torch {'.'.join(map(str, version))} < {'.'.join(map(str, MIN_TORCH))}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (FlexAttention's GPU kernels are Triton code)"
    return None


def static_packed_length(micro_batch_size: int, max_seq_len: int) -> int:
    """The one length every packed row is padded to: micro batch x max_seq_len, up to a whole FlexAttention block.

    Best-fit-decreasing packing fills each packed sequence to at most max_seq_len, so the flattened micro
    batch never exceeds micro x max_seq_len, and padding to a multiple of this length pads to exactly it.
    """
    total = micro_batch_size * max_seq_len
    return -(-total // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE


def register_flex_attention() -> str:
    """Register the kernel and its mask builder under FLEX_ATTENTION (idempotent); returns the name to pass as
    `attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(FLEX_ATTENTION, packed_flex_attention)
    AttentionMaskInterface.register(FLEX_ATTENTION, packed_block_mask)
    return FLEX_ATTENTION


def loadable_attention(name: str) -> str:
    """`name`, ready to pass as `attn_implementation` to `from_pretrained`: training_hub's FlexAttention kernel is
    registered first (transformers checks the name against its registry, which starts empty in each process)."""
    return register_flex_attention() if name == FLEX_ATTENTION else name


def packed_block_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask=None, device="cpu", **kwargs):
    """transformers' mask-builder signature: the BlockMask of `mask_function` (causal, and per document when the
    position ids restart; transformers composes it), and of the 2D padding mask when there is one.

    Built eagerly, once per forward pass: transformers' own FlexAttention builder compiles `create_block_mask`,
    and a compiled builder meets a new mask closure every batch."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import (add_offsets_to_mask_function, and_masks, causal_mask_function,
                                            padding_mask_function, prepare_padding_mask)

    mask_function = mask_function or causal_mask_function
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, B=batch_size, H=None, Q_LEN=q_length, KV_LEN=kv_length, device=device)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled for fixed shapes, once per process (the first call per shape compiles; cached so
    that all layers and steps reuse that compilation)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def packed_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: query (batch, heads, seq, dim), key/value (batch, kv_heads,
    seq, dim), `attention_mask` the BlockMask the registered mask builder made. Returns ((batch, seq, heads,
    dim), None): one kernel for the whole packed row, grouped-query heads shared without copying.

    On a GPU the compiled kernel runs; elsewhere the eager (unfused) implementation, which torch provides for
    the forward pass only (there is no FlexAttention backward on the CPU)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if dropout:
        raise ValueError(f"attention dropout {dropout}: {FLEX_ATTENTION} has no dropout; set the model's "
                         "attention_dropout to 0")
    if not isinstance(attention_mask, BlockMask):
        raise ValueError(f"{FLEX_ATTENTION} needs the BlockMask built by its registered mask function, got "
                         f"{type(attention_mask).__name__}; load the model with attn_implementation={FLEX_ATTENTION!r} "
                         "after register_flex_attention()")
    kernel = compiled_flex_attention() if query.is_cuda else flex_attention
    output = kernel(query, key, value, block_mask=attention_mask, scale=scaling,
                    enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None
