"""Data-path benchmark: training_hub's batched pipeline vs the usual per-row masking loop.

Generates two-turn conversations of about 300 tokens, trains a 4,096-token BPE tokenizer on them
(ChatML template), writes them to a .jsonl file, then times, in the same process and on the same rows:

* training_hub: ``load_examples`` (read + validate) and ``tokenize_examples`` (cache disabled);
* naive: read the file, then per row ``apply_chat_template(..., tokenize=True)`` for the whole
  conversation and for each answer's prefixes, labels from the prefix lengths (what most scripts do).

Usage: python benchmarks/data_pipeline.py [--rows 100000] [--num-proc N]. Prints rows/s and a markdown row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

WORDS_PER_TURN = (50, 85, 30, 85)  # user, assistant, user, assistant: ~300 tokens with the template


def make_vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "pe", "da", "gu", "ho", "ji", "be", "fa", "zo"]
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(size * 2)}
    return sorted(words)[:size]


def make_conversations(rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocabulary = make_vocabulary(rng)
    conversations = []
    for _ in range(rows):
        turns = []
        for i, count in enumerate(WORDS_PER_TURN):
            text = " ".join(rng.choices(vocabulary, k=count)).capitalize() + "."
            turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        conversations.append({"messages": turns})
    return conversations


def naive_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The common per-row approach: tokenize every prefix with the template, mask by prefix lengths."""
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    labels = [-100] * len(full)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
        end = len(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=False))
        labels[start:end] = full[start:end]
    return full, labels


def time_training_hub(path: Path, tokenizer, num_proc: int | None) -> dict:
    from training_hub.data import load_examples, tokenize_examples

    start = time.perf_counter()
    loaded = load_examples(path)
    loaded_at = time.perf_counter()
    result = tokenize_examples(loaded, tokenizer, max_seq_len=1024, cache_dir="none", num_proc=num_proc)
    done = time.perf_counter()
    return {"load_s": loaded_at - start, "tokenize_s": done - loaded_at, "total_s": done - start,
            "tokens": result.summary.tokens_total, "median": result.summary.tokens_median, "result": result}


def time_naive(path: Path, tokenizer) -> dict:
    start = time.perf_counter()
    rows = [json.loads(line) for line in path.open()]
    pairs = [naive_labels(tokenizer, row["messages"]) for row in rows]
    return {"total_s": time.perf_counter() - start, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=None, help="tokenize_examples workers (default: auto)")
    parser.add_argument("--check", type=int, default=200, help="rows whose labels must equal the naive ones")
    args = parser.parse_args()

    from training_hub.tiny import build_tokenizer

    conversations = make_conversations(args.rows)
    corpus = [m["content"] for c in conversations[:2000] for m in c["messages"]]
    tokenizer = build_tokenizer(template="chatml", corpus=corpus, vocab_size=4096)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conversations.jsonl"
        path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        ours = time_training_hub(path, tokenizer, args.num_proc)
        naive = time_naive(path, tokenizer)
    check_same_tokens(ours["result"].dataset, naive["pairs"], tokenizer, args.check)
    report(args, ours, naive)


def check_same_tokens(dataset, pairs, tokenizer, count: int) -> None:
    """Same ids; labels differ only where the naive loop also trains on the newline after <|im_end|>."""
    for i in range(min(count, len(pairs))):
        row, (ids, labels) = dataset[i], pairs[i]
        if row["input_ids"] != ids:
            raise SystemExit(f"row {i}: training_hub and the naive loop give different token ids")
        extra = [ids[j] for j, (a, b) in enumerate(zip(row["labels"], labels)) if a != b]
        if tokenizer.decode(extra) != "\n" * 2 or any(a != -100 for a, b in zip(row["labels"], labels) if a != b):
            raise SystemExit(f"row {i}: labels differ beyond the newline after each answer: {extra}")


def report(args, ours: dict, naive: dict) -> None:
    rows = args.rows
    ours_rate, naive_rate = rows / ours["total_s"], rows / naive["total_s"]
    cpus = os.cpu_count()
    print(f"rows: {rows:,}, median {ours['median']} tokens/row, {ours['tokens']:,} tokens, {cpus} CPUs, "
          f"num_proc={args.num_proc or 'auto'}")
    print(f"training_hub: load {ours['load_s']:.1f} s + tokenize {ours['tokenize_s']:.1f} s = "
          f"{ours['total_s']:.1f} s -> {ours_rate:,.0f} rows/s ({rows / ours['tokenize_s']:,.0f} rows/s tokenize only)")
    print(f"naive per-row apply_chat_template: {naive['total_s']:.1f} s -> {naive_rate:,.0f} rows/s")
    print(f"speed-up: {ours_rate / naive_rate:.1f}x (first {args.check} rows: identical ids; labels identical but "
          "for the newline after each <|im_end|>, which the naive loop also trains on)")
    print()
    print("| date | machine | rows | tokens/row | training_hub rows/s | naive rows/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {date.today()} | {cpus}-core CPU ({platform.machine()}) | {rows:,} | ~{ours['median']} | "
          f"{ours_rate:,.0f} | {naive_rate:,.0f} | {ours_rate / naive_rate:.1f}x |")


if __name__ == "__main__":
    main()
