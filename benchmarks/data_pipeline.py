"""Data-path benchmark: training_hub's masked pipeline against two per-row baselines, in one run.

Generates two-turn conversations of about 300 tokens, trains a 4,096-token byte-level BPE tokenizer on them
(ChatML template), writes them to a .jsonl file, then times, in the same process and on the same rows,
for each row count asked for (cache disabled):

* training_hub: ``load_examples`` (read + validate) and ``tokenize_examples`` (render, tokenize, mask);
* unmasked: read the file, then per row ``apply_chat_template(messages, tokenize=True)`` and nothing else
  (no loss mask at all: the floor any masked pipeline is measured against);
* masked per row: read the file, then per row ``apply_chat_template(..., tokenize=True)`` for the whole
  conversation and for each answer's prefixes, labels from the prefix lengths (what most scripts do).

Each is reported as rows/s of wall time and as CPU seconds (user + system, all threads), since the machine
may be shared: CPU time is what the work costs, wall time what it takes with the cores it got.

Usage: python benchmarks/data_pipeline.py [--rows 20000,100000] [--repeat 1] [--num-proc N].
Prints one markdown row per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
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


class Clock:
    """Wall and CPU (user + system, every thread of this process) seconds since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_training_hub(path: Path, tokenizer, num_proc: int | None) -> dict:
    from training_hub.data import load_examples, tokenize_examples

    clock = Clock()
    loaded = load_examples(path)
    load_s, _ = clock.read()
    result = tokenize_examples(loaded, tokenizer, max_seq_len=1024, cache_dir="none", num_proc=num_proc)
    wall, cpu = clock.read()
    return {"load_s": load_s, "wall": wall, "cpu": cpu, "tokens": result.summary.tokens_total,
            "median": result.summary.tokens_median, "result": result}


def time_unmasked(path: Path, tokenizer) -> dict:
    clock = Clock()
    rows = [json.loads(line) for line in path.open()]
    ids = [tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False) for row in rows]
    wall, cpu = clock.read()
    return {"wall": wall, "cpu": cpu, "ids": ids}


def time_masked(path: Path, tokenizer) -> dict:
    clock = Clock()
    rows = [json.loads(line) for line in path.open()]
    pairs = [naive_labels(tokenizer, row["messages"]) for row in rows]
    wall, cpu = clock.read()
    return {"wall": wall, "cpu": cpu, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="20000,100000", help="comma-separated row counts")
    parser.add_argument("--repeat", type=int, default=1, help="measure each row count this many times")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenize_examples workers (default: auto)")
    parser.add_argument("--check", type=int, default=200, help="rows whose ids and labels must equal the baselines'")
    args = parser.parse_args()

    from training_hub.tiny import build_tokenizer

    counts = [int(n) for n in args.rows.split(",")]
    conversations = make_conversations(max(counts))
    corpus = [m["content"] for c in conversations[:2000] for m in c["messages"]]
    tokenizer = build_tokenizer(template="chatml", corpus=corpus, vocab_size=4096)
    print(table_header())
    with tempfile.TemporaryDirectory() as folder:
        for rows in counts:
            path = Path(folder) / f"conversations-{rows}.jsonl"
            path.write_text("".join(json.dumps(c) + "\n" for c in conversations[:rows]))
            for _ in range(args.repeat):
                ours = time_training_hub(path, tokenizer, args.num_proc)
                unmasked = time_unmasked(path, tokenizer)
                masked = time_masked(path, tokenizer)
                check_same_tokens(ours["result"].dataset, unmasked["ids"], masked["pairs"], tokenizer, args.check)
                print(table_row(rows, ours, unmasked, masked), flush=True)


def check_same_tokens(dataset, unmasked_ids, pairs, tokenizer, count: int) -> None:
    """Same ids in all three; labels differ only where the masked loop also trains on the newline after <|im_end|>."""
    for i in range(min(count, len(pairs))):
        row, (ids, labels) = dataset[i], pairs[i]
        if not row["input_ids"] == ids == unmasked_ids[i]:
            raise SystemExit(f"row {i}: training_hub and the per-row loops give different token ids")
        extra = [ids[j] for j, (a, b) in enumerate(zip(row["labels"], labels)) if a != b]
        if tokenizer.decode(extra) != "\n" * 2 or any(a != -100 for a, b in zip(row["labels"], labels) if a != b):
            raise SystemExit(f"row {i}: labels differ beyond the newline after each answer: {extra}")


def table_header() -> str:
    return ("| date | machine | rows | tokens/row | training_hub rows/s (CPU s) | unmasked per-row rows/s (CPU s) | "
            "masked per-row rows/s (CPU s) | vs unmasked: wall, CPU | vs masked: wall |\n|---|---|---|---|---|---|---|---|---|")


def table_row(rows: int, ours: dict, unmasked: dict, masked: dict) -> str:
    rate = {name: rows / run["wall"] for name, run in (("ours", ours), ("unmasked", unmasked), ("masked", masked))}
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    return (f"| {date.today()} | {machine} | {rows:,} | ~{ours['median']} | {rate['ours']:,.0f} ({ours['cpu']:.1f}) | "
            f"{rate['unmasked']:,.0f} ({unmasked['cpu']:.1f}) | {rate['masked']:,.0f} ({masked['cpu']:.1f}) | "
            f"{rate['ours'] / rate['unmasked']:.2f}x, {unmasked['cpu'] / ours['cpu']:.2f}x | "
            f"{rate['ours'] / rate['masked']:.2f}x |")


if __name__ == "__main__":
    main()
