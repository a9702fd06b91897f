"""Examples -> token ids and labels: render, tokenize in batches (in parallel for large data), truncate,
drop rows with nothing to learn, summarize, cache.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .cache import cache_key, load_cached, resolve_cache_dir, save_cached
from .loading import problem_report
from .masking import IGNORE_INDEX, Renderer, labels_from_spans, make_renderer, render_with_spans
from .schema import TRUNCATION_MODES, DataError, DataSummary, Example, LoadedData, TokenizedData

CHUNK_ROWS = 1000  # rows per tokenizer call
PARALLEL_MIN_ROWS = 20_000  # below this, num_proc=None means one process
MAX_LISTED = 5

Row = tuple[list[int], list[int]]


@dataclass
class Kept:
    """Rows that survive truncation and the no-supervised-token check, with the counts of what did not."""

    rows: list[Row]
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0


def tokenize_examples(
    loaded: LoadedData,
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    truncation: str = "truncate",
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> TokenizedData:
    """Token ids and labels (-100 where no loss) for every example, masked for assistant-only loss.

    Args:
        loaded: the result of ``load_examples``.
        tokenizer: a fast (offset-reporting) Hugging Face tokenizer.
        max_seq_len: longest row, in tokens.
        train_on_inputs: loss on every token instead of only the assistant answers.
        truncation: "truncate" (keep the start), "drop" the row, or "error".
        cache_dir: cache folder (default ``$TRAINING_HUB_CACHE`` or ``~/.cache/training_hub/data``);
            ``"none"`` disables the cache.
        num_proc: worker processes; None picks half the cores (at most 8) for large data (>= 20k rows) on
            machines with 8+ cores, else 1.

    Raises:
        DataError: a template that cannot be masked, rows too long under "error", or more than half of the
            rows dropped.
    """
    check_arguments(max_seq_len, truncation, num_proc)
    renderer = make_renderer(tokenizer, needs_template=loaded.format not in ("text", "passthrough"))
    folder = resolve_cache_dir(cache_dir)
    if folder is not None:
        folder = folder / cache_key(loaded.fingerprint, tokenizer, renderer.chat_template or tokenizer.chat_template,
                                    max_seq_len=max_seq_len, train_on_inputs=train_on_inputs, truncation=truncation)
        cached = load_cached(folder)
        if cached is not None:
            return cached
    rows = encode_all(loaded.examples, renderer, train_on_inputs, num_proc)
    kept = apply_limits(loaded.examples, rows, max_seq_len, truncation)
    note = format_note(loaded.format, renderer)
    result = TokenizedData(build_dataset(kept.rows), summarize(loaded.format, len(rows), kept, note, max_seq_len,
                                                               truncation))
    if folder is not None:
        save_cached(folder, result)
        result.cache_path = str(folder)
    return result


def format_note(fmt: str, renderer: Renderer) -> str:
    """How rows became text, for the summary."""
    if fmt == "passthrough":
        return "passthrough: token ids and labels used as given"
    if fmt == "text":
        eos = f"eos_token {renderer.eos_token!r} appended" if renderer.eos_token else "the tokenizer has no eos_token"
        return f"text: loss on every token, {eos}"
    return renderer.note


def check_arguments(max_seq_len: int, truncation: str, num_proc: int | None) -> None:
    problems = []
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        problems.append(f"max_seq_len={max_seq_len!r}: use an int >= 2")
    if truncation not in TRUNCATION_MODES:
        problems.append(f"truncation={truncation!r}: use one of {', '.join(TRUNCATION_MODES)}")
    if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
        problems.append(f"num_proc={num_proc!r}: use None or an int >= 1")
    if problems:
        raise ValueError("; ".join(problems))


def encode_all(examples: list[Example], renderer: Renderer, train_on_inputs: bool, num_proc: int | None) -> list[Row]:
    """Encode every example, in chunks; in worker processes when that pays."""
    workers = num_proc or default_workers(len(examples))
    encode = partial(encode_chunk, renderer=renderer, train_on_inputs=train_on_inputs)
    if workers <= 1:
        chunks = [examples[i: i + CHUNK_ROWS] for i in range(0, len(examples), CHUNK_ROWS)]
        return [row for chunk in chunks for row in encode(chunk)]
    import multiprocessing

    # One slice per worker, so the tokenizer is pickled once per worker. "fork" does not re-import
    # the caller's __main__ (an unguarded script would run again under "spawn").
    size = -(-len(examples) // workers)
    slices = [examples[i: i + size] for i in range(0, len(examples), size)]
    with multiprocessing.get_context("fork").Pool(len(slices)) as pool:
        parts = pool.map(partial(encode_in_chunks, renderer=renderer, train_on_inputs=train_on_inputs), slices)
    return [row for part in parts for row in part]


def default_workers(rows: int) -> int:
    """Half the cores (the tokenizer's own threads use the rest) for large data on 8+ cores, else 1.

    Measured on a 2-core machine, two workers were slower than one: the batched Rust tokenizer already
    uses both cores, and the workers' results must be pickled back.
    """
    cores = os.cpu_count() or 1
    return min(cores // 2, 8) if rows >= PARALLEL_MIN_ROWS and cores >= 8 else 1


def encode_in_chunks(examples: list[Example], renderer: Renderer, train_on_inputs: bool) -> list[Row]:
    rows: list[Row] = []
    for i in range(0, len(examples), CHUNK_ROWS):
        rows += encode_chunk(examples[i: i + CHUNK_ROWS], renderer, train_on_inputs)
    return rows


def encode_chunk(examples: list[Example], renderer: Renderer, train_on_inputs: bool) -> list[Row]:
    """Render the chunk's texts, tokenize them in one batch call, and label them."""
    rows: list[Row | None] = [None] * len(examples)
    texts, spans, slots = [], [], []
    for i, example in enumerate(examples):
        if example.input_ids is not None:
            rows[i] = passthrough_row(example, len(renderer.tokenizer))
            continue
        text, answer_spans = example_text(example, renderer)
        texts.append(text)
        spans.append(answer_spans)
        slots.append(i)
    if texts:
        encoded = renderer.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for j, i in enumerate(slots):
            ids, offsets = encoded["input_ids"][j], encoded["offset_mapping"][j]
            if renderer.bos_token_id is not None and not texts[j].startswith(renderer.bos_token):
                ids, offsets = [renderer.bos_token_id, *ids], [(0, 0), *offsets]
            rows[i] = (ids, list(ids) if train_on_inputs else labels_from_spans(ids, offsets, spans[j]))
    return rows  # type: ignore[return-value]


def example_text(example: Example, renderer: Renderer) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and its loss spans (every character for ``text`` rows)."""
    if example.text is not None:
        text = example.text + (renderer.eos_token or "")
        return text, [(0, len(text))]
    from jinja2 import TemplateError

    try:
        return render_with_spans(renderer, example.messages or [])
    except DataError as error:
        raise DataError(f"{example.origin}: {error}") from None
    except TemplateError as error:
        raise DataError(f"{example.origin}: the chat template failed on this conversation: {error}") from None


def passthrough_row(example: Example, vocab_size: int) -> Row:
    ids = example.input_ids or []
    if max(ids) >= vocab_size:
        raise DataError(f"{example.origin}: input_ids holds token id {max(ids)}, but the tokenizer has only "
                        f"{vocab_size} tokens (ids 0..{vocab_size - 1}); was the data tokenized with another tokenizer?")
    return ids, list(example.labels) if example.labels is not None else list(ids)


def apply_limits(examples: list[Example], rows: list[Row], max_seq_len: int, truncation: str) -> Kept:
    """Truncate/drop/refuse long rows, then drop rows without a supervised token; refuse losing most rows."""
    too_long = [f"{ex.origin}: {len(ids):,} tokens > max_seq_len={max_seq_len:,}"
                for ex, (ids, _) in zip(examples, rows) if len(ids) > max_seq_len]
    if too_long and truncation == "error":
        raise DataError(problem_report("the data", None, too_long, len(rows)).replace("are invalid", "are too long")
                        + "\nRaise max_seq_len, or pass truncation='truncate' or 'drop'.")
    kept = Kept(rows=[])
    empty: list[str] = []
    for example, (ids, labels) in zip(examples, rows):
        if len(ids) > max_seq_len:
            if truncation == "drop":
                kept.dropped_too_long += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            kept.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            kept.dropped_no_supervised += 1
            empty.append(example.origin)
            continue
        kept.rows.append((ids, labels))
    check_dropped(kept, len(rows), empty, max_seq_len)
    return kept


def check_dropped(kept: Kept, rows_in: int, empty: list[str], max_seq_len: int) -> None:
    dropped = kept.dropped_too_long + kept.dropped_no_supervised
    if dropped * 2 <= rows_in and kept.rows:
        return
    raise DataError(
        f"{dropped:,} of {rows_in:,} rows would be dropped ({kept.dropped_too_long:,} longer than "
        f"max_seq_len={max_seq_len:,}, {kept.dropped_no_supervised:,} with no supervised token left"
        + (f", e.g. {', '.join(empty[:MAX_LISTED])}" if empty else "")
        + "). Refusing to train on what is left: raise max_seq_len, shorten the prompts, or check the data.")


def summarize(fmt: str, rows_in: int, kept: Kept, note: str, max_seq_len: int, truncation: str) -> DataSummary:
    lengths = [len(ids) for ids, _ in kept.rows]
    supervised = sum(sum(1 for label in labels if label != IGNORE_INDEX) for _, labels in kept.rows)
    return DataSummary(
        format=fmt, rows_in=rows_in, rows_out=len(kept.rows), rows_truncated=kept.truncated,
        rows_dropped_too_long=kept.dropped_too_long, rows_dropped_no_supervised_tokens=kept.dropped_no_supervised,
        tokens_min=min(lengths), tokens_median=int(statistics.median_low(lengths)), tokens_max=max(lengths),
        tokens_total=sum(lengths), supervised_tokens_total=supervised, template_note=note,
        max_seq_len=max_seq_len, truncation=truncation,
    )


def build_dataset(rows: list[Row]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]})
