"""Time the pieces of the packed FlexAttention route on one GPU, one line per measurement (flushed as it goes):

    python benchmarks/flex_probe.py [--length 16384]

1. the document BlockMask, built through transformers' `create_causal_mask` with training_hub's registered
   builder (eager `create_block_mask`), for three new packings;
2. one compiled FlexAttention call, forward + backward, for the 8B (32 / 8 heads) and 1.5B (12 / 2 heads)
   shapes, each with a new mask per call (the first call compiles);
3. the same attention as one SDPA call per document (what Unsloth runs without a varlen kernel);
4. a 2-layer 1.5B-shaped model, forward + backward over one packed row, on the registered route;
5. transformers' own FlexAttention mask builder (compiled `create_block_mask`), for comparison.
Documents are 300-900 tokens, as in benchmarks/throughput.py; the row is padded to `--length`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(label: str, fn, repeat: int = 1):
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - start) / repeat * 1000:.1f} ms", flush=True)
    return result


def packed_positions(length: int, seed: int):
    import torch

    rng, positions, lengths = random.Random(seed), [], []
    while len(positions) < length - 900:
        n = rng.randint(300, 900)
        positions += range(n)
        lengths.append(n)
    lengths.append(length - len(positions))
    positions += [0] * (length - len(positions))  # the padding, as TRL's collator writes it
    return torch.tensor([positions], device="cuda"), lengths


def main() -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.masking_utils import create_causal_mask

    from training_hub.models.attention import FLEX_ATTENTION, compiled_flex_attention, register_flex_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    length = parser.parse_args().length
    register_flex_attention()
    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=4096)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=FLEX_ATTENTION)
    model = model.cuda().train()
    config = model.config
    embeds = torch.zeros(1, length, 1536, device="cuda", dtype=torch.bfloat16)
    masks = [timed(f"1. block mask, registered builder, packing {i}",
                   lambda i=i: create_causal_mask(config, embeds, None, None, packed_positions(length, i)[0]))
             for i in range(3)]
    flex = compiled_flex_attention()
    for name, heads, kv in (("8B", 32, 8), ("1.5B", 12, 2)):
        q = torch.randn(1, heads, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, kv, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        for i in range(4):
            timed(f"2. compiled flex fwd+bwd, {name} heads, call {i}",
                  lambda i=i: flex(q, k, v, block_mask=masks[i % 3], enable_gqa=True).sum().backward())
        _, lengths = packed_positions(length, 0)

        def per_document():
            start, outs = 0, []
            for n in lengths:
                sl = slice(start, start + n)
                outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                           enable_gqa=True))
                start += n
            torch.cat(outs, dim=2).sum().backward()
        timed(f"3. SDPA per document ({len(lengths)} calls) fwd+bwd, {name} heads", per_document, repeat=3)
    ids = torch.randint(10, 4096, (1, length), device="cuda")
    for i in range(3):
        positions = packed_positions(length, i)[0]
        timed(f"4. 2-layer model fwd+bwd, call {i}",
              lambda: model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward())
    config = Qwen2Config(**{**config.to_dict(), "attn_implementation": "flex_attention"})
    for i in range(3):
        timed(f"5. block mask, transformers' compiled builder, packing {i}",
              lambda i=i: create_causal_mask(config, embeds, None, None, packed_positions(length, i)[0]))


if __name__ == "__main__":
    main()
