"""Chat turns as people write them (OpenAI shape, ShareGPT names, agent traces) -> validated Messages.

A turn is ``{"role", "content"}`` (or ShareGPT's ``{"from", "value"}``) plus, where given: ``tool_calls``
and ``reasoning_content`` (assistant), ``tool_call_id`` (tool), ``name``, ``weight`` (0 or 1). ``content``
may be a list of text parts (joined), and for a vision-language model image parts in user turns
(``data/images.py``; the content is then kept as a list). A key whose value is None counts as absent
(Arrow-backed sources give every turn every key); any other key is refused, since it would be ignored.
Every check raises :class:`RowProblem` naming the field and the fix; the loader adds the row's place.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from .schema import Message, ToolCall

# Turn roles accepted in `messages` and `conversations` lists (ShareGPT names map to ours).
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "human": "user",
                "gpt": "assistant"}
# Keys a turn may carry besides its role and content.
TURN_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content", "weight")
# Content part types that hold text (OpenAI chat and Responses names).
TEXT_PARTS = ("text", "input_text", "output_text")
TOOL_EXAMPLE = '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}'


class RowProblem(Exception):
    """A problem in one row; the message names the field and what is valid, not the row itself."""


def closest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``name`` (difflib), for "did you mean" hints."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
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


def require_text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    """Check that ``value`` is a string (non-blank unless ``allow_empty``) and return it."""
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(f"{where} is empty")
    return value


def parse_turns(value: Any, field: str, images: bool = False) -> list[Message]:
    """The turns of a conversation; ``images``: image parts are accepted (a vision-language model) and checked."""
    if not isinstance(value, list):
        raise RowProblem(f"'{field}' must be a list of turns, got {type(value).__name__}")
    if not value:
        raise RowProblem(f"'{field}' is an empty list")
    return [parse_turn(turn, f"{field}[{i}]", images) for i, turn in enumerate(value)]


def parse_turn(turn: Any, where: str, images: bool = False) -> Message:
    """One turn as a Message (see the module docstring for what a turn may hold)."""
    if not isinstance(turn, dict):
        raise RowProblem(f"{where} must be an object with 'role' and 'content', got {type(turn).__name__}")
    sharegpt = turn.get("from") is not None and turn.get("role") is None
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role = parse_role(turn, role_key, where)
    message: Message = {"role": role, "content": ""}
    calls = turn.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise RowProblem(f"{where}.tool_calls is on a {role} turn; only assistant turns make tool calls")
        parsed = parse_tool_calls(calls, f"{where}.tool_calls")
        if parsed:
            message["tool_calls"] = parsed
    content = turn.get(content_key)
    if content is None and not message.get("tool_calls"):
        raise missing_field(turn, content_key, where)
    if content is not None:
        allow_empty = role == "tool" or bool(message.get("tool_calls"))
        message["content"] = parse_content(content, f"{where}.{content_key}", allow_empty, images, role)
    unknown = [k for k, v in turn.items() if v is not None and k not in (role_key, content_key, *TURN_KEYS)]
    if unknown:
        raise unknown_key(unknown[0], where, role_key, content_key)
    add_optional_fields(message, turn, where)
    return message


def parse_role(turn: dict, role_key: str, where: str) -> str:
    role = turn.get(role_key)
    if role is None:
        raise missing_field(turn, role_key, where)
    if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
        hint = closest(role, ROLE_ALIASES) if isinstance(role, str) else None
        suggestion = f" (did you mean '{hint}'?)" if hint else ""
        raise RowProblem(f"{where}.{role_key} {role!r} is not a valid role; use one of {', '.join(ROLE_ALIASES)}"
                         + suggestion)
    return ROLE_ALIASES[role.strip().lower()]


def unknown_key(key: str, where: str, role_key: str, content_key: str) -> RowProblem:
    accepted = (role_key, content_key, *TURN_KEYS)
    hint = closest(key, accepted)
    if key in ("thinking", "reasoning"):
        hint = "reasoning_content"
    elif key == "function_call":
        hint = "tool_calls"
    return RowProblem(f"{where} has a field '{key}' that training_hub does not read (it would be ignored); "
                      + (f"rename it to '{hint}'" if hint else "remove it")
                      + f" (a turn may hold {', '.join(accepted)})")


def add_optional_fields(message: Message, turn: dict, where: str) -> None:
    """name, tool_call_id, reasoning_content and weight, checked against the role."""
    role = message["role"]
    if turn.get("name") is not None:
        message["name"] = require_text(turn["name"], f"{where}.name")
    if turn.get("tool_call_id") is not None:
        if role != "tool":
            raise RowProblem(f"{where}.tool_call_id is on a {role} turn; it belongs on the tool turn answering a call")
        message["tool_call_id"] = require_text(turn["tool_call_id"], f"{where}.tool_call_id")
    reasoning = turn.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant":
            raise RowProblem(f"{where}.reasoning_content is on a {role} turn; only assistant turns reason")
        if require_text(reasoning, f"{where}.reasoning_content", allow_empty=True).strip():
            message["reasoning_content"] = reasoning
    weight = turn.get("weight")
    if weight is not None:
        if isinstance(weight, str) or weight not in (0, 1):
            raise RowProblem(f"{where}.weight is {weight!r}; use 0 (context only, not trained on) or 1 (trained on)")
        if weight == 1 and role != "assistant":
            raise RowProblem(f"{where}.weight is 1 on a {role} turn; only assistant turns are trained on (pass "
                             "train_on_inputs=True to train on every token)")
        if weight == 0:  # on other turns it only matters with train_on_inputs=True (refused there: masking.py)
            message["weight"] = 0


def parse_content(value: Any, where: str, allow_empty: bool, images: bool = False,
                  role: str = "user") -> str | list[dict]:
    """A string, or a list of text parts joined in order. With ``images`` (a vision-language model) image parts
    of user turns are checked and kept: the content is then a list of text and image parts."""
    if isinstance(value, list):
        parts = [content_part(part, f"{where}[{j}]", images, role) for j, part in enumerate(value)]
        if any(part["type"] == "image" for part in parts):
            return parts
        value = "".join(part["text"] for part in parts)
    return require_text(value, where, allow_empty=allow_empty)


def content_part(part: Any, where: str, images: bool, role: str) -> dict:
    """One part of a content list, as ``{"type": "text", "text"}`` or (with ``images``, in a user turn) a checked
    image part."""
    from .images import IMAGE_PARTS, parse_image_part

    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        return {"type": "text", "text": require_text(part.get("text"), f"{where}.text", allow_empty=True)}
    if kind in IMAGE_PARTS and images:
        if role != "user":
            raise RowProblem(f"{where} is an image in a {role} turn; images are read in user turns only (an answer "
                             "is text the model learns to write); move the image to the user turn before it")
        return parse_image_part(part, where)
    if kind is not None:
        raise RowProblem(f"{where} is a {kind!r} part: images, audio and files are not supported in text "
                         "fine-tuning; remove the part (keep the text parts) or drop the row")
    raise RowProblem(f"{where} must be a part like {{\"type\": \"text\", \"text\": \"...\"}}, got {part!r:.60}")


def parse_tool_calls(value: Any, where: str) -> list[ToolCall]:
    """OpenAI-shaped calls (``{"type": "function", "function": {"name", "arguments"}}``, or the flat
    ``{"name", "arguments"}``) with the arguments parsed to an object."""
    if not isinstance(value, list):
        raise RowProblem(f"{where} must be a list of calls, got {type(value).__name__}")
    calls: list[ToolCall] = []
    for j, call in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RowProblem(f"{here} must be an object like {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             f"\"arguments\": ...}}}}, got {type(call).__name__}")
        if call.get("type") not in (None, "function"):
            raise RowProblem(f"{here}.type is {call['type']!r}; only 'function' calls are supported")
        function, at = (call["function"], f"{here}.function") if call.get("function") is not None else (call, here)
        if not isinstance(function, dict):
            raise RowProblem(f"{at} must be an object with 'name' and 'arguments', got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(f"{at}.name is missing or empty: every tool call needs the name of the function it calls")
        parsed: ToolCall = {"type": "function",
                            "function": {"name": name, "arguments": parse_arguments(function.get("arguments"),
                                                                                   f"{at}.arguments")}}
        if call.get("id") is not None:
            parsed["id"] = require_text(call["id"], f"{here}.id")
        calls.append(parsed)
    return calls


def parse_arguments(value: Any, where: str) -> dict:
    """Call arguments as an object: given as one, as a JSON string holding one, or absent (no arguments)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise RowProblem(f"{where} is not valid JSON ({error.msg} at column {error.colno}); write the arguments "
                             "as a JSON object, e.g. {\"city\": \"Paris\"}, or a string holding one") from None
    if not isinstance(value, dict):
        raise RowProblem(f"{where} must be a JSON object (name -> value), got {type(value).__name__}")
    return value


