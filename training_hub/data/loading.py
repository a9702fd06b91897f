"""Read training data from files, folders, lists or ``datasets.Dataset`` objects; detect and validate.

Pure Python and the standard library: ``pyarrow`` is imported only for ``.parquet`` files and
``datasets`` only when the source is a Dataset or a Hub name.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import Fields, convert_row, format_signatures, row_format
from .turns import RowProblem, closest
from .schema import DATASET_TYPES, DataError, Example, LoadedData

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Text formats may also come gzip-compressed ("train.jsonl.gz"); parquet compresses internally.
COMPRESSED_SUFFIXES = (".jsonl.gz", ".json.gz", ".csv.gz")
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
    images: bool = False,
) -> LoadedData:
    """Read ``source``, detect its format, convert every row to messages/text/token ids and validate it.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder of such files (one format),
            a list of dicts, a ``datasets.Dataset``, or a Hub dataset name ``owner/name`` (train split).
        dataset_type: one of ``DATASET_TYPES``; "auto" detects it from the rows' fields.
        field_messages, field_instruction, field_input, field_output: column names, when renamed.
        images: accept image parts in user turns (for a vision-language model), each opened and checked here.

    Raises:
        DataError: listing the first few problems (file:line or row, field, what is valid) and their count.
    """
    if dataset_type not in DATASET_TYPES:
        hint = closest(dataset_type, DATASET_TYPES)
        raise DataError(f"dataset_type={dataset_type!r} is not valid; use one of {', '.join(DATASET_TYPES)}"
                        + (f" (did you mean {hint!r}?)" if hint else ""))
    fields = Fields(field_messages, field_instruction, field_input, field_output, images)
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
        add_record(raw, f"{prefix}{i}", record)
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
    if looks_local(text):
        raise DataError(f"Training data not found: {text} (no such file or folder)")
    return read_hub(text)


def looks_local(text: str) -> bool:
    """A path rather than a Hub name: absolute/relative/home prefix, a data file suffix, more than one '/', or
    a first component that is a local folder (``data/train`` when ``data/`` exists)."""
    path = Path(text).expanduser()
    return (text.startswith(("/", "./", "../", "~", "\\")) or data_suffix(path) is not None
            or not HUB_NAME.match(text) or path.parent.is_dir() and str(path.parent) not in ("", "."))


def read_hub(name: str) -> RawRows:
    """A Hub dataset name: ``datasets.load_dataset(name, split="train")`` (needs network access)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except (OSError, ValueError) as error:  # offline, unknown repo, no train split
        raise DataError(f"Training data {name!r}: no such file or folder here, and loading it as a Hub dataset "
                        f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    return rows_from_dataset(dataset, f"Hub dataset {name} (train split)")


def data_suffix(path: Path) -> str | None:
    """The data file type of `path` ("train.JSONL.gz" -> ".jsonl.gz"), or None when it is not one we read."""
    name = path.name.lower()
    return next((s for s in COMPRESSED_SUFFIXES + SUFFIXES if name.endswith(s)), None)


def _skip_reason(path: Path, folder: Path) -> str | None:
    """Why a file under a data folder would not be read (None: it is read)."""
    hidden = [part for part in path.relative_to(folder).parts if part.startswith(".")]
    if hidden:
        return f"hidden ({hidden[0]})"
    if path.is_dir():  # only a linked folder gets here: rglob does not descend into links
        return "a linked folder (links are not followed)"
    if not path.is_file():
        return "not a regular file (a broken link or a special file)"
    if data_suffix(path) is None:
        return f"not a data file (read: {', '.join(SUFFIXES + COMPRESSED_SUFFIXES)})"
    return None


def read_folder(folder: Path, fields: Fields) -> RawRows:
    """Every file under `folder`, sub-folders included, in path order; any file that would not be read is an error."""
    files = sorted(p for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())
    skipped = [(p, _skip_reason(p, folder)) for p in files]
    skipped = [(p, why) for p, why in skipped if why is not None]
    if skipped:
        listed = "; ".join(f"{p.relative_to(folder)}: {why}" for p, why in skipped[:MAX_LISTED_PROBLEMS])
        more = f"; ... and {len(skipped) - MAX_LISTED_PROBLEMS} more" if len(skipped) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"Folder {folder} holds {len(skipped)} file(s) that would not be read ({listed}{more}). "
                        "Every file in a data folder is trained on: move these out, or point data_path at a folder "
                        "holding only the data")
    if not files:
        raise DataError(f"Folder {folder} holds no data files ({', '.join(SUFFIXES + COMPRESSED_SUFFIXES)})")
    kinds = sorted({data_suffix(p).removesuffix(".gz") for p in files})
    if len(kinds) > 1:
        raise DataError(f"Folder {folder} mixes file types ({', '.join(kinds)}); keep one type per folder")
    raw = RawRows(f"{folder} ({len(files)} files)")
    for path in files:
        part = read_file(path, f"{folder.name}/{path.relative_to(folder).as_posix()}", fields)
        raw.rows += part.rows
        raw.problems += part.problems
    return raw


