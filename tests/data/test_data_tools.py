"""Tool calls, tool results, weight-0 turns and reasoning: exact supervised ids on tool-calling templates,
checked against transformers' own assistant masks ({% generation %}) as an independent oracle."""

from __future__ import annotations

import copy

import pytest

from tool_templates import HERMES_TEMPLATE, LLAMA31_TEMPLATE, QWEN3_TEMPLATE, TOOL_CHAT, WEATHER_TOOL, call
from training_hub.data import DataError, format_example, load_examples, tokenize_examples
from training_hub.tiny import CHATML_TEMPLATE, build_tokenizer

PARIS = '{"name": "get_weather", "%s": {"city": "Paris"}}'
ROME = '{"name": "get_weather", "%s": {"city": "Rome"}}'
THINK = "<think>\nTwo cities, so two calls.\n</think>\n\n"
# What each template makes the assistant produce in TOOL_CHAT (the weight-0 answer is not among them).
EXPECTED = {
    "hermes": [THINK + "\n<tool_call>\n" + PARIS % "arguments" + "\n</tool_call>\n<tool_call>\n" + ROME % "arguments"
               + "\n</tool_call><|im_end|>", "Paris 21 C, Rome 25 C.<|im_end|>"],
    "llama31": [THINK + PARIS % "parameters" + "\n" + ROME % "parameters" + "<|eot_id|>",
                "Paris 21 C, Rome 25 C.<|eot_id|>"],
}
TEMPLATES = {"hermes": ("chatml", HERMES_TEMPLATE), "llama31": ("llama3", LLAMA31_TEMPLATE),
             "qwen3": ("chatml", QWEN3_TEMPLATE), "chatml": ("chatml", CHATML_TEMPLATE)}


@pytest.fixture(scope="module")
def tool_tokenizer():
    """Return a function template name -> a tokenizer with that chat template (built once per name)."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            base, template = TEMPLATES[name]
            cache[name] = build_tokenizer(template=base, corpus=["Paris Rome weather city cities calls"])
            cache[name].chat_template = template
        return cache[name]

    return make


def tokenize(tokenizer, rows, **kwargs):
    kwargs.setdefault("max_seq_len", 2048)
    return tokenize_examples(load_examples(rows), tokenizer, cache_dir="none", **kwargs)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised_runs(row):
    """Contiguous runs of supervised positions, as lists of token ids."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == -100:
            runs, current = (runs + [current] if current else runs), []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def oracle_mask(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """transformers' ids and assistant mask from the template's {% generation %} blocks, for the row as loaded."""
    example = load_examples([row]).examples[0]
    out = tokenizer.apply_chat_template(example.messages, tools=example.tools, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def without_weights(row: dict) -> dict:
    row = copy.deepcopy(row)
    for message in row["messages"]:
        message.pop("weight", None)
    return row


@pytest.mark.parametrize("template", ["hermes", "llama31"])
def test_tool_calling_chat_trains_exactly_on_calls_reasoning_and_answers(tool_tokenizer, template):
    tokenizer = tool_tokenizer(template)
    row = tokenize(tokenizer, [TOOL_CHAT])[0]
    assert supervised_runs(row) == [ids(tokenizer, text) for text in EXPECTED[template]]
    oracle_ids, _ = oracle_mask(tokenizer, TOOL_CHAT)
    assert row["input_ids"] == oracle_ids
    assert tokenizer.decode(row["input_ids"]).count("Paris 25 C, Rome 21 C.") == 1  # the weight-0 answer is context


@pytest.mark.parametrize("template", ["hermes", "llama31"])
def test_masks_equal_transformers_generation_masks(tool_tokenizer, template):
    tokenizer = tool_tokenizer(template)
    row = without_weights(TOOL_CHAT)
    ours = tokenize(tokenizer, [row])[0]
    oracle_ids, oracle = oracle_mask(tokenizer, row)
    assert ours["input_ids"] == oracle_ids and sum(oracle) > 0
    assert [int(label != -100) for label in ours["labels"]] == oracle


def test_weight_zero_answer_is_left_out_even_with_train_on_inputs(tool_tokenizer):
    tokenizer = tool_tokenizer("hermes")
    row = tokenize(tokenizer, [TOOL_CHAT], train_on_inputs=True)[0]
    untrained = [t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
    assert untrained == ids(tokenizer, "Paris 25 C, Rome 21 C.<|im_end|>")


def test_train_on_reasoning_false_leaves_only_the_reasoning_text_out(tool_tokenizer):
    tokenizer = tool_tokenizer("hermes")
    row = tokenize(tokenizer, [TOOL_CHAT], train_on_reasoning=False)[0]
    first, *rest = EXPECTED["hermes"]
    after = first[len(THINK) - len("\n</think>\n\n"):]
    assert supervised_runs(row) == [ids(tokenizer, "<think>\n"), ids(tokenizer, after)] + [ids(tokenizer, t) for t in rest]


def test_preview_shows_calls_trained_and_the_weight_zero_turn_as_context(tool_tokenizer):
    tokenizer = tool_tokenizer("hermes")
    row = tokenize(tokenizer, [TOOL_CHAT])[0]
    shown = format_example(row["input_ids"], row["labels"], tokenizer)
    assert shown.count("[[") == 2
    assert "[[<think>\nTwo cities" in shown and '"city": "Rome"}}\n</tool_call><|im_end|>]]' in shown
    assert "<|im_start|>assistant\nParis 25 C, Rome 21 C.<|im_end|>\n" in shown  # rendered, not trained


def test_qwen3_style_template_masks_the_answers_as_rendered_in_the_whole_conversation(tool_tokenizer):
    tokenizer = tool_tokenizer("qwen3")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Because.", "reasoning_content": "Think first."}]}
    ours = tokenize(tokenizer, [row])[0]
    oracle_ids, oracle = oracle_mask(tokenizer, row)
    assert ours["input_ids"] == oracle_ids
    assert [int(label != -100) for label in ours["labels"]] == oracle
    assert supervised_runs(ours) == [ids(tokenizer, "Hello!<|im_end|>"),
                                     ids(tokenizer, "<think>\nThink first.\n</think>\n\nBecause.<|im_end|>")]


def test_qwen3_style_template_dropping_earlier_reasoning_is_refused(tool_tokenizer):
    tokenizer = tool_tokenizer("qwen3")
    row = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
                        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]}
    with pytest.raises(DataError, match=r"row 0: messages\[1\] has reasoning_content that the chat template drops "
                                        r"once a later user turn follows \(Qwen3-style"):
        tokenize(tokenizer, [row])


def test_template_without_tool_support_is_refused_not_ignored(tool_tokenizer):
    tokenizer = tool_tokenizer("chatml")
    with pytest.raises(DataError, match=r"row 0: messages\[2\] calls 'get_weather', but the chat template does not "
                                        "render the call"):
        tokenize(tokenizer, [TOOL_CHAT])
    plain = {"tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello!"}]}
    with pytest.raises(DataError, match="row 0: the row's tools include 'get_weather', but the chat template does "
                                        "not render tools="):
        tokenize(tokenizer, [plain])


