"""Loss masking: render a conversation with the chat template, find each answer's characters, map to tokens.

The rule: every assistant answer carries loss (unless its weight is 0), from the end of the rendered prefix
with the generation prompt to the end of its first end-of-turn/EOS token (not the newline after it); tool
calls and reasoning the template writes in the answer are part of it. Character spans are mapped to tokens
by their positions in the text (``encoding``), so any template works without ``{% generation %}`` markers,
as long as each prefix with the generation prompt renders as a prefix of the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .images import content_text
from .rendering import BatchRenderer, RenderJob
from .schema import DataError, Message

if TYPE_CHECKING:
    from .encoding import Tokens

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
    batch: BatchRenderer


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
                    eos, note, BatchRenderer(tokenizer, template))


def bos_added_by_tokenizer(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer(text)`` would add it, else None."""
    bos_id = tokenizer.bos_token_id
    if tokenizer.bos_token is None or bos_id is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if ids and ids[0] == bos_id else None


def check_prefix(prefix: str, full: str, count: int, how: str) -> None:
    if not full.startswith(prefix):
        raise not_a_prefix(prefix, full, count, how)


def not_a_prefix(prefix: str, full: str, count: int, how: str) -> DataError:
    at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    return DataError(
        f"The chat template cannot be used for loss masking: the first {count} messages{how} render as text "
        f"that is not a prefix of the whole conversation (they differ at character {at}: "
        f"{prefix[at:at + 30]!r} vs {full[at:at + 30]!r}). Templates that add a date line or change earlier "
        "turns (other than closing them with an end-of-turn token) do this. Use a template that renders "
        "conversations incrementally, or train_on_inputs=True (loss on every token).")


def answer_end(text: str, start: int, limit: int, markers: tuple[str, ...]) -> int:
    """End of the answer starting at ``start``: after the first end-of-turn marker, else trailing space cut."""
    found = [(pos, marker) for marker in markers if (pos := text.find(marker, start, limit)) >= 0]
    if found:
        pos, marker = min(found)
        return pos + len(marker)
    return max(start, len(text[:limit].rstrip()))


@dataclass
class Rendered:
    """A rendered conversation and its character spans: ``trained`` carry loss, ``excluded`` never do."""

    text: str
    trained: list[tuple[int, int]]
    excluded: list[tuple[int, int]]


def needs_spans(messages: list[Message], train_on_inputs: bool, train_on_reasoning: bool) -> bool:
    """Whether the answers' spans must be found: always, unless ``train_on_inputs`` trains every character and
    nothing is excluded (a weight-0 answer, or reasoning with ``train_on_reasoning=False``). A weight-0 turn
    other than an answer is refused with ``train_on_inputs``, which trains it all the same."""
    if not train_on_inputs:
        return True
    for k, message in enumerate(messages):
        if message.get("weight") == 0 and message["role"] != "assistant":
            raise DataError(f"messages[{k}].weight is 0 on a {message['role']} turn, but train_on_inputs=True trains "
                            "every token of the conversation; remove that weight, or pass train_on_inputs=False "
                            "(only assistant turns are trained, and weight 0 excludes an answer)")
    return any(m.get("weight") == 0 or (m.get("reasoning_content") and not train_on_reasoning) for m in messages)


def render_jobs(messages: list[Message], tools: list[dict] | None, spans: bool) -> list[RenderJob]:
    """The renders a conversation needs: with ``spans``, ``messages[:k]`` with the generation prompt for each
    answer k, then ``messages[:k+1]`` without (the last is the whole conversation); else the whole only."""
    if not spans:
        return [(messages, tools, False)]
    answers = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    return [(messages[:k], tools, True) for k in answers] + [(messages[: k + 1], tools, False) for k in answers]


def render_for_loss(renderer: Renderer, messages: list[Message], tools: list[dict] | None, train_on_inputs: bool,
                    train_on_reasoning: bool) -> Rendered:
    """One conversation rendered, with its trained and excluded spans (pipelines batch the renders instead)."""
    spans = needs_spans(messages, train_on_inputs, train_on_reasoning)
    texts = renderer.batch.render(render_jobs(messages, tools, spans))
    return rendered_from(renderer, messages, tools, texts, spans, train_on_reasoning)


