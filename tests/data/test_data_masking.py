"""Exact supervised token ids for several chat templates (assistant-only loss)."""

from __future__ import annotations

import pytest

from training_hub.data import DataError, format_example, load_examples, tokenize_examples
from training_hub.tiny import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Greet Alice."},
    {"role": "assistant", "content": "Hello, Alice!"},
    {"role": "user", "content": "And Bob?"},
    {"role": "assistant", "content": "Hello, Bob!"},
]
END_OF_TURN = {"chatml": "<|im_end|>", "chatml_default_system": "<|im_end|>", "llama3": "<|eot_id|>"}


def tokenize(tokenizer, messages=CHAT, **kwargs):
    loaded = load_examples([{"messages": messages}])
    kwargs.setdefault("max_seq_len", 512)
    return tokenize_examples(loaded, tokenizer, cache_dir="none", **kwargs)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised_runs(input_ids, labels):
    """Contiguous runs of supervised positions, as lists of token ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["chatml", "chatml_default_system", "llama3"])
def test_both_answers_and_their_end_of_turn_are_the_only_supervised_tokens(tokenizer_factory, template):
    tokenizer = tokenizer_factory(template)
    row = tokenize(tokenizer).dataset[0]
    eot = END_OF_TURN[template]
    expected = [ids(tokenizer, "Hello, Alice!" + eot), ids(tokenizer, "Hello, Bob!" + eot)]
    assert supervised_runs(row["input_ids"], row["labels"]) == expected
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert row["input_ids"] == ids(tokenizer, full)


def test_llama3_has_exactly_one_bos(tokenizer_factory):
    tokenizer = tokenizer_factory("llama3")
    row = tokenize(tokenizer).dataset[0]
    assert row["input_ids"][0] == tokenizer.bos_token_id
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert row["labels"][0] == -100


def test_default_system_prompt_is_rendered_but_not_supervised(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml_default_system")
    row = tokenize(tokenizer, messages=CHAT[1:]).dataset[0]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    expected = [ids(tokenizer, "Hello, Alice!<|im_end|>"), ids(tokenizer, "Hello, Bob!<|im_end|>")]
    assert supervised_runs(row["input_ids"], row["labels"]) == expected


def test_newline_after_end_of_turn_is_not_supervised(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    row = tokenize(tokenizer).dataset[0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    positions = [i for i, token in enumerate(row["input_ids"]) if token == end]
    assert [row["labels"][i] for i in positions] == [-100, -100, end, -100, end]
    assert all(row["labels"][i + 1] == -100 for i in positions[:-1])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_train_on_inputs_supervises_every_token(tokenizer_factory, template):
    row = tokenize(tokenizer_factory(template), train_on_inputs=True).dataset[0]
    assert row["labels"] == row["input_ids"]


def test_weight_zero_on_a_user_turn_is_refused_where_train_on_inputs_would_train_it(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    chat = [{"role": "user", "content": "Greet Alice.", "weight": 0}, {"role": "assistant", "content": "Hello, Alice!"}]
    plain = tokenize(tokenizer, chat).dataset[0]  # not trained anyway: nothing to refuse
    assert tokenizer.decode([t for t, label in zip(plain["input_ids"], plain["labels"]) if label != -100]) == (
        "Hello, Alice!<|im_end|>")
    with pytest.raises(DataError, match=r"row 0: messages\[0\].weight is 0 on a user turn, but train_on_inputs=True"):
        tokenize(tokenizer, chat, train_on_inputs=True)


def test_fallback_template_without_chat_template(tokenizer_factory):
    tokenizer = tokenizer_factory(None)
    result = tokenize(tokenizer)
    row = result.dataset[0]
    assert "fallback template" in result.summary.template_note
    expected = [ids(tokenizer, "Hello, Alice!<|im_end|>"), ids(tokenizer, "Hello, Bob!<|im_end|>")]
    assert supervised_runs(row["input_ids"], row["labels"]) == expected
    assert tokenizer.decode(row["input_ids"]).startswith("### System:\nBe brief.\n\n### User:\nGreet Alice.")


def test_no_template_and_no_eos_is_an_error():
    tokenizer = build_tokenizer(template=None)  # a fresh one: the shared fixture must not change
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="no chat template and no eos_token"):
        tokenize(tokenizer)


def test_non_incremental_template_fails_clearly():
    tokenizer = build_tokenizer(template="chatml")  # a fresh one: the shared fixture must not change
    # A template that drops the content of earlier assistant turns (like reasoning templates do).
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.chat_template = template
    with pytest.raises(DataError, match=r"row 0: messages\[2\] is an answer whose text the chat template does not render"):
        tokenize(tokenizer)


def test_format_example_marks_supervised_text(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    row = tokenize(tokenizer).dataset[0]
    preview = format_example(row["input_ids"], row["labels"], tokenizer)
    assert "[[Hello, Alice!<|im_end|>]]\n<|im_start|>user" in preview
    assert preview.count("[[") == 2 and "\x1b" not in preview


@pytest.mark.parametrize(("template", "renders_bos"), [("chatml", False), ("llama3", True)])
def test_bos_added_by_the_tokenizer_appears_exactly_once(template, renders_bos):
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tokenizer(template=template)
    tokenizer.bos_token = "<|begin_of_text|>"
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    assert tokenizer("Hi")["input_ids"][0] == bos  # this tokenizer adds BOS itself
    row = tokenize(tokenizer).dataset[0]
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1 and row["labels"][0] == -100
    eot = END_OF_TURN[template]
    expected = [ids(tokenizer, "Hello, Alice!" + eot), ids(tokenizer, "Hello, Bob!" + eot)]
    assert supervised_runs(row["input_ids"], row["labels"]) == expected