def test_template_without_reasoning_support_is_refused(tool_tokenizer):
    row = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."}]}
    with pytest.raises(DataError, match=r"row 0: messages\[1\] has reasoning_content, but the chat template does not "
                                        "render it"):
        tokenize(tool_tokenizer("chatml"), [row])


def test_generation_prompt_that_is_not_a_prefix_is_refused(tool_tokenizer):
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                                                     "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
                                                     "{%- endif %}")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]}
    with pytest.raises(DataError, match=r"row 0: The chat template cannot be used for loss masking: the first 1 "
                                        "messages with add_generation_prompt=True"):
        tokenize(tokenizer, [row])


def test_single_call_templates_fail_on_parallel_calls_naming_the_row(tool_tokenizer):
    tokenizer = build_tokenizer("llama3")
    tokenizer.chat_template = LLAMA31_TEMPLATE.replace(
        "{%- if message.tool_calls %}",
        "{%- if message.tool_calls and message.tool_calls | length > 1 %}"
        "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
        "{%- if message.tool_calls %}")
    with pytest.raises(DataError, match="row 0: the chat template failed on this conversation: This model only "
                                        "supports single tool-calls at once!"):
        tokenize(tokenizer, [TOOL_CHAT])


def test_tokenized_data_behaves_as_the_dataset(tool_tokenizer):
    tokenizer = tool_tokenizer("hermes")
    rows = [TOOL_CHAT, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}]
    data = tokenize(tokenizer, rows)
    assert len(data) == 2 and data[0] == data.dataset[0] and data.summary.rows_out == 2
    assert data["input_ids"] == [row["input_ids"] for row in data] == data.dataset["input_ids"]
    assert data[0:1]["labels"] == [data[0]["labels"]] and data.column_names == ["input_ids", "labels"]
    assert data.to_list() == data.dataset.to_list()
    with pytest.raises(AttributeError):
        data._no_such_thing


def test_tool_call_arguments_reach_the_template_as_objects():
    messages = load_examples([TOOL_CHAT]).examples[0].messages
    assert messages[2]["tool_calls"] == [call("get_weather", {"city": "Paris"}, "c1"),
                                         call("get_weather", {"city": "Rome"}, "c2")]
    assert messages[5]["weight"] == 0 and "weight" not in messages[7]
