"""Examples -> token ids and labels: render, tokenize in batches (in parallel for large data), truncate,
drop rows with nothing to learn, summarize, cache.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .cache import cache_key, load_cached, resolve_cache_dir, save_cached
from .loading import MAX_LISTED_PROBLEMS, problem_report
from .masking import (IGNORE_INDEX, Rendered, Renderer, make_labels, make_renderer, needs_spans, render_for_loss,
                      render_jobs, rendered_from)
from .schema import DataError, DataSummary, Example, LoadedData, TokenizedData
from .settings import settings_problems

CHUNK_ROWS = 1000  # rows per tokenizer call
PARALLEL_MIN_ROWS = 20_000  # below this, num_proc=None means one process

Row = tuple[Any, Any]  # input_ids and labels, int64 numpy arrays


@dataclass
class Tally:
    """What the limits did to a set of rows; tallies of chunks add up."""

    rows_in: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    supervised: int = 0
    lengths: list[int] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)  # "origin: n tokens > max_seq_len" (truncation="error")
    empty: list[str] = field(default_factory=list)  # origins of rows left with no supervised token

    def add(self, other: "Tally") -> None:
        for name in ("rows_in", "truncated", "dropped_too_long", "dropped_no_supervised", "supervised"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths
        self.too_long += other.too_long
        self.empty += other.empty


@dataclass(frozen=True)
class Settings:
    renderer: Renderer
    max_seq_len: int
    train_on_inputs: bool
    truncation: str
    train_on_reasoning: bool = True


def tokenize_examples(
    loaded: LoadedData,
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    truncation: str = "truncate",
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    train_on_reasoning: bool = True,
) -> TokenizedData:
    """Token ids and labels (-100 where no loss) for every example, masked for assistant-only loss.

    Args:
        loaded: the result of ``load_examples``.
        tokenizer: a fast (offset-reporting) Hugging Face tokenizer.
        max_seq_len: longest row, in tokens.
        train_on_inputs: loss on every token instead of only the assistant answers (weight-0 answers and,
            without ``train_on_reasoning``, reasoning still carry none).
        truncation: "truncate" (keep the start), "drop" the row, or "error".
        cache_dir: cache folder (default ``$TRAINING_HUB_CACHE`` or ``~/.cache/training_hub/data``);
            ``"none"`` disables the cache.
        num_proc: worker processes; None picks half the cores (at most 8) for large data (>= 20k rows) on
            machines with 8+ cores, else 1.
        train_on_reasoning: loss on the ``reasoning_content`` the template renders in an answer (default);
            False leaves the reasoning text itself without loss.

    Raises:
        DataError: a template that cannot be masked, rows too long under "error", or more than half of the
            rows dropped.
    """
    check_arguments(max_seq_len, truncation, num_proc)
    renderer = make_renderer(tokenizer, needs_template=loaded.format not in ("text", "passthrough"))
    folder = resolve_cache_dir(cache_dir)
    if folder is not None:
        folder = folder / cache_key(loaded.fingerprint, tokenizer, renderer.chat_template or tokenizer.chat_template,
                                    max_seq_len=max_seq_len, train_on_inputs=train_on_inputs, truncation=truncation,
                                    train_on_reasoning=train_on_reasoning)
        cached = load_cached(folder)
        if cached is not None:
            return cached
    settings = Settings(renderer, max_seq_len, train_on_inputs, truncation, train_on_reasoning)
    table, tally = process_all(loaded.examples, settings, num_proc)
    check_tally(tally, max_seq_len)
    summary = summarize(loaded.format, tally, format_note(loaded.format, renderer), max_seq_len, truncation)
    from datasets import Dataset

    result = TokenizedData(Dataset(table), summary)
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
    problems = settings_problems(max_seq_len, truncation)
    if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
        problems.append(f"num_proc={num_proc!r}: use None or an int >= 1")
    if problems:
        raise ValueError("; ".join(problems))


def process_all(examples: list[Example], settings: Settings, num_proc: int | None) -> tuple[Any, Tally]:
    """Process every example in chunks, in worker processes when that pays; one Arrow table and tally."""
    import pyarrow as pa

    workers = num_proc or default_workers(len(examples))
    if workers <= 1:
        parts = [process_slice(examples, settings)]
    else:
        import multiprocessing

        # One slice per worker, so the tokenizer is pickled once per worker; results come back as Arrow
        # buffers. "fork" does not re-import the caller's __main__ (an unguarded script would run again
        # under "spawn").
        size = -(-len(examples) // workers)
        slices = [examples[i: i + size] for i in range(0, len(examples), size)]
        with multiprocessing.get_context("fork").Pool(len(slices)) as pool:
            parts = pool.map(partial(process_slice, settings=settings), slices)
    tally = Tally()
    for _, part in parts:
        tally.add(part)
    return pa.concat_tables([table for table, _ in parts]), tally


def default_workers(rows: int) -> int:
    """Half the cores (the tokenizer's own threads use the rest) for large data on 8+ cores, else 1.

    Measured on a 2-core machine, two workers were slower than one: the batched Rust tokenizer already
    uses both cores.
    """
    cores = os.cpu_count() or 1
    return min(cores // 2, 8) if rows >= PARALLEL_MIN_ROWS and cores >= 8 else 1


def process_slice(examples: list[Example], settings: Settings) -> tuple[Any, Tally]:
    """Render, encode, limit and convert to Arrow chunk by chunk, so few Python objects live at once.

    The Rust tokenizer releases the GIL: while it encodes one chunk (on every core), this thread renders the
    next chunk and labels the one before, so no core waits for Python.
    """
    import pyarrow as pa
    from concurrent.futures import ThreadPoolExecutor

    from .encoding import Encoder

    encoder = Encoder(settings.renderer.tokenizer)
    tables, tally, pending = [], Tally(), None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(0, len(examples), CHUNK_ROWS):
            chunk = render_chunk(examples[i: i + CHUNK_ROWS], settings)
            future = pool.submit(encoder.encode, [text.text for text in chunk.rendered])
            if pending is not None:
                tables.append(finish_chunk(*pending, settings, tally))
            pending = (chunk, future)
        if pending is not None:
            tables.append(finish_chunk(*pending, settings, tally))
    return (pa.concat_tables(tables) if tables else rows_table([])), tally


@dataclass
class Chunk:
    """Examples on their way to token rows: passthrough rows already made, the others rendered."""

    examples: list[Example]
    rows: list[Row | None]
    rendered: list[Rendered]
    slots: list[int]  # where each rendered example goes in ``rows``


def render_chunk(examples: list[Example], settings: Settings) -> Chunk:
    """Passthrough rows as they are; text rows with EOS; every render the chat rows need in one batched call."""
    from jinja2 import TemplateError

    chunk, jobs, chats = Chunk(examples, [None] * len(examples), [], []), [], []
    vocab_size = len(settings.renderer.tokenizer)
    for i, example in enumerate(examples):
        if example.input_ids is not None:
            chunk.rows[i] = passthrough_row(example, vocab_size)
        elif example.messages is None:
            chunk.rendered.append(example_text(example, settings))
            chunk.slots.append(i)
        else:
            spans = naming_the_row(example, needs_spans, example.messages, settings.train_on_inputs,
                                   settings.train_on_reasoning)
            new = render_jobs(example.messages, example.tools, spans)
            chats.append((i, spans, slice(len(jobs), len(jobs) + len(new))))
            jobs += new
    try:
        texts = settings.renderer.batch.render(jobs)
    except TemplateError:
        texts = None  # a template raised on some row: render row by row below, to name it
    for i, spans, where in chats:
        example = examples[i]
        if texts is None:
            chunk.rendered.append(example_text(example, settings))
        else:
            chunk.rendered.append(naming_the_row(example, rendered_from, settings.renderer, example.messages,
                                                 example.tools, texts[where], spans, settings.train_on_reasoning))
        chunk.slots.append(i)
    return chunk


def finish_chunk(chunk: Chunk, encoded: Any, settings: Settings, tally: Tally) -> Any:
    """Label the encoded texts (BOS added once where the tokenizer wants it), apply the length limits, and
    return the chunk's Arrow table."""
    renderer = settings.renderer
    for slot, text, tokens in zip(chunk.slots, chunk.rendered, encoded.result()):
        if renderer.bos_token_id is not None and not text.text.startswith(renderer.bos_token):
            tokens = tokens.with_bos(renderer.bos_token_id)
        chunk.rows[slot] = (tokens.ids, make_labels(tokens, text, settings.train_on_inputs))
    kept = apply_limits(chunk.examples, chunk.rows, settings.max_seq_len, settings.truncation, tally)
    return rows_table(kept)


def rows_table(rows: list[Row]) -> Any:
    """An Arrow table with the columns and types ``datasets`` uses for token data, built from flat arrays."""
    import numpy as np
    import pyarrow as pa

    offsets = pa.array(np.cumsum([0] + [len(ids) for ids, _ in rows]), type=pa.int32())
    columns = {}
    for name, index, dtype in (("input_ids", 0, np.int32), ("labels", 1, np.int64)):
        values = np.concatenate([row[index] for row in rows]).astype(dtype) if rows else np.zeros(0, dtype)
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values))
    return pa.table(columns)


