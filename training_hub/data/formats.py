"""One small converter per source format: a row (dict) -> the fields of an :class:`Example`.

Every converter validates what it reads and raises :class:`RowProblem` with a message that names the
field and what is valid; the loader adds where the row came from (file:line or row index).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from .schema import Message

# Turn roles accepted in `messages` and `conversations` lists (ShareGPT names map to ours).
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


class RowProblem(Exception):
    """A problem in one row; the message names the field and what is valid, not the row itself."""


@dataclass(frozen=True)
class Fields:
    """Column names of the chat and alpaca formats (renamable by the user)."""

    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


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


def closest(name: str, candidates) -> str | None:
    """The candidate closest to ``name`` (difflib), for "did you mean" hints."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return matches[0] if matches else None


def missing_field(row: dict, name: str, where: str = "") -> RowProblem:
    """A RowProblem for a missing field, suggesting a misspelled one present in the row."""
    found = [key for key in row if key != name]
    hint = closest(name, found)
    message = f"{where}: missing field '{name}'" if where else f"missing field '{name}'"
    if hint is not None:
        message += f" (found '{hint}': misspelled? rename it to '{name}')"
    elif found:
        message += f" (fields found: {', '.join(repr(k) for k in found[:8])})"
    return RowProblem(message)


def require(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise missing_field(row, name)
    return value


def require_text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    """Check that ``value`` is a string (non-blank unless ``allow_empty``) and return it."""
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(f"{where} is empty")
    return value


def parse_turn(turn: Any, where: str) -> Message:
    """One turn, {"role", "content"} or ShareGPT's {"from", "value"}, as a Message."""
    if not isinstance(turn, dict):
        raise RowProblem(f"{where} must be an object with 'role' and 'content', got {type(turn).__name__}")
    role_key, content_key = ("from", "value") if "from" in turn and "role" not in turn else ("role", "content")
    if turn.get(role_key) is None:
        raise missing_field(turn, role_key, where)
    role = turn[role_key]
    if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
        valid = ", ".join(ROLE_ALIASES)
        hint = closest(role, ROLE_ALIASES) if isinstance(role, str) else None
        suggestion = f" (did you mean '{hint}'?)" if hint else ""
        raise RowProblem(f"{where}.{role_key} {role!r} is not a valid role; use one of {valid}{suggestion}")
    if turn.get(content_key) is None:
        raise missing_field(turn, content_key, where)
    content = require_text(turn[content_key], f"{where}.{content_key}")
    return {"role": ROLE_ALIASES[role.strip().lower()], "content": content}


def parse_turns(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowProblem(f"'{field}' must be a list of turns, got {type(value).__name__}")
    if not value:
        raise RowProblem(f"'{field}' is an empty list")
    return [parse_turn(turn, f"{field}[{i}]") for i, turn in enumerate(value)]


def check_conversation(messages: list[Message], field: str) -> None:
    """Optional system turn first, then user/assistant alternating from user, ending on assistant.

    Consecutive turns of the same role are rejected (as torchtune does, and as templates such as
    Mistral's require): merge them into one turn.
    """
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise RowProblem(f"{field}[{i}] is a system turn; a system turn may only come first")
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        role = messages[i]["role"]
        if role == expected:
            continue
        if i > first and role == messages[i - 1]["role"]:
            raise RowProblem(f"{field}[{i - 1}] and {field}[{i}] are consecutive {role} turns; merge them into one")
        raise RowProblem(f"{field}[{i}] has role '{role}' where '{expected}' is expected "
                         "(after an optional system turn, turns alternate user, assistant, ...)")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem(f"'{field}' has no assistant turn, so nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise RowProblem(f"'{field}' ends on a user turn ({field}[{len(messages) - 1}]); it must end with an "
                         "assistant answer")


def from_messages(row: dict, fields: Fields, column: str | None = None) -> dict:
    column = column or fields.messages
    messages = parse_turns(require(row, column), column)
    check_conversation(messages, column)
    return {"messages": messages}


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
    return {"messages": messages}


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


def convert_row(row: dict, fmt: str, fields: Fields) -> dict:
    """Validate one row of format ``fmt`` and return the Example fields; RowProblem if it is invalid."""
    try:
        return CONVERTERS[fmt](row, fields)
    except RowProblem as problem:
        looks_like = row_format(row, fields)
        if looks_like is not None and looks_like != fmt:
            raise RowProblem(f"{problem} (this row looks like {looks_like}: mixed formats?)") from None
        raise
