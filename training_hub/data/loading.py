"""Read training data from files, folders, lists or ``datasets.Dataset`` objects; detect and validate.

Pure Python and the standard library: ``pyarrow`` is imported only for ``.parquet`` files and
``datasets`` only when the source is a Dataset or a Hub name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import Fields, convert_row, format_signatures, row_format
from .turns import RowProblem, closest
from .schema import DATASET_TYPES, DataError, Example, LoadedData

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LISTED_PROBLEMS = 5
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RawRows:
    """Rows as read, each with its origin ("train.jsonl:12", "row 3"), plus problems found while reading."""

    description: str
    rows: list[tuple[str, dict]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_examples(
    source: Any,
    *,
    dataset_type: str = "auto",
    field_messages: str = "messages",
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
) -> LoadedData:
    """Read ``source``, detect its format, convert every row to messages/text/token ids and validate it.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder of such files (one format),
            a list of dicts, a ``datasets.Dataset``, or a Hub dataset name ``owner/name`` (train split).
        dataset_type: one of ``DATASET_TYPES``; "auto" detects it from the rows' fields.
        field_messages, field_instruction, field_input, field_output: column names, when renamed.

    Raises:
        DataError: listing the first few problems (file:line or row, field, what is valid) and their count.
    """
    if dataset_type not in DATASET_TYPES:
        hint = closest(dataset_type, DATASET_TYPES)
        raise DataError(f"dataset_type={dataset_type!r} is not valid; use one of {', '.join(DATASET_TYPES)}"
                        + (f" (did you mean {hint!r}?)" if hint else ""))
    fields = Fields(field_messages, field_instruction, field_input, field_output)
    raw = read_source(source, fields)
    if not raw.rows and not raw.problems:
        raise DataError(f"{raw.description} is empty: it holds no rows")
    fmt = resolve_format(dataset_type, raw, fields)
    examples, problems = convert_rows(raw.rows, fmt, fields)
    problems = raw.problems + problems
    if problems:
        raise DataError(problem_report(raw.description, fmt, problems, len(raw.rows) + len(raw.problems)))
    return LoadedData(examples=examples, format=fmt, source=raw.description, fingerprint=fingerprint(examples, fmt))


def convert_rows(rows: list[tuple[str, dict]], fmt: str, fields: Fields) -> tuple[list[Example], list[str]]:
    examples, problems = [], []
    for origin, row in rows:
        try:
            examples.append(Example(origin=origin, **convert_row(row, fmt, fields)))
        except RowProblem as problem:
            problems.append(f"{origin}: {problem}")
    return examples, problems


def problem_report(description: str, fmt: str | None, problems: list[str], n_rows: int,
                   verdict: str = "are invalid") -> str:
    """One message for many bad rows: the first few, then the total."""
    read_as = f" (read as {fmt})" if fmt else ""
    lines = [f"{len(problems)} of {n_rows} rows in {description}{read_as} {verdict}:"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def resolve_format(dataset_type: str, raw: RawRows, fields: Fields) -> str:
    """The format to read the rows as: the given one, or the one most rows look like."""
    if dataset_type == "chat_template":
        return "messages"
    if dataset_type != "auto":
        return dataset_type
    votes = Counter(row_format(row, fields) for _, row in raw.rows)
    votes.pop(None, None)
    if votes:
        order = list(format_signatures(fields))
        return max(votes, key=lambda name: (votes[name], -order.index(name)))
    raise DataError(detection_failure(raw, fields))


def detection_failure(raw: RawRows, fields: Fields) -> str:
    if not raw.rows:
        return problem_report(raw.description, None, raw.problems, len(raw.problems))
    origin, first = raw.rows[0]
    known = [column for columns in format_signatures(fields).values() for column in columns]
    hints = [f"'{key}' -> '{closest(key, known)}'?" for key in first if closest(key, known) and key not in known]
    expected = "; ".join(f"{name}: {' + '.join(repr(c) for c in columns)}"
                         for name, columns in format_signatures(fields).items())
    return (f"Cannot detect the format of {raw.description}: no row has the fields of a known format "
            f"({origin} has {', '.join(repr(k) for k in first) or 'no fields'}). Expected {expected}."
            + (f" Misspelled? {' '.join(hints)}" if hints else "")
            + " Rename the columns, or pass dataset_type=... and field_messages/field_instruction/field_input/"
              "field_output.")


def fingerprint(examples: list[Example], fmt: str) -> str:
    """sha256 of the normalized content and the format (origins excluded)."""
    digest = hashlib.sha256(fmt.encode())
    for ex in examples:
        fields = [ex.messages, ex.text, ex.input_ids, ex.labels] + ([ex.tools] if ex.tools else [])
        digest.update(json.dumps(fields, ensure_ascii=False,
                                 separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def split_examples(loaded: LoadedData, fraction: float, seed: int) -> tuple[LoadedData, LoadedData]:
    """Hold out `fraction` of the rows (at least one, seeded, order otherwise kept) for evaluation.

    Returns (train, eval). Fewer than two rows cannot be split.
    """
    n = len(loaded.examples)
    if n < 2:
        raise DataError(f"{loaded.source}: eval_split needs at least 2 rows, found {n}")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(loaded.examples) if i not in chosen]
    held = [ex for i, ex in enumerate(loaded.examples) if i in chosen]
    return (LoadedData(train, loaded.format, loaded.source, fingerprint(train, loaded.format)),
            LoadedData(held, loaded.format, f"{loaded.source} (eval_split {fraction:g}: {n_eval} rows)",
                       fingerprint(held, loaded.format)))


# --- reading -------------------------------------------------------------------------------------------


def read_source(source: Any, fields: Fields) -> RawRows:
    if isinstance(source, list):
        return rows_from_records(source, "a list of dicts", prefix="row ")
    if is_datasets_object(source):
        return rows_from_dataset(source, f"a datasets.{type(source).__name__}")
    if isinstance(source, (str, Path)):
        return read_path_or_hub(source, fields)
    raise DataError(f"Cannot read training data from a {type(source).__name__}: pass a path (.jsonl, .json, .parquet, "
                    ".csv or a folder of them), a list of dicts, a datasets.Dataset or a Hub name 'owner/name'")


def is_datasets_object(source: Any) -> bool:
    """True for datasets.Dataset/DatasetDict, checked without importing ``datasets``."""
    return type(source).__module__.split(".")[0] == "datasets" and "datasets" in sys.modules


def rows_from_records(records: list, description: str, prefix: str = "row ") -> RawRows:
    raw = RawRows(description)
    for i, record in enumerate(records):
        if isinstance(record, dict):
            raw.rows.append((f"{prefix}{i}", record))
        else:
            raw.problems.append(f"{prefix}{i}: expected an object (dict) per row, got {type(record).__name__}")
    return raw


def rows_from_dataset(dataset: Any, description: str) -> RawRows:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"Got a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['train']")
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"Got a {type(dataset).__name__}; pass a datasets.Dataset (not streaming/iterable)")
    return rows_from_records(dataset.to_list(), description)


def read_path_or_hub(source: str | Path, fields: Fields) -> RawRows:
    path = Path(source).expanduser()
    if path.is_dir():
        return read_folder(path, fields)
    if path.is_file():
        return read_file(path, path.name, fields)
    text = str(source)
    if path.suffix.lower() not in SUFFIXES and HUB_NAME.match(text):
        return read_hub(text)
    raise DataError(f"Training data not found: {text} (no such file or folder)")


def read_hub(name: str) -> RawRows:
    """A Hub dataset name: ``datasets.load_dataset(name, split="train")`` (needs network access)."""
    import datasets

    return rows_from_dataset(datasets.load_dataset(name, split="train"), f"Hub dataset {name} (train split)")


def read_folder(folder: Path, fields: Fields) -> RawRows:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"Folder {folder} holds no data files ({', '.join(SUFFIXES)})")
    suffixes = sorted({p.suffix.lower() for p in files})
    if len(suffixes) > 1:
        raise DataError(f"Folder {folder} mixes file types ({', '.join(suffixes)}); keep one type per folder")
    raw = RawRows(f"{folder} ({len(files)} files)")
    for path in files:
        part = read_file(path, f"{folder.name}/{path.name}", fields)
        raw.rows += part.rows
        raw.problems += part.problems
    return raw


def read_file(path: Path, label: str, fields: Fields) -> RawRows:
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"Cannot read {path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    raw = reader(path, label, fields)
    raw.description = str(path)
    return raw


def read_jsonl(path: Path, label: str, fields: Fields) -> RawRows:
    raw = RawRows(label)
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raw.problems.append(f"{label}:{number}: invalid JSON ({error.msg} at column {error.colno})")
                continue
            if isinstance(record, dict):
                raw.rows.append((f"{label}:{number}", record))
            else:
                raw.problems.append(f"{label}:{number}: expected a JSON object per line, got {type(record).__name__}")
    return raw


def read_json(path: Path, label: str, fields: Fields) -> RawRows:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(f"{label}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{label}: a JSON object must hold exactly one list of rows; found {len(lists)} "
                            f"({', '.join(lists) or 'none'})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a JSON list of rows, got {type(data).__name__}")
    return rows_from_records(data, label, prefix=f"{label} row ")


def read_parquet(path: Path, label: str, fields: Fields) -> RawRows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Reading {label} needs pyarrow: pip install pyarrow") from None
    return rows_from_records(pq.read_table(path).to_pylist(), label, prefix=f"{label} row ")


def read_csv(path: Path, label: str, fields: Fields) -> RawRows:
    """CSV rows; list columns (messages, conversations, input_ids, labels) hold JSON text."""
    json_columns = {fields.messages, "conversations", "input_ids", "labels", "tools"}
    raw = RawRows(label)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for index, record in enumerate(csv.DictReader(handle)):
            origin = f"{label} row {index}"
            try:
                raw.rows.append((origin, decode_csv_row(record, json_columns)))
            except RowProblem as problem:
                raw.problems.append(f"{origin}: {problem}")
    return raw


def decode_csv_row(record: dict, json_columns: set[str]) -> dict:
    row: dict = {}
    for key, value in record.items():
        if key is None:
            raise RowProblem("more cells than header columns")
        if key in json_columns and isinstance(value, str):
            value = value.strip() or None
            if value is not None:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    raise RowProblem(f"'{key}' must hold JSON in a CSV file ({error.msg})") from None
        row[key] = value
    return row
