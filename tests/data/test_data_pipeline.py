"""tokenize_examples: truncation modes, dropped rows, text/passthrough rows, cache, summary."""

from __future__ import annotations

import pytest

from training_hub.data import DataError, load_examples, tokenize_examples


def conversation(answer: str, question: str = "Hi") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def run(rows, tokenizer, **kwargs):
    kwargs.setdefault("max_seq_len", 512)
    kwargs.setdefault("cache_dir", "none")
    return tokenize_examples(load_examples(rows), tokenizer, **kwargs)


def long_rows(tokenizer):
    """Three short rows and one ~60-token row."""
    return [conversation("Hello!")] * 3 + [conversation("Hello! " * 20)]


def test_truncate_keeps_the_start(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    full = run(long_rows(tokenizer), tokenizer)
    cut = run(long_rows(tokenizer), tokenizer, max_seq_len=30)
    assert cut.summary.rows_truncated == 1 and cut.summary.rows_out == 4
    assert cut.dataset[3]["input_ids"] == full.dataset[3]["input_ids"][:30]
    assert cut.dataset[3]["labels"] == full.dataset[3]["labels"][:30]
    assert cut.summary.tokens_max == 30


def test_drop_removes_long_rows_and_counts_them(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    result = run(long_rows(tokenizer), tokenizer, max_seq_len=30, truncation="drop")
    assert result.summary.rows_dropped_too_long == 1 and result.summary.rows_out == 3
    assert len(result.dataset) == 3


def test_error_names_the_row_and_its_length(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    with pytest.raises(DataError, match=r"row 3: \d+ tokens > max_seq_len=30"):
        run(long_rows(tokenizer), tokenizer, max_seq_len=30, truncation="error")


def test_rows_truncated_to_no_answer_are_dropped_and_counted(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    rows = [conversation("Hello!")] * 3 + [conversation("Yes.", question="word " * 40)]
    result = run(rows, tokenizer, max_seq_len=30)
    assert result.summary.rows_dropped_no_supervised_tokens == 1 and result.summary.rows_out == 3


def test_more_than_half_dropped_is_an_error(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    rows = [conversation("Hello!")] + [conversation("Yes.", question="word " * 40)] * 2
    with pytest.raises(DataError, match=r"2 of 3 rows would be dropped .*row 1, row 2"):
        run(rows, tokenizer, max_seq_len=30)


def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer_factory):
    tokenizer = tokenizer_factory("llama3")
    result = run([{"text": "Hello, Alice!"}], tokenizer)
    row = result.dataset[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["labels"] == row["input_ids"]  # this tokenizer adds no BOS of its own
    assert result.summary.format == "text" and "eos_token '<|eot_id|>' appended" in result.summary.template_note


def test_passthrough_rows_are_used_as_given(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    result = run([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}], tokenizer)
    assert result.dataset.to_list() == [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                        {"input_ids": [8, 9], "labels": [8, 9]}]
    with pytest.raises(DataError, match=r"row 0: input_ids holds token id 99999"):
        run([{"input_ids": [99999]}], tokenizer)
    with pytest.raises(DataError, match=r"row 0: labels holds token id 99999"):
        run([{"input_ids": [5, 6], "labels": [-100, 99999]}], tokenizer)


def test_columns_order_and_summary(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    rows = [conversation(f"Hello {n}!") for n in ("Alice", "Bob", "Carol")]
    result = run(rows, tokenizer)
    assert result.dataset.column_names == ["input_ids", "labels"]
    decoded = [tokenizer.decode(r["input_ids"]) for r in result.dataset]
    assert [("Alice" in d, "Bob" in d, "Carol" in d) for d in decoded] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    summary = result.summary
    assert summary.rows_in == summary.rows_out == 3 and summary.tokens_min <= summary.tokens_median
    assert summary.to_dict()["supervised_tokens_total"] == summary.supervised_tokens_total > 0
    text = str(summary)
    assert "3 of 3 rows kept" in text and "% with loss" in text and "truncated" in text


def test_parallel_workers_give_the_same_rows(tokenizer_factory):
    tokenizer = tokenizer_factory("llama3")
    rows = [conversation(f"Hello {i}!") for i in range(50)]
    assert run(rows, tokenizer, num_proc=2).dataset.to_list() == run(rows, tokenizer, num_proc=1).dataset.to_list()


def test_second_call_loads_from_cache(tokenizer_factory, tmp_path, monkeypatch):
    tokenizer = tokenizer_factory("chatml")
    loaded = load_examples([conversation("Hello!"), conversation("Bye!")])
    first = tokenize_examples(loaded, tokenizer, max_seq_len=64, cache_dir=tmp_path)
    assert not first.from_cache and first.cache_path

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("training_hub.data.pipeline.process_all", fail)
    second = tokenize_examples(loaded, tokenizer, max_seq_len=64, cache_dir=tmp_path)
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.dataset.to_list() == first.dataset.to_list() and second.summary == first.summary
    with pytest.raises(AssertionError, match="tokenized again"):  # another setting, another key
        tokenize_examples(loaded, tokenizer, max_seq_len=64, cache_dir=tmp_path, train_on_inputs=True)


def test_cache_location_and_disabling(tokenizer_factory, tmp_path, monkeypatch):
    tokenizer = tokenizer_factory("chatml")
    monkeypatch.setenv("TRAINING_HUB_CACHE", str(tmp_path / "env-cache"))
    result = run([conversation("Hello!")], tokenizer, cache_dir=None)
    assert result.cache_path.startswith(str(tmp_path / "env-cache"))
    monkeypatch.setenv("TRAINING_HUB_CACHE", "none")
    assert run([conversation("Hello!")], tokenizer, cache_dir=None).cache_path is None


def test_bad_arguments(tokenizer_factory):
    tokenizer = tokenizer_factory("chatml")
    with pytest.raises(ValueError, match="max_seq_len=0: use an int >= 2; truncation=.cut.: use one of"):
        run([conversation("Hello!")], tokenizer, truncation="cut", max_seq_len=0)
