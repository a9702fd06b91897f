"""One small converter per source format: a row (dict) -> the fields of an :class:`Example`.

Every converter validates what it reads and raises :class:`RowProblem` with a message that names the
field and what is valid; the loader adds where the row came from (file:line or row index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .schema import Message
from .turns import RowProblem, check_conversation, closest, missing_field, parse_tools, parse_turns, require_text


@dataclass(frozen=True)
class Fields:
    """Column names of the chat and alpaca formats (renamable by the user)."""

    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    images: bool = False  # image parts are accepted in chat turns (a vision-language model)


def format_signatures(fields: Fields) -> dict[str, tuple[str, ...]]:
    """The columns that identify each format, in detection priority order."""
    return {
        "messages": (fields.messages,),
        "sharegpt": ("conversations",),
        "alpaca": (fields.instruction, fields.output),
        "prompt_completion": ("prompt", "completion"),
        "passthrough": ("input_ids",),
        "text": ("text",),
    }


def row_format(row: dict, fields: Fields) -> str | None:
    """The format a single row looks like, from its keys (None when it looks like none)."""
    for name, columns in format_signatures(fields).items():
        if all(row.get(column) is not None for column in columns):
            return name
    return None


def require(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise missing_field(row, name)
    return value


def from_messages(row: dict, fields: Fields, column: str | None = None) -> dict:
    column = column or fields.messages
    messages = parse_turns(require(row, column), column, fields.images)
    check_conversation(messages, column)
    return {"messages": messages, "tools": parse_tools(row.get("tools"))}


def from_sharegpt(row: dict, fields: Fields) -> dict:
    return from_messages(row, fields, column="conversations")


def from_alpaca(row: dict, fields: Fields) -> dict:
    instruction = require_text(require(row, fields.instruction), f"'{fields.instruction}'")
    output = require_text(require(row, fields.output), f"'{fields.output}'")
    extra = row.get(fields.input)
    extra = "" if extra is None else require_text(extra, f"'{fields.input}'", allow_empty=True)
    system = row.get("system")
    system = "" if system is None else require_text(system, "'system'", allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def from_prompt_completion(row: dict, fields: Fields) -> dict:
    prompt, completion = require(row, "prompt"), require(row, "completion")
    if isinstance(prompt, str):
        messages: list[Message] = [{"role": "user", "content": require_text(prompt, "'prompt'")}]
    else:
        messages = parse_turns(prompt, "prompt")
    if isinstance(completion, str):
        messages.append({"role": "assistant", "content": require_text(completion, "'completion'")})
    else:
        messages += parse_turns(completion, "completion")
    check_conversation(messages, "prompt+completion")
    return {"messages": messages, "tools": parse_tools(row.get("tools"))}


def from_text(row: dict, fields: Fields) -> dict:
    return {"text": require_text(require(row, "text"), "'text'")}


def token_ids(value: Any, field: str, *, allow_ignore: bool) -> list[int]:
    """A list of non-negative ints (and -100 where ``allow_ignore``)."""
    if not isinstance(value, list) or not value:
        raise RowProblem(f"'{field}' must be a non-empty list of token ids, got {type(value).__name__}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or (item < 0 and not (allow_ignore and item == -100)):
            valid = "a token id (int >= 0) or -100" if allow_ignore else "a token id (int >= 0)"
            raise RowProblem(f"{field}[{i}] = {item!r} is not {valid}")
    return value


def from_passthrough(row: dict, fields: Fields) -> dict:
    input_ids = token_ids(require(row, "input_ids"), "input_ids", allow_ignore=False)
    labels = row.get("labels")
    if labels is not None:
        labels = token_ids(labels, "labels", allow_ignore=True)
        if len(labels) != len(input_ids):
            raise RowProblem(f"'labels' has {len(labels)} items but 'input_ids' has {len(input_ids)}; they must match")
    return {"input_ids": list(input_ids), "labels": list(labels) if labels is not None else None}


CONVERTERS: dict[str, Callable[[dict, Fields], dict]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
    "passthrough": from_passthrough,
}


# The columns each converter reads besides those that identify its format (`format_signatures`).
def optional_columns(fields: Fields) -> dict[str, tuple[str, ...]]:
    return {"messages": ("tools",), "sharegpt": ("tools",), "alpaca": (fields.input, "system"),
            "prompt_completion": ("tools",), "text": (), "passthrough": ("labels",)}


# Row-level columns that carry training meaning where some format or OpenAI's puts them; in a row whose format
# does not read them they would be ignored silently, so they are refused with where they belong. Other columns
# (an id, a source, a prompt_id) are metadata and pass.
MISPLACED_COLUMNS = {
    "weight": "put 'weight' (0 or 1) on assistant messages, where OpenAI's format has it, or leave out the rows that "
              "should not be trained on",
    "images": "put each image in its message as a part {'type': 'image', 'image': PATH}",
    "system": "put the system prompt in the conversation, as its first message",
    "system_prompt": "put the system prompt in the conversation, as its first message",
    "tools": "function schemas are read with chat rows (messages, conversations, prompt/completion)",
}


def unread_column_problem(row: dict, fmt: str, fields: Fields) -> str | None:
    """A column the format would ignore although it means something: a misplaced one (`MISPLACED_COLUMNS`) or a
    misspelling of an optional column the format reads ("tool" for "tools"; a misspelled required column is
    reported as missing instead). A column whose value is None counts as absent (parquet rows hold every column)."""
    optional = optional_columns(fields)[fmt]
    read = format_signatures(fields)[fmt] + optional
    for key, value in row.items():
        if key in read or value is None:
            continue
        hint = MISPLACED_COLUMNS.get(key)
        misspelled = closest(key, optional, cutoff=0.85)
        if hint or misspelled:
            return f"a row-level '{key}' is not read: " + (hint or f"the {fmt} format reads '{misspelled}' (misspelled?)")
    return None


def convert_row(row: dict, fmt: str, fields: Fields) -> dict:
    """Validate one row of format ``fmt`` and return the Example fields; RowProblem if it is invalid."""
    problem = unread_column_problem(row, fmt, fields)
    if problem is not None:
        raise RowProblem(problem)
    try:
        return CONVERTERS[fmt](row, fields)
    except RowProblem as problem:
        looks_like = row_format(row, fields)
        if looks_like is not None and looks_like != fmt:
            raise RowProblem(f"{problem} (this row looks like {looks_like}: mixed formats?)") from None
        raise
