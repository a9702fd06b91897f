"""Chats with images for a vision-language model: the processor, masked token rows, and the batch collator.

A conversation is rendered and masked exactly as text is (``masking``: loss on the answers only), then the
model's processor tokenizes the same text with the images, expanding each image placeholder into the image
tokens the model expects (how many, and which, is the processor's business). The labels are carried over
to the expanded ids token by token; every inserted token, and every image token, carries no loss. The
collator runs the processor again per batch for the pixel values (and whatever else the model needs, e.g.
image sizes or grids), checks that it gives the same ids, and pads the labels with -100.
"""

from __future__ import annotations

from typing import Any

from .images import message_images, open_image
from .masking import IGNORE_INDEX, make_labels, make_renderer, render_for_loss
from .pipeline import Tally, check_tally, naming_the_row, summarize
from .schema import DataError, Example, LoadedData, TokenizedData


def load_processor(model_path: str, trust_remote_code: bool = False):
    """The model's processor; its tokenizer gets a pad token (EOS when it has none), and the two share one chat
    template (the processor's, which generation with the processor uses, else the tokenizer's), so the data is
    rendered as the processor renders it."""
    from transformers import AutoProcessor

    from .tokenizer import pad_token_policy

    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    pad_token_policy(tokenizer, model_path)
    if getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    elif tokenizer.chat_template:
        processor.chat_template = tokenizer.chat_template  # saved with the adapter: generation renders the same
    return processor


def image_token_id(processor) -> int:
    """The id of the token the processor repeats for each image's features."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id is None:
        raise DataError(f"{type(processor).__name__} names no image token (image_token / image_token_id), so image "
                        "tokens cannot be kept out of the loss; this processor is not supported")
    return int(token_id)


def process(processor, texts: list[str], images: list[str], **kwargs) -> dict:
    """The processor's tensors for these texts and their images (opened here, in order)."""
    opened = [open_image(source) for source in images]
    return processor(text=texts, images=opened or None, add_special_tokens=False, return_tensors="pt", **kwargs)


def expand_labels(ids: Any, labels: Any, expanded: Any, image_id: int) -> Any:
    """Labels for ``expanded`` (the processor's ids): each token of ``ids`` keeps its label, every token the
    processor inserted gets -100, and so does every image token. ValueError if ``ids`` is not a subsequence."""
    import numpy as np

    out = np.full(len(expanded), IGNORE_INDEX, dtype=np.int64)
    i = 0
    for j, token in enumerate(expanded):
        if i < len(ids) and token == ids[i]:
            out[j] = labels[i]
            i += 1
    out[expanded == image_id] = IGNORE_INDEX
    kept = int((labels[ids != image_id] != IGNORE_INDEX).sum())
    if i != len(ids) or int((out != IGNORE_INDEX).sum()) != kept:
        raise ValueError("the processor changed the text beyond expanding its image placeholders")
    return out


def tokenize_vision_examples(loaded: LoadedData, processor, *, max_seq_len: int, train_on_inputs: bool = False,
                             train_on_reasoning: bool = True, truncation: str = "truncate") -> TokenizedData:
    """Token rows (ids with image tokens expanded, labels, the text and its image sources) for a vision model.

    Rows longer than ``max_seq_len`` once images are expanded follow ``truncation``, except that a row is never
    cut inside or before an image (that row is an error naming it). Rows with no supervised token are dropped
    and counted, as for text."""
    import datasets
    import numpy as np

    from .encoding import Encoder

    if loaded.format not in ("messages", "sharegpt"):
        raise DataError(f"a vision-language model trains on chats (messages with image parts); this data's format "
                        f"is {loaded.format}: convert it to messages (docs/data.md)")
    tokenizer = processor.tokenizer
    renderer, encoder, image_id = make_renderer(tokenizer), Encoder(tokenizer), image_token_id(processor)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "text": [], "images": []}
    tally = Tally(rows_in=len(loaded.examples))
    for example in loaded.examples:
        rendered = naming_the_row(example, render_for_loss, renderer, example.messages, example.tools,
                                  train_on_inputs, train_on_reasoning)
        tokens = encoder.encode_with_offsets([rendered.text])[0]
        text = rendered.text
        if renderer.bos_token_id is not None and not text.startswith(renderer.bos_token):
            tokens, text = tokens.with_bos(renderer.bos_token_id), renderer.bos_token + text
        images = message_images(example.messages)
        expanded = process(processor, [text], images)["input_ids"][0].numpy().astype(np.int64)
        try:
            labels = expand_labels(tokens.ids, make_labels(tokens, rendered, train_on_inputs), expanded, image_id)
        except ValueError as error:
            raise DataError(f"{example.origin}: {error}; the loss mask cannot be carried over") from None
        row = limit_length(example, expanded, labels, image_id, max_seq_len, truncation, tally)
        if row is None:
            continue
        supervised = int((row[1] != IGNORE_INDEX).sum())
        if not supervised:
            tally.dropped_no_supervised += 1
            tally.empty.append(example.origin)
            continue
        tally.lengths.append(len(row[0]))
        tally.supervised += supervised
        for name, value in zip(rows, (row[0].tolist(), row[1].tolist(), text, images)):
            rows[name].append(value)
    check_tally(tally, max_seq_len)  # as for text: no row left, or more than half dropped, is refused
    images = sum(len(sources) for sources in rows["images"])
    summary = summarize(loaded.format, tally, f"{renderer.note}; {images} images, expanded by the processor and never "
                        "trained on", max_seq_len, truncation)
    return TokenizedData(datasets.Dataset.from_dict(rows), summary)


def limit_length(example: Example, ids: Any, labels: Any, image_id: int, max_seq_len: int, truncation: str,
                 tally: Tally) -> tuple[Any, Any] | None:
    """The row within ``max_seq_len`` (truncated after its last image token), or None when dropped."""
    if len(ids) <= max_seq_len:
        return ids, labels
    where = f"{example.origin}: {len(ids)} tokens with its images expanded > max_seq_len={max_seq_len}"
    if truncation == "drop":
        tally.dropped_too_long += 1
        return None
    if truncation == "error":
        raise DataError(f"{where} (truncation='error'); raise max_seq_len, or use truncation='truncate' or 'drop'")
    positions = (ids == image_id).nonzero()[0]
    if len(positions) and positions[-1] >= max_seq_len:
        raise DataError(f"{where}, and cutting it would cut an image; raise max_seq_len, use smaller or fewer "
                        "images, or truncation='drop'")
    tally.truncated += 1
    return ids[:max_seq_len], labels[:max_seq_len]


class VisionCollator:
    """Runs the processor on each batch (pixel values and the model's other image inputs), pads on the right,
    cuts rows that were truncated (after their last image), and pads the stored labels with -100."""

    def __init__(self, processor, max_seq_len: int):
        self.processor = processor
        self.max_seq_len = max_seq_len

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        batch = dict(process(self.processor, [row["text"] for row in rows],
                             [source for row in rows for source in row["images"]], padding=True, padding_side="right"))
        length = batch["input_ids"].shape[1]
        for key, value in batch.items():  # the per-token tensors (ids, mask, token types)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (len(rows), length):
                batch[key] = value[:, : self.max_seq_len]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row in enumerate(rows):
            kept = batch["attention_mask"][i].bool()
            if batch["input_ids"][i][kept].tolist() != row["input_ids"]:
                raise RuntimeError("the processor tokenized a row differently in the batch than when the data was "
                                   "prepared (a processor setting changed?)")
            labels[i][kept] = torch.tensor(row["labels"], dtype=labels.dtype)
        batch["labels"] = labels
        return batch
