"""Data files and folders: every file is read or the run is refused naming it; bad bytes and keys name file:line."""

from __future__ import annotations

import gzip
import json

import pytest

from training_hub.data import DataError, load_examples


def error_of(source, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_examples(source, **kwargs)
    return str(caught.value)


def text_rows(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_every_file_of_a_folder_is_read_compressed_upper_case_and_nested(tmp_path):
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(text_rows("a1", "a2"))
    (folder / "B.JSONL").write_bytes(text_rows("b1"))
    (folder / "more" / "c.jsonl.gz").write_bytes(gzip.compress(text_rows("c1")))
    (folder / "d.Jsonl.GZ").write_bytes(gzip.compress(text_rows("d1")))
    loaded = load_examples(folder)
    assert sorted(e.text for e in loaded.examples) == ["a1", "a2", "b1", "c1", "d1"]
    assert "(4 files)" in loaded.source
    assert {e.origin for e in loaded.examples} >= {"data/more/c.jsonl.gz:1", "data/B.JSONL:1", "data/d.Jsonl.GZ:1"}


def test_a_folder_with_files_that_would_be_skipped_is_refused_naming_each(tmp_path):
    folder = tmp_path / "data"
    (folder / ".cache").mkdir(parents=True)
    (folder / "train.jsonl").write_bytes(text_rows("x"))
    (folder / "README.md").write_text("notes")
    (folder / ".hidden.jsonl").write_bytes(text_rows("y"))
    (folder / ".cache" / "part.jsonl").write_bytes(text_rows("z"))
    message = error_of(folder)
    assert "3 file(s) that would not be read" in message
    assert "README.md: not a data file" in message
    assert ".hidden.jsonl: hidden (.hidden.jsonl)" in message and ".cache/part.jsonl: hidden (.cache)" in message
    assert (folder / "README.md").read_text() == "notes" and (folder / "train.jsonl").exists()  # nothing touched


def test_a_compressed_json_file_and_a_damaged_archive(tmp_path):
    good = tmp_path / "rows.json.gz"
    good.write_bytes(gzip.compress(json.dumps([{"text": "one"}, {"text": "two"}]).encode()))
    assert [e.text for e in load_examples(good).examples] == ["one", "two"]
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(gzip.compress(text_rows("x" * 200))[:30])
    assert "cut.jsonl.gz: not a readable gzip file" in error_of(bad)


def test_duplicate_keys_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "one", "text": "two"}\n'
                    '{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n')
    message = error_of(path)
    assert "train.jsonl:2: the key(s) 'text' appear twice" in message
    assert "train.jsonl:3: the key(s) 'content' appear twice" in message
    whole = tmp_path / "rows.json"
    whole.write_text('[{"text": "a"}, {"text": "b", "text": "c"}]')
    assert "rows.json: the key(s) 'text' appear twice" in error_of(whole)
    table = tmp_path / "rows.csv"
    table.write_text("text,text\na,b\n")
    assert "rows.csv:1: the header names the column(s) 'text' twice" in error_of(table)


def test_bytes_that_are_not_utf8_are_named_with_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(text_rows("fine") + b'{"text": "caf\xe9"}\n')
    assert "train.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)" in error_of(path)
    table = tmp_path / "rows.csv"
    table.write_bytes(b"text\nfine\ncaf\xe9\n")
    assert "rows.csv:3: not UTF-8 text (byte 0xe9 at column 4)" in error_of(table)
    whole = tmp_path / "rows.json"
    whole.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}]')
    assert "rows.json:3: not UTF-8 text (byte 0xff" in error_of(whole)


def test_lone_surrogates_are_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half \\ud800 a pair"}\n')
    assert "train.jsonl:2: holds a lone surrogate (\\ud800)" in error_of(path)
    assert "row 0: holds a lone surrogate" in error_of([{"text": "x\udc00"}])


def test_a_missing_local_looking_path_is_no_such_file_not_a_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("data/train", "./train", "nope", "a/b/c", str(tmp_path / "x"), "someone/train.JSONL.gz"):
        assert "(no such file or folder)" in error_of(missing), missing


def test_an_unreachable_hub_name_says_both_readings_failed(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = error_of("someone/some-data")
    assert "'someone/some-data': no such file or folder here" in message and "ConnectionError" in message