def example_text(example: Example, settings: Settings) -> Rendered:
    """The text to tokenize and its loss spans (every character for ``text`` rows), rendered on its own."""
    renderer = settings.renderer
    if example.text is not None:
        text = example.text + (renderer.eos_token or "")
        return Rendered(text, [(0, len(text))], [])
    return naming_the_row(example, render_for_loss, renderer, example.messages or [], example.tools,
                          settings.train_on_inputs, settings.train_on_reasoning)


def naming_the_row(example: Example, make: Any, *args: Any) -> Any:
    """``make(*args)``, with a DataError or a template's own error prefixed by the example's origin."""
    from jinja2 import TemplateError

    try:
        return make(*args)
    except DataError as error:
        raise DataError(f"{example.origin}: {error}") from None
    except TemplateError as error:
        raise DataError(f"{example.origin}: the chat template failed on this conversation: {error}") from None


def passthrough_row(example: Example, vocab_size: int) -> Row:
    """Pre-tokenized ids and labels, checked against the vocabulary (an id out of range would fail only inside
    the model, on a GPU as a device-side assert)."""
    import numpy as np

    ids = np.asarray(example.input_ids or [], dtype=np.int64)
    labels = np.asarray(example.labels, dtype=np.int64) if example.labels is not None else ids.copy()
    for column, values in (("input_ids", ids), ("labels", labels[labels != IGNORE_INDEX])):
        largest = int(values.max(initial=0))
        if largest >= vocab_size:
            raise DataError(f"{example.origin}: {column} holds token id {largest}, but the tokenizer has only "
                            f"{vocab_size} tokens (ids 0..{vocab_size - 1}); was the data tokenized with another "
                            "tokenizer?")
    return ids, labels