def parse_tools(value: Any, field: str = "tools") -> list[dict] | None:
    """The row's function schemas (a list, or a JSON string holding one); each must name its function."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RowProblem(f"'{field}' is not valid JSON ({error.msg} at column {error.colno}); write a list of "
                             f"function schemas like [{TOOL_EXAMPLE}]") from None
    if not isinstance(value, list):
        raise RowProblem(f"'{field}' must be a list of function schemas like [{TOOL_EXAMPLE}], got "
                         f"{type(value).__name__}")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(f"{field}[{i}] has no function name; write each tool as {TOOL_EXAMPLE}")
    return value or None


def check_conversation(messages: list[Message], field: str) -> None:
    """An optional system turn first, then user; an answer after each user turn; tool turns only after an
    assistant turn with tool calls (or another tool turn); the last turn an assistant answer; and at least one
    assistant turn trained on.

    Consecutive user or assistant turns are rejected (as torchtune does, and as templates such as Mistral's
    require): merge them into one turn.
    """
    first = 1 if messages[0]["role"] == "system" else 0
    caller: Message | None = None  # the assistant turn whose calls the following tool turns answer
    for i in range(first, len(messages)):
        role = messages[i]["role"]
        previous = messages[i - 1]["role"] if i > first else None
        if role == "system":
            raise RowProblem(f"{field}[{i}] is a system turn; a system turn may only come first")
        if role == "tool":
            caller = check_tool_turn(messages, i, caller, field)
            continue
        if role == previous:
            raise RowProblem(f"{field}[{i - 1}] and {field}[{i}] are consecutive {role} turns; merge them into one")
        if previous is None and role != "user":
            raise RowProblem(f"{field}[{i}] has role '{role}' where 'user' is expected "
                             "(after an optional system turn, turns alternate user, assistant, ...)")
        caller = messages[i] if role == "assistant" and messages[i].get("tool_calls") else None
    check_answers(messages, field)


def check_tool_turn(messages: list[Message], i: int, caller: Message | None, field: str) -> Message:
    """A tool turn answers a call of the assistant turn before it (directly or after other tool turns)."""
    if caller is None:
        raise RowProblem(f"{field}[{i}] is a tool turn with no preceding call: a tool turn must follow an assistant "
                         "turn with 'tool_calls' (or another tool turn); add the call or remove the result")
    call_id = messages[i].get("tool_call_id")
    ids = [call["id"] for call in caller.get("tool_calls", []) if "id" in call]
    if call_id is not None and ids and call_id not in ids:
        raise RowProblem(f"{field}[{i}].tool_call_id {call_id!r} matches no call of the assistant turn before it "
                         f"(ids {', '.join(map(repr, ids))})")
    return caller


def check_answers(messages: list[Message], field: str) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise RowProblem(f"'{field}' has no assistant turn, so nothing to train on")
    last = messages[-1]["role"]
    if last != "assistant":
        raise RowProblem(f"'{field}' ends on a {last} turn ({field}[{len(messages) - 1}]); it must end with an "
                         "assistant answer")
    if all(m.get("weight") == 0 for m in answers):
        raise RowProblem(f"every assistant turn of '{field}' has weight 0, so nothing to train on; set weight 1 (or "
                         "leave it out) on the turns to learn, or drop the row")
