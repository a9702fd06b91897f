"""The data settings, in one place: what `lora_sft`, `prepare_dataset` and the loaders share, validated once.

Their defaults and documentation are `LoraSFTConfig`'s; `prepare_dataset`'s signature repeats the defaults for
readers and IDEs, and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import TRUNCATION_MODES

MIN_SEQ_LEN = 2  # a row needs at least one input token and one token to predict


@dataclass(frozen=True)
class DataSettings:
    """How rows are read (format, column names) and tokenized (length, masking, cache)."""

    dataset_type: str
    field_messages: str
    field_instruction: str
    field_input: str
    field_output: str
    max_seq_len: int
    train_on_inputs: bool
    train_on_reasoning: bool
    truncation: str
    data_output_dir: str | None

    @classmethod
    def from_config(cls, config: Any) -> "DataSettings":
        """The data settings of a `LoraSFTConfig` (or anything with the same attribute names)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    def loading(self) -> dict[str, Any]:
        """Keyword arguments of `load_examples`."""
        return dict(dataset_type=self.dataset_type, field_messages=self.field_messages,
                    field_instruction=self.field_instruction, field_input=self.field_input,
                    field_output=self.field_output)

    def tokenizing(self) -> dict[str, Any]:
        """Keyword arguments of `tokenize_examples` (besides the tokenizer)."""
        return dict(max_seq_len=self.max_seq_len, train_on_inputs=self.train_on_inputs,
                    train_on_reasoning=self.train_on_reasoning, truncation=self.truncation, cache_dir=self.data_output_dir)


def settings_problems(max_seq_len: Any, truncation: Any) -> list[str]:
    """The value rules of the data settings, used by `LoraSFTConfig` and by the data functions alike."""
    problems = []
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < MIN_SEQ_LEN:
        problems.append(f"max_seq_len={max_seq_len!r}: use an int >= {MIN_SEQ_LEN}")
    if truncation not in TRUNCATION_MODES:
        problems.append(f"truncation={truncation!r}: use one of {', '.join(TRUNCATION_MODES)}")
    return problems
