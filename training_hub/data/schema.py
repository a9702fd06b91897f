"""The data types shared by the data pipeline: one message shape, one example shape, the results.

Nothing heavy is imported here: ``datasets`` appears only in a type annotation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

if TYPE_CHECKING:
    import datasets

DatasetType = Literal[
    "auto", "messages", "chat_template", "alpaca", "sharegpt", "prompt_completion", "text", "passthrough"
]
TruncationMode = Literal["truncate", "drop", "error"]
DATASET_TYPES: tuple[str, ...] = get_args(DatasetType)
TRUNCATION_MODES: tuple[str, ...] = get_args(TruncationMode)


class DataError(ValueError):
    """A problem with the training data: the message names where (file:line or row), the field and the fix."""


class ToolFunction(TypedDict):
    name: str
    arguments: dict[str, Any]  # parsed: chat templates write it with ``tojson``


class ToolCall(TypedDict, total=False):
    """One call an assistant turn makes, in the OpenAI shape (``id`` only when the data gives one)."""

    type: Literal["function"]
    function: ToolFunction
    id: str


class Message(TypedDict, total=False):
    """The one message shape every chat format is converted to; it is what the chat template receives.

    ``role`` and ``content`` are always set (content may be empty on an assistant turn with tool calls and
    on a tool turn); for a vision-language model a user turn's content may be a list of text and image parts
    (``{"type": "text", "text"}``, ``{"type": "image", "image": path or data URL}``). The optional keys are
    set only when the data gives them: ``tool_calls`` and ``reasoning_content`` on assistant turns,
    ``tool_call_id`` and ``name`` on tool turns (``name`` also on others), ``weight`` (0) on assistant turns
    that are context only.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict]
    tool_calls: list[ToolCall]
    tool_call_id: str
    name: str
    reasoning_content: str
    weight: int


@dataclass(slots=True)
class Example:
    """One validated, normalized training example.

    Exactly one of ``messages`` (chat formats), ``text`` (``text`` format) or ``input_ids``
    (``passthrough``; ``labels`` optional) is set. ``tools`` (function schemas, handed to the chat
    template as ``tools=``) only with ``messages``.
    """

    origin: str
    messages: list[Message] | None = None
    tools: list[dict] | None = None
    text: str | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None


@dataclass
class LoadedData:
    """The result of :func:`training_hub.data.load_examples`."""

    examples: list[Example]
    format: str
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class DataSummary:
    """What tokenization kept, cut and dropped; printed before training."""

    format: str
    rows_in: int
    rows_out: int
    rows_truncated: int
    rows_dropped_too_long: int
    rows_dropped_no_supervised_tokens: int
    tokens_min: int
    tokens_median: int
    tokens_max: int
    tokens_total: int
    supervised_tokens_total: int
    template_note: str
    max_seq_len: int = 0
    truncation: str = "truncate"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        share = 100.0 * self.supervised_tokens_total / self.tokens_total if self.tokens_total else 0.0
        lines = [
            f"Data: {self.rows_out:,} of {self.rows_in:,} rows kept (format {self.format}; {self.template_note})",
            f"Tokens per row: min {self.tokens_min:,}, median {self.tokens_median:,}, max {self.tokens_max:,}; "
            f"total {self.tokens_total:,}, {share:.1f}% with loss",
            f"Longer than max_seq_len={self.max_seq_len:,}: {self.rows_truncated:,} truncated, "
            f"{self.rows_dropped_too_long:,} dropped; {self.rows_dropped_no_supervised_tokens:,} dropped with no "
            f"supervised token",
        ]
        return "\n".join(lines)


@dataclass
class TokenizedData:
    """Token ids and labels (-100 where no loss), one row per kept example, in the input order.

    It behaves as the tokenized ``datasets.Dataset`` it holds: ``len(data)``, ``data[0]`` (a row),
    ``data["input_ids"]`` (a column), ``data[2:5]``, iteration, and every other Dataset attribute
    (``column_names``, ``to_list()``, ``select(...)``, ...). ``summary`` says what was kept, cut and dropped;
    ``dataset`` is the Dataset itself.
    """

    dataset: "datasets.Dataset"
    summary: DataSummary
    from_cache: bool = False
    cache_path: str | None = field(default=None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key]

    def __iter__(self):
        return iter(self.dataset)

    def __getattr__(self, name: str):
        # Only reached for names the dataclass lacks; private names and a half-built object stay errors.
        if name.startswith("_") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.dataset, name)