def rendered_from(renderer: Renderer, messages: list[Message], tools: list[dict] | None, texts: list[str],
                  spans: bool, train_on_reasoning: bool) -> Rendered:
    """The conversation's text and spans from the renders ``render_jobs`` asked for.

    An answer starts where ``messages[:k]`` rendered with the generation prompt ends (that render must be a
    prefix of the whole) and ends after the first end-of-turn marker, searched up to the end of
    ``messages[:k+1]`` rendered alone. Templates that render an answer differently once later turns
    follow (Qwen3's drop the reasoning of earlier turns) give a ``messages[:k+1]`` that is not a prefix of
    the whole; then the answer must end with an end-of-turn marker before the next answer's start.
    """
    full = texts[-1]
    answers = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    if not spans:
        for k in answers:
            check_answer(messages[k], full, 0, len(full), full, k)
        check_inputs_rendered(messages, tools, full)
        return Rendered(full, [(0, len(full))], [])
    prefixes, throughs = texts[: len(answers)], texts[len(answers):]
    rendered = Rendered(full, [], [])
    for n, (k, prefix, through) in enumerate(zip(answers, prefixes, throughs)):
        check_prefix(prefix, full, k, " with add_generation_prompt=True")
        start = len(prefix)
        if full.startswith(through):
            end = answer_end(full, start, len(through), renderer.end_markers)
        else:
            limit = len(prefixes[n + 1]) if n + 1 < len(prefixes) else len(full)
            end = marked_answer_end(full, start, limit, renderer.end_markers, through, k)
        check_answer(messages[k], full, start, end, through, k)
        add_answer_spans(rendered, messages[k], start, end, train_on_reasoning)
    check_inputs_rendered(messages, tools, full)
    return rendered


def marked_answer_end(full: str, start: int, limit: int, markers: tuple[str, ...], through: str, k: int) -> int:
    """The end of an answer that a later turn re-renders: its end-of-turn marker, which must be there."""
    found = [pos + len(marker) for marker in markers if (pos := full.find(marker, start, limit)) >= 0]
    if not found:
        raise not_a_prefix(through, full, k + 1, "")
    return min(found)


def check_answer(message: Message, full: str, start: int, end: int, through: str, k: int) -> None:
    """The answer's span must hold its text, tool calls and reasoning: a template that drops them is refused."""
    answer = full[start:end]
    content = message["content"].strip()
    if content and content not in answer:
        raise DataError(f"messages[{k}] is an answer whose text the chat template does not render as given once the "
                        "conversation goes on (some templates drop or rewrite earlier answers, e.g. cut what precedes "
                        "'</think>'), so its loss mask would be wrong. Use a template that renders earlier answers as "
                        "they are, or split the conversation so that this answer is the last one.")
    for call in message.get("tool_calls", []):
        name = call["function"]["name"]
        if name not in answer:
            raise DataError(f"messages[{k}] calls '{name}', but the chat template does not render the call in the "
                            "answer (a template without tool support ignores 'tool_calls'). Use the model's "
                            "tool-calling chat template (one that renders message.tool_calls).")
    reasoning = message.get("reasoning_content", "").strip()
    if reasoning and reasoning not in answer:
        if reasoning in through[start:]:
            raise DataError(f"messages[{k}] has reasoning_content that the chat template drops once a later user turn "
                            "follows (Qwen3-style templates keep only the reasoning after the last user turn). Split "
                            "the conversation so that each reasoning turn is in the last exchange, or remove "
                            "reasoning_content from the earlier turns.")
        raise DataError(f"messages[{k}] has reasoning_content, but the chat template does not render it (it would be "
                        "silently dropped). Use a template that renders message.reasoning_content (Qwen3, DeepSeek-R1 "
                        "style), or move the reasoning into content.")


def check_inputs_rendered(messages: list[Message], tools: list[dict] | None, full: str) -> None:
    """Tool schemas and tool results must appear in the text: a template may silently skip them."""
    for tool in tools or []:
        name = (tool.get("function") if isinstance(tool.get("function"), dict) else tool)["name"]
        if name not in full:
            raise DataError(f"the row's tools include '{name}', but the chat template does not render tools= (a "
                            "template without tool support ignores them). Use the model's tool-calling chat template.")
    for k, message in enumerate(messages):
        content = content_text(message["content"]).strip()
        if message["role"] == "tool" and content and content not in full:
            raise DataError(f"messages[{k}] is a tool result that the chat template does not render (a template "
                            "without tool support skips the 'tool' role). Use the model's tool-calling chat template.")


def add_answer_spans(rendered: Rendered, message: Message, start: int, end: int, train_on_reasoning: bool) -> None:
    """A weight-0 answer is excluded whole; otherwise it is trained, its reasoning excluded if asked."""
    if message.get("weight") == 0:
        rendered.excluded.append((start, end))
        return
    rendered.trained.append((start, end))
    reasoning = message.get("reasoning_content", "").strip()
    if reasoning and not train_on_reasoning:
        at = rendered.text.find(reasoning, start, end)
        rendered.excluded.append((at, at + len(reasoning)))


def make_labels(tokens: "Tokens", rendered: Rendered, train_on_inputs: bool) -> Any:
    """Labels (an int64 array): the token id on tokens overlapping a trained span (every token with
    ``train_on_inputs``), -100 elsewhere and on every token overlapping an excluded span."""
    import numpy as np

    ids = tokens.ids
    labels = ids.copy() if train_on_inputs else np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if not train_on_inputs:
        for span in rendered.trained:
            where = tokens.token_range(rendered.text, span)
            labels[where] = ids[where]
    for span in rendered.excluded:
        labels[tokens.token_range(rendered.text, span)] = IGNORE_INDEX
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
