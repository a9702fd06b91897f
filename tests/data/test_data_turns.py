"""Turns as people write them: OpenAI shape, content parts, tool calls and results, weights, reasoning;
every malformed case is one error naming file:line, the field and the fix."""

from __future__ import annotations

import copy
import json

import pytest

from tool_templates import TOOL_CHAT, WEATHER_TOOL, call
from training_hub.data import DataError, load_examples

USER, ANSWER = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
CALLING = {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city": "Paris"}', "c1")]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "21 C"}


def load_error(write_rows, row) -> str:
    with pytest.raises(DataError) as info:
        load_examples(write_rows([TOOL_CHAT, row]))
    message = str(info.value)
    assert message.startswith("1 of 2 rows in") and "train.jsonl:2: " in message, message
    return message


def test_openai_tool_file_is_detected_as_messages_and_kept_whole(write_rows):
    loaded = load_examples(write_rows([TOOL_CHAT] * 2))
    assert loaded.format == "messages"
    example = loaded.examples[0]
    assert example.tools == [WEATHER_TOOL]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "tool", "assistant",
                                                     "user", "assistant"]
    assert example.messages[2]["reasoning_content"] == "Two cities, so two calls." and example.messages[2]["content"] == ""
    assert example.messages[3] == {"role": "tool", "content": "21 C", "tool_call_id": "c1"}


def test_content_parts_are_joined_and_tools_may_be_a_json_string(write_rows):
    parts = {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]}
    row = {"tools": json.dumps([WEATHER_TOOL]), "messages": [parts, ANSWER]}
    example = load_examples(write_rows([row])).examples[0]
    assert example.messages[0] == {"role": "user", "content": "Hello, there"} and example.tools == [WEATHER_TOOL]


def test_arrow_sources_with_none_for_absent_keys():
    import datasets

    row = {"messages": [USER, CALLING, RESULT, ANSWER]}
    loaded = load_examples(datasets.Dataset.from_list([row, {"messages": [USER, ANSWER]}]))
    assert loaded.examples[1].messages == [USER, ANSWER]  # every other key came back as None
    assert loaded.examples[0].messages[1]["tool_calls"] == [call("get_weather", {"city": "Paris"}, "c1")]


def test_ends_on_a_tool_call_and_shares_gpt_names(write_rows):
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "", "tool_calls": [call("get_weather", {})]}]}
    example = load_examples(write_rows([sharegpt])).examples[0]
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {}}


def chat(*turns, **row):
    return {"messages": [copy.deepcopy(t) for t in turns], **row}


def bad_call(**function):
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (chat(USER, RESULT, ANSWER), "messages[1] is a tool turn with no preceding call: a tool turn must follow an "
                                     "assistant turn with 'tool_calls'"),
        (chat(USER, ANSWER, RESULT, ANSWER), "messages[2] is a tool turn with no preceding call"),
        (chat(USER, bad_call(arguments="{}"), RESULT, ANSWER),
         "messages[1].tool_calls[0].function.name is missing or empty: every tool call needs the name"),
        (chat(USER, bad_call(name="get_weather", arguments="{city: Paris}"), RESULT, ANSWER),
         "messages[1].tool_calls[0].function.arguments is not valid JSON (Expecting property name enclosed in double "
         "quotes at column 2); write the arguments as a JSON object"),
        (chat(USER, bad_call(name="get_weather", arguments="[1]"), RESULT, ANSWER),
         "messages[1].tool_calls[0].function.arguments must be a JSON object (name -> value), got list"),
        (chat(USER, CALLING, dict(RESULT, tool_call_id="c9"), ANSWER),
         "messages[2].tool_call_id 'c9' matches no call of the assistant turn before it (ids 'c1')"),
        (chat(USER, ANSWER, tools=[{"type": "function", "function": {"description": "x"}}]),
         "tools[0] has no function name; write each tool as {\"type\": \"function\", \"function\": {\"name\""),
        (chat(USER, ANSWER, tools="[{"), "'tools' is not valid JSON"),
        (chat(USER, dict(ANSWER, weight=0.5)), "messages[1].weight is 0.5; use 0 (context only, not trained on) or 1"),
        (chat(USER, dict(ANSWER, weight="0")), "messages[1].weight is '0'; use 0"),
        (chat(dict(USER, weight=1), ANSWER), "messages[0].weight is 1 on a user turn; only assistant turns are trained"),
        (chat(USER, dict(ANSWER, weight=0), USER, dict(ANSWER, weight=0)),
         "every assistant turn of 'messages' has weight 0, so nothing to train on"),
        (chat(dict(USER, content=[{"type": "image_url", "image_url": {"url": "x.png"}}]), ANSWER),
         "messages[0].content[0] is a 'image_url' part: images, audio and files are not supported in text fine-tuning"),
        (chat(dict(USER, content=["Hi"]), ANSWER), "messages[0].content[0] must be a part like {\"type\": \"text\""),
        (chat(USER, dict(ANSWER, thinking="hmm")), "messages[1] has a field 'thinking' that training_hub does not read "
                                                   "(it would be ignored); rename it to 'reasoning_content'"),
        (chat(USER, dict(ANSWER, training=False)), "messages[1] has a field 'training' that training_hub does not read"),
        (chat(USER, {"role": "assistant", "content": None}), "messages[1]: missing field 'content'"),
        (chat(USER, CALLING, {"role": "tool", "tool_call_id": "c1"}, ANSWER), "messages[2]: missing field 'content'"),
        (chat(USER, {"role": "assistant", "content": None, "tool_calls": []}), "messages[1]: missing field 'content'"),
        (chat(USER, CALLING, RESULT), "'messages' ends on a tool turn (messages[2]); it must end with an assistant"),
        (chat(dict(USER, reasoning_content="x"), ANSWER), "messages[0].reasoning_content is on a user turn"),
        (chat(USER, {"role": "assistant", "content": "", "tool_calls": [call("f", {}) | {"type": "code"}]}),
         "messages[1].tool_calls[0].type is 'code'; only 'function' calls are supported"),
    ],
)
def test_malformed_turns_fail_naming_line_field_and_fix(write_rows, row, expected):
    assert expected in load_error(write_rows, row)
