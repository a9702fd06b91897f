"""Loss masking: render a conversation with the chat template, find each answer's characters, map to tokens.

The rule: every assistant answer carries loss, from the end of the rendered prefix with the
generation prompt to the end of its first end-of-turn/EOS token (not the newline after it). Character
spans are mapped to tokens through the fast tokenizer's offsets, so any template works without
``{% generation %}`` markers, as long as rendering is incremental (each prefix renders as a prefix).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from .schema import DataError, Message

# End-of-turn strings of common templates; only those the tokenizer knows as tokens are searched for.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "</s>")

# Used when the tokenizer has no chat template: plain-text role headers, each answer ends with eos_token.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Renderer:
    """How to turn messages into text for one tokenizer."""

    tokenizer: Any
    chat_template: str | None  # None: the tokenizer's own template
    end_markers: tuple[str, ...]
    bos_token: str | None  # set when the tokenizer would add a BOS the template does not render
    bos_token_id: int | None
    eos_token: str | None
    note: str


def make_renderer(tokenizer: Any, *, needs_template: bool = True) -> Renderer:
    """Inspect the tokenizer once: template (or fallback), end-of-turn strings, BOS policy.

    Raises DataError when the tokenizer has neither a chat template nor an eos token (for chat data).
    """
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"Loss masking needs a fast tokenizer (with offsets); {type(tokenizer).__name__} is not one. "
                        "Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    eos = tokenizer.eos_token
    own = getattr(tokenizer, "chat_template", None)
    if own:
        template, note = None, "tokenizer chat template"
    elif needs_template and eos is None:
        raise DataError("The tokenizer has no chat template and no eos_token, so answers cannot be delimited. "
                        "Set tokenizer.chat_template (e.g. from the instruct model of the same family) or "
                        "tokenizer.eos_token, or use dataset_type='text' or 'passthrough'.")
    else:
        template = FALLBACK_CHAT_TEMPLATE
        note = (f"fallback template: '### User:' / '### Assistant:' headers, answers end with eos_token {eos!r} "
                "(the tokenizer has no chat template)") if needs_template else "no chat template needed"
    known = set(tokenizer.get_added_vocab())
    markers = tuple(m for m in END_OF_TURN_TOKENS if m in known and m != eos)
    markers = ((eos,) if eos else ()) + markers
    bos_id = bos_added_by_tokenizer(tokenizer)
    return Renderer(tokenizer, template, markers, tokenizer.bos_token if bos_id is not None else None, bos_id,
                    eos, note)


def bos_added_by_tokenizer(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer(text)`` would add it, else None."""
    bos_id = tokenizer.bos_token_id
    if tokenizer.bos_token is None or bos_id is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if ids and ids[0] == bos_id else None


def render(renderer: Renderer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    extra = {"chat_template": renderer.chat_template} if renderer.chat_template else {}
    return renderer.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **extra)


def check_prefix(prefix: str, full: str, count: int, how: str) -> None:
    if full.startswith(prefix):
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    raise DataError(
        f"The chat template cannot be used for loss masking: the first {count} messages{how} render as text "
        f"that is not a prefix of the whole conversation (they differ at character {at}: "
        f"{prefix[at:at + 30]!r} vs {full[at:at + 30]!r}). Templates that drop earlier reasoning, add a date "
        "line or change earlier turns do this. Use a template that renders conversations incrementally, or "
        "train_on_inputs=True.")


def answer_end(text: str, start: int, limit: int, markers: tuple[str, ...]) -> int:
    """End of the answer starting at ``start``: after the first end-of-turn marker, else trailing space cut."""
    found = [(pos, marker) for marker in markers if (pos := text.find(marker, start, limit)) >= 0]
    if found:
        pos, marker = min(found)
        return pos + len(marker)
    return max(start, len(text[:limit].rstrip()))


def render_with_spans(renderer: Renderer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant answer."""
    full = render(renderer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(renderer, messages[:k], add_generation_prompt=True)
        check_prefix(prefix, full, k, " with add_generation_prompt=True")
        # The last answer closes the conversation: its render is the full one, no need to render it again.
        through = full if k == len(messages) - 1 else render(renderer, messages[: k + 1])
        check_prefix(through, full, k + 1, "")
        spans.append((len(prefix), answer_end(full, len(prefix), len(through), renderer.end_markers)))
    return full, spans


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the token id where the token overlaps an answer span, else -100 (offsets are sorted)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in spans:
        first = bisect_right(offsets, span_start, key=itemgetter(1))  # first token ending after the span starts
        stop = bisect_left(offsets, span_end, key=itemgetter(0))  # first token starting at or after the span end
        labels[first:stop] = input_ids[first:stop]
    return labels


def format_example(input_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Decoded text with supervised (loss-carrying) stretches wrapped in ``[[`` and ``]]``."""
    pieces: list[str] = []
    run: list[int] = []
    run_trained = False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(decode_run(tokenizer, run, run_trained))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(decode_run(tokenizer, run, run_trained))
    return "".join(pieces)


def decode_run(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"[[{text}]]" if trained else text
