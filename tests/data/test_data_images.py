"""Image parts in chats (vision-language models): reading and checking, exact masks on a tiny LLaVA processor."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sample_data import color_conversations
from training_hub.data import DataError, load_examples
from training_hub.data.masking import IGNORE_INDEX
from training_hub.data.vision import VisionCollator, expand_labels, load_processor, process, tokenize_vision_examples

IMAGE_TOKENS_PER_IMAGE = 4  # the tiny processor: (16 / 8)² patches


def chat(*turns) -> dict:
    return {"messages": list(turns)}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def image(path) -> dict:
    return {"type": "image", "image": str(path)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def answer(value: str) -> dict:
    return {"role": "assistant", "content": value}


def test_image_parts_are_kept_and_normalized_for_a_vision_model(write_rows, color_images):
    data_url = "data:image/png;base64," + base64.b64encode(color_images["blue"].read_bytes()).decode()
    rows = [chat(user(image(color_images["red"]), text("and"),
                      {"type": "image_url", "image_url": {"url": data_url}}, text("?")), answer("red, blue")),
            chat({"role": "user", "content": [text("no image")]}, answer("ok"))]
    loaded = load_examples(write_rows(rows), images=True)
    assert loaded.examples[0].messages[0]["content"] == [image(color_images["red"]), text("and"),
                                                          {"type": "image", "image": data_url}, text("?")]
    assert loaded.examples[1].messages[0]["content"] == "no image"  # text parts only: joined, as for text models


def test_a_text_model_still_refuses_image_parts(write_rows, color_images):
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[0\].content\[0\] is a 'image' part: images, audio "
                                        "and files are not supported in text fine-tuning"):
        load_examples(write_rows([chat(user(image(color_images["red"])), answer("red"))]))


@pytest.mark.parametrize("part, expected", [
    (image("missing/cat.png"), r"train.jsonl:2: messages\[0\].content\[1\]: the image file 'missing/cat.png' does not "
                               "exist"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
     r"train.jsonl:2: messages\[0\].content\[1\]: the image 'data:image/png;base64,QUJD' cannot be read"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
     r"train.jsonl:2: messages\[0\].content\[1\] names the image 'https://example.com/cat.png': only local files"),
    ({"type": "image"}, r"train.jsonl:2: messages\[0\].content\[1\] is an image part without a path"),
])
def test_bad_images_are_named_with_file_line_and_part(write_rows, color_images, part, expected):
    rows = [chat(user(image(color_images["red"])), answer("red")), chat(user(text("look"), part), answer("a cat"))]
    with pytest.raises(DataError, match=expected):
        load_examples(write_rows(rows), images=True)


def test_an_unreadable_image_file_is_refused(write_rows, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[0\].content\[0\]: the image '.*broken.png' cannot "
                                        "be read"):
        load_examples(write_rows([chat(user(image(broken)), answer("?"))]), images=True)


def test_images_are_read_in_user_turns_only(write_rows, color_images):
    row = chat(user(text("hi")), {"role": "assistant", "content": [image(color_images["red"])]})
    with pytest.raises(DataError, match=r"messages\[1\].content\[0\] is an image in a assistant turn; images are read "
                                        "in user turns only"):
        load_examples(write_rows([row]), images=True)


@pytest.fixture(scope="module")
def processor(tiny_vision_model):
    return load_processor(str(tiny_vision_model))


def encode(processor, value: str) -> list[int]:
    return processor.tokenizer(value, add_special_tokens=False)["input_ids"]


def test_masks_are_exact_with_images_expanded_and_never_trained(processor, write_rows, color_images):
    rows = [chat(user(image(color_images["red"]), image(color_images["green"]), text("Which two?")),
                 answer("Red and green."), user(text("And this?"), image(color_images["blue"])), answer("Blue."))]
    data = tokenize_vision_examples(load_examples(write_rows(rows), images=True), processor, max_seq_len=512)
    row = data[0]
    ids, labels = np.array(row["input_ids"]), np.array(row["labels"])
    image_id = processor.image_token_id
    assert (ids == image_id).sum() == 3 * IMAGE_TOKENS_PER_IMAGE
    assert (labels[ids == image_id] == IGNORE_INDEX).all()
    assert ids[labels != IGNORE_INDEX].tolist() == encode(processor, "Red and green.<|im_end|>Blue.<|im_end|>")
    assert labels[labels != IGNORE_INDEX].tolist() == ids[labels != IGNORE_INDEX].tolist()
    assert process(processor, [row["text"]], row["images"])["input_ids"][0].tolist() == row["input_ids"]
    assert row["images"] == [str(color_images[c]) for c in ("red", "green", "blue")]
    assert data.summary.rows_out == 1 and "3 images" in data.summary.template_note


def test_the_collator_gives_pixel_values_and_padded_labels(processor, write_rows, color_images):
    rows = color_conversations(color_images, n=2)
    rows[1]["messages"][1]["content"] = "It is green, I am quite sure of it."  # a longer row: the other is padded
    data = tokenize_vision_examples(load_examples(write_rows(rows), images=True), processor, max_seq_len=512)
    batch = VisionCollator(processor, max_seq_len=512)([data[0], data[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    short, long = len(data[0]["input_ids"]), len(data[1]["input_ids"])
    assert batch["input_ids"].shape == (2, long) and batch["labels"].shape == (2, long)
    assert batch["labels"][0, :short].tolist() == data[0]["labels"]
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["labels"][1].tolist() == data[1]["labels"]


def test_rows_too_long_follow_truncation_but_are_never_cut_through_an_image(processor, write_rows, color_images):
    loaded = load_examples(write_rows(color_conversations(color_images, n=1)), images=True)
    full = len(tokenize_vision_examples(loaded, processor, max_seq_len=512)[0]["input_ids"])
    cut = tokenize_vision_examples(loaded, processor, max_seq_len=full - 2)
    assert len(cut[0]["input_ids"]) == full - 2 and cut.summary.rows_truncated == 1
    batch = VisionCollator(processor, max_seq_len=full - 2)([cut[0]])
    assert batch["input_ids"].shape == (1, full - 2)
    with pytest.raises(DataError, match=r"train.jsonl:1: .* tokens with its images expanded > max_seq_len=4, and "
                                        "cutting it would cut an image"):
        tokenize_vision_examples(loaded, processor, max_seq_len=4)
    with pytest.raises(DataError, match="truncation='error'"):
        tokenize_vision_examples(loaded, processor, max_seq_len=full - 2, truncation="error")
    with pytest.raises(DataError, match="1 of 1 rows would be dropped .1 longer than max_seq_len"):
        tokenize_vision_examples(loaded, processor, max_seq_len=full - 2, truncation="drop")  # as for text


def test_expand_labels_carries_labels_over_and_refuses_other_changes():
    ids, labels = np.array([5, 9, 6, 7]), np.array([-100, -100, 6, 7])
    assert expand_labels(ids, labels, np.array([5, 9, 9, 9, 6, 7]), image_id=9).tolist() == [-100] * 4 + [6, 7]
    with pytest.raises(ValueError, match="beyond expanding its image placeholders"):
        expand_labels(ids, labels, np.array([5, 9, 9, 8, 7]), image_id=9)


def test_prepare_dataset_takes_the_vision_path_for_a_vision_model(tiny_vision_model, processor, write_rows,
                                                                  color_images):
    from training_hub import prepare_dataset

    path = write_rows(color_conversations(color_images, n=3))
    prepared = prepare_dataset(str(path), model_path=str(tiny_vision_model))
    direct = tokenize_vision_examples(load_examples(path, images=True), processor, max_seq_len=2048)
    assert prepared["input_ids"] == direct["input_ids"] and prepared["labels"] == direct["labels"]
    with pytest.raises(ValueError, match="data_output_dir='cache': tokenized data is not cached for a vision-language"):
        prepare_dataset(str(path), model_path=str(tiny_vision_model), data_output_dir="cache")