def apply_limits(examples: list[Example], rows: list[Row], max_seq_len: int, truncation: str,
                 tally: Tally) -> list[Row]:
    """Truncate/drop/note long rows, then drop rows without a supervised token; count it all in ``tally``."""
    kept: list[Row] = []
    for example, (ids, labels) in zip(examples, rows):
        tally.rows_in += 1
        if len(ids) > max_seq_len:
            if truncation == "error":
                tally.too_long.append(f"{example.origin}: {len(ids):,} tokens > max_seq_len={max_seq_len:,}")
                continue
            if truncation == "drop":
                tally.dropped_too_long += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            tally.truncated += 1
        supervised = int((labels != IGNORE_INDEX).sum())
        if supervised == 0:
            tally.dropped_no_supervised += 1
            tally.empty.append(example.origin)
            continue
        tally.supervised += supervised
        tally.lengths.append(len(ids))
        kept.append((ids, labels))
    return kept


def check_tally(tally: Tally, max_seq_len: int) -> None:
    """Refuse rows too long under truncation="error", and losing more than half of the rows."""
    if tally.too_long:
        raise DataError(problem_report("the data", None, tally.too_long, tally.rows_in, verdict="are too long")
                        + "\nRaise max_seq_len, or pass truncation='truncate' or 'drop'.")
    dropped = tally.dropped_too_long + tally.dropped_no_supervised
    if dropped * 2 <= tally.rows_in and tally.lengths:
        return
    raise DataError(
        f"{dropped:,} of {tally.rows_in:,} rows would be dropped ({tally.dropped_too_long:,} longer than "
        f"max_seq_len={max_seq_len:,}, {tally.dropped_no_supervised:,} with no supervised token left"
        + (f", e.g. {', '.join(tally.empty[:MAX_LISTED_PROBLEMS])}" if tally.empty else "")
        + "). Refusing to train on what is left: raise max_seq_len, shorten the prompts, or check the data.")


def summarize(fmt: str, tally: Tally, note: str, max_seq_len: int, truncation: str) -> DataSummary:
    lengths = tally.lengths
    return DataSummary(
        format=fmt, rows_in=tally.rows_in, rows_out=len(lengths), rows_truncated=tally.truncated,
        rows_dropped_too_long=tally.dropped_too_long, rows_dropped_no_supervised_tokens=tally.dropped_no_supervised,
        tokens_min=min(lengths), tokens_median=int(statistics.median_low(lengths)), tokens_max=max(lengths),
        tokens_total=sum(lengths), supervised_tokens_total=tally.supervised, template_note=note,
        max_seq_len=max_seq_len, truncation=truncation,
    )
