"""load_examples: sources, format detection and validation errors that name where and what."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from training_hub.data import DataError, load_examples

USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be kind."}, USER, ASSISTANT]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    "alpaca": {"instruction": "Add.", "input": "1 + 2", "output": "3"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello!"},
    "text": {"text": "Once upon a time."},
    "passthrough": {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected_from_jsonl(write_rows, fmt):
    loaded = load_examples(write_rows([ROWS[fmt]] * 3))
    assert loaded.format == fmt
    assert len(loaded.examples) == 3
    assert loaded.examples[1].origin == "train.jsonl:2"
    assert len(loaded.fingerprint) == 64


def test_conversions_to_messages():
    alpaca = load_examples([dict(ROWS["alpaca"], system="Be exact.")]).examples[0].messages
    assert alpaca == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add.\n\n1 + 2"},
                      {"role": "assistant", "content": "3"}]
    no_input = load_examples([{"instruction": "Say 3.", "input": "", "output": "3"}]).examples[0].messages
    assert no_input[0] == {"role": "user", "content": "Say 3."}
    assert load_examples([ROWS["sharegpt"]]).examples[0].messages == [USER, ASSISTANT]
    assert load_examples([ROWS["prompt_completion"]]).examples[0].messages == [USER, ASSISTANT]
    listed = load_examples([{"prompt": [USER], "completion": [ASSISTANT]}]).examples[0].messages
    assert listed == [USER, ASSISTANT]
    passthrough = load_examples([{"input_ids": [1, 2]}]).examples[0]
    assert passthrough.input_ids == [1, 2] and passthrough.labels is None


def test_renamed_alpaca_columns_and_synonym():
    rows = [{"question": "Q?", "answer": "A."}]
    loaded = load_examples(rows, field_instruction="question", field_output="answer")
    assert loaded.format == "alpaca"
    chat = load_examples([{"chat": ROWS["messages"]["messages"]}], dataset_type="chat_template",
                         field_messages="chat")
    assert chat.format == "messages"


@pytest.mark.parametrize("name", ["train.json", "train.csv", "train.parquet"])
def test_other_file_types(write_rows, name):
    rows = [ROWS["alpaca"], ROWS["alpaca"]]
    loaded = load_examples(write_rows(rows, name))
    assert loaded.format == "alpaca" and len(loaded.examples) == 2
    assert loaded.examples[1].origin == f"{name} row 1"


def test_csv_and_parquet_messages(write_rows):
    csv_path = write_rows([{"messages": json.dumps(ROWS["messages"]["messages"])}], "chat.csv")
    assert load_examples(csv_path).examples[0].messages == ROWS["messages"]["messages"]
    parquet_path = write_rows([ROWS["messages"]], "chat.parquet")
    assert load_examples(parquet_path).examples[0].messages == ROWS["messages"]["messages"]


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 1, "rows": [ROWS["text"]]}))
    assert load_examples(path).format == "text"
    path.write_text(json.dumps({"a": [ROWS["text"]], "b": [ROWS["text"]]}))
    with pytest.raises(DataError, match="exactly one list"):
        load_examples(path)


def test_folder_of_files_in_order(write_rows, tmp_path):
    write_rows([{"text": "second"}], "folder/b.jsonl")
    write_rows([{"text": "first"}], "folder/a.jsonl")
    loaded = load_examples(tmp_path / "folder")
    assert [e.text for e in loaded.examples] == ["first", "second"]
    assert loaded.examples[1].origin == "folder/b.jsonl:1"
    write_rows([{"text": "x"}], "folder/c.csv")
    with pytest.raises(DataError, match="mixes file types"):
        load_examples(tmp_path / "folder")


def test_datasets_dataset_source():
    import datasets

    loaded = load_examples(datasets.Dataset.from_list([ROWS["messages"]] * 2))
    assert loaded.format == "messages" and loaded.examples[1].origin == "row 1"


def test_fingerprint_depends_on_content_only():
    a = load_examples([ROWS["text"]])
    b = load_examples([{"text": "Once upon a time."}])
    c = load_examples([{"text": "Once upon a time!"}])
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_loading_imports_nothing_heavy(write_rows):
    path = write_rows([ROWS["messages"]])
    code = ("import sys; from training_hub.data import load_examples; "
            f"load_examples({str(path)!r}); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'pyarrow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- errors ---------------------------------------------------------------------------------------------


def load_error(rows_or_path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_examples(rows_or_path, **kwargs)
    return str(info.value)


def chat(*turns):
    return {"messages": list(turns)}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (chat(USER), "no assistant turn"),
        (chat({"role": "system", "content": "S"}, USER), "no assistant turn"),
        (chat(USER, ASSISTANT, USER), "ends on a user turn (messages[2])"),
        (chat(USER, {"role": "assitant", "content": "x"}), "messages[1].role 'assitant' is not a valid role; use one "
                                                            "of system, user, assistant, tool, human, gpt (did you mean "
                                                            "'assistant'?)"),
        (chat(USER, {"role": "assistant", "content": "  "}), "messages[1].content is empty"),
        (chat(USER, {"role": "assistant", "content": 3}), "messages[1].content must be a string, got int"),
        (chat(USER, {"role": "assistant", "contnet": "x"}), "messages[1]: missing field 'content' (found 'contnet'"),
        (chat(USER, ASSISTANT, {"role": "system", "content": "S"}, USER, ASSISTANT), "system turn may only come first"),
        (chat(USER, USER, ASSISTANT), "messages[0] and messages[1] are consecutive user turns"),
        (chat(ASSISTANT), "messages[0] has role 'assistant' where 'user' is expected"),
        ({"messages": "hi"}, "'messages' must be a list of turns, got str"),
        ({"messages": []}, "'messages' is an empty list"),
    ],
)
def test_bad_conversations_name_row_field_and_fix(write_rows, row, expected):
    message = load_error(write_rows([ROWS["messages"], row]), dataset_type="messages")
    assert "train.jsonl:2: " in message and expected in message
    assert "1 of 2 rows" in message


def test_malformed_json_line(write_rows):
    message = load_error(write_rows([ROWS["text"], '{"text": "a",', ROWS["text"]]))
    assert "train.jsonl:2: invalid JSON" in message and "1 of 3 rows" in message


def test_misspelled_column_is_suggested(write_rows):
    rows = [ROWS["alpaca"], {"instruction": "x", "ouptut": "y"}]
    message = load_error(write_rows(rows))
    assert "train.jsonl:2: missing field 'output' (found 'ouptut': misspelled? rename it to 'output')" in message


def test_undetectable_format_lists_what_is_expected(write_rows):
    message = load_error(write_rows([{"mesages": []}]))
    assert "Cannot detect the format" in message and "'mesages' -> 'messages'?" in message


def test_mixed_formats_name_the_odd_rows(write_rows):
    message = load_error(write_rows([ROWS["messages"], ROWS["messages"], ROWS["alpaca"]]))
    assert "(read as messages)" in message
    assert "train.jsonl:3: missing field 'messages'" in message and "looks like alpaca" in message


def test_many_bad_rows_give_one_error_with_the_first_five_and_the_count(write_rows):
    rows = [ROWS["text"]] + [{"text": ""}] * 12
    message = load_error(write_rows(rows))
    assert message.startswith("12 of 13 rows in")
    assert message.count("'text' is empty") == 5 and "... and 7 more" in message


def test_wrong_types_in_flat_formats():
    assert "'output' must be a string, got int" in load_error([{"instruction": "a", "output": 3}])
    assert "input_ids[1] = 'x' is not a token id" in load_error([{"input_ids": [1, "x"]}])
    assert "'labels' has 1 items but 'input_ids' has 2" in load_error([{"input_ids": [1, 2], "labels": [1]}])
    assert "row 0: expected an object (dict)" in load_error(["just text"])


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "is empty" in load_error(tmp_path / "empty.jsonl")
    assert "is empty" in load_error([])
    assert f"not found: {tmp_path / 'nope.jsonl'}" in load_error(tmp_path / "nope.jsonl")
    assert "unsupported file type '.txt'" in load_error((tmp_path / "a.txt").write_text("x") and tmp_path / "a.txt")
    assert "dataset_type='alpacca' is not valid" in load_error([ROWS["text"]], dataset_type="alpacca")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([ROWS["text"]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_examples("someone/some-data")
    assert calls == [("someone/some-data", "train")] and loaded.format == "text"
    assert "Hub dataset someone/some-data" in loaded.source
    with pytest.raises(DataError, match="not found: someone/data.jsonl"):
        load_examples("someone/data.jsonl")


def test_split_examples_is_seeded_and_disjoint():
    from training_hub.data import split_examples

    rows = [{"text": f"row {i}"} for i in range(20)]
    loaded = load_examples(rows)
    train, held = split_examples(loaded, 0.25, seed=1)
    again_train, again_held = split_examples(loaded, 0.25, seed=1)
    assert len(held.examples) == 5 and len(train.examples) == 15
    assert [e.text for e in held.examples] == [e.text for e in again_held.examples]
    assert not {e.text for e in held.examples} & {e.text for e in train.examples}
    assert train.fingerprint != loaded.fingerprint


def test_a_row_level_weight_is_refused_not_ignored():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "weight": 0}
    with pytest.raises(DataError, match=r"row 0: a row-level 'weight' is not read: put 'weight' \(0 or 1\) on assistant"):
        load_examples([row])


@pytest.mark.parametrize("column, value, says", [
    ("images", ["cat.png"], "put each image in its message as a part"),
    ("system", "Be brief.", "put the system prompt in the conversation"),
    ("tool", [], "the messages format reads 'tools' (misspelled?)"),
])
def test_columns_that_would_be_ignored_are_refused_and_metadata_passes(column, value, says):
    """A row-level column the format does not read is refused when it means something (a misplaced or misspelled
    one); metadata columns such as an id pass."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=re.escape(f"row 0: a row-level '{column}' is not read: {says}")):
        load_examples([{"messages": chat, column: value}])
    loaded = load_examples([{"messages": chat, "id": 7, "prompt_id": "a1", "source": "web"}])
    assert loaded.format == "messages" and len(loaded.examples) == 1
    alpaca = load_examples([{"instruction": "Say hi", "output": "hi", "system": "Be brief."}])
    assert alpaca.examples[0].messages[0] == {"role": "system", "content": "Be brief."}  # alpaca reads 'system'
    assert len(load_examples([{"messages": chat, column: None}]).examples) == 1  # None: absent (parquet rows)
    with pytest.raises(DataError, match="a row-level 'tools' is not read: function schemas are read with chat rows"):
        load_examples([{"instruction": "Say hi", "output": "hi", "tools": []}])