def read_file(path: Path, label: str, fields: Fields) -> RawRows:
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    suffix = data_suffix(path)
    if suffix is None:
        raise DataError(f"Cannot read {path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(SUFFIXES + COMPRESSED_SUFFIXES)}")
    raw = readers[suffix.removesuffix(".gz")](path, label, fields)
    raw.description = str(path)
    return raw


def read_bytes(path: Path, label: str) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; a damaged archive is a DataError naming it."""
    if not path.name.lower().endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{label}: not a readable gzip file ({error}); re-compress it or store it uncompressed") from None


def decode_text(data: bytes, label: str) -> str:
    """UTF-8 text (a leading BOM dropped); other bytes are a DataError naming file:line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{label}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
                        "re-save the file as UTF-8") from None


class DuplicateKeys(ValueError):
    """A JSON object names a key twice (json keeps only the last value, silently)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise DuplicateKeys(", ".join(repr(k) for k in twice))
    return dict(pairs)


def parse_json(text: str) -> Any:
    """json.loads, refusing an object with a key given twice (raises DuplicateKeys naming them)."""
    return json.loads(text, object_pairs_hook=_unique_object)


def unicode_problem(record: Any) -> str | None:
    """Why `record` cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800"), or None."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds a lone surrogate ({error.object[error.start:error.end].encode('unicode_escape').decode()}), "
                "which is not valid Unicode text; fix the escape sequence")
    except (TypeError, ValueError):
        return None  # not JSON-serialisable values (e.g. from parquet) are judged by the format checks
    return None


def read_jsonl(path: Path, label: str, fields: Fields) -> RawRows:
    raw = RawRows(label)
    data = read_bytes(path, label)
    for number, line_bytes in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        origin = f"{label}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            raw.problems.append(f"{origin}: not UTF-8 text (byte 0x{line_bytes[error.start]:02x} at column "
                                f"{error.start + 1}); re-save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except json.JSONDecodeError as error:
            raw.problems.append(f"{origin}: invalid JSON ({error.msg} at column {error.colno})")
            continue
        except DuplicateKeys as keys:
            raw.problems.append(f"{origin}: the key(s) {keys} appear twice in one JSON object; keep one")
            continue
        add_record(raw, origin, record, "a JSON object per line")
    return raw


def add_record(raw: RawRows, origin: str, record: Any, expected: str = "an object (dict) per row") -> None:
    """Append `record` as a row, or a problem when it is not a dict or not valid Unicode."""
    if not isinstance(record, dict):
        raw.problems.append(f"{origin}: expected {expected}, got {type(record).__name__}")
    elif (problem := unicode_problem(record)) is not None:
        raw.problems.append(f"{origin}: {problem}")
    else:
        raw.rows.append((origin, record))


def read_json(path: Path, label: str, fields: Fields) -> RawRows:
    try:
        data = parse_json(decode_text(read_bytes(path, label), label))
    except json.JSONDecodeError as error:
        raise DataError(f"{label}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    except DuplicateKeys as keys:
        raise DataError(f"{label}: the key(s) {keys} appear twice in one JSON object; keep one") from None
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
    reader = csv.DictReader(io.StringIO(decode_text(read_bytes(path, label), label), newline=""))
    header = reader.fieldnames or []
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"{label}:1: the header names the column(s) {', '.join(map(repr, twice))} twice; keep one")
    for index, record in enumerate(reader):
        origin = f"{label} row {index}"
        try:
            add_record(raw, origin, decode_csv_row(record, json_columns))
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
                    value = parse_json(value)
                except json.JSONDecodeError as error:
                    raise RowProblem(f"'{key}' must hold JSON in a CSV file ({error.msg})") from None
                except DuplicateKeys as keys:
                    raise RowProblem(f"'{key}' names the key(s) {keys} twice in one JSON object; keep one") from None
        row[key] = value
    return row
