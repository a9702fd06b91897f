"""What a training call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingResult:
    """The outcome of `lora_sft`. Also readable like the reference's dict: `result["model"]`.

    Attributes:
        model: the trained PeftModel (None when training ran in other processes: see `load_model()`).
        tokenizer: the tokenizer saved with the adapter.
        trainer: the TRL SFTTrainer that trained it.
        output_dir: `ckpt_output_dir`; holds the adapter, tokenizer, run_config.json, training_metrics.jsonl.
        adapter_path: folder of the final PEFT adapter (== output_dir).
        metrics_path: the training_metrics.jsonl file.
        config_path: the run_config.json file (resolved config, plan, data summary, versions).
        metrics: final figures: train_loss, train_runtime, tokens_per_second, num_tokens, global_step, ...
        plan: the hardware-dependent choices (dtype, batch, packing, checkpointing, optimizer) as a dict.
        data_summary: rows, format, token counts, supervised share, truncated/dropped rows, as a dict.
    """

    output_dir: Path
    adapter_path: Path
    metrics_path: Path
    config_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    data_summary: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    trainer: Any = None

    def load_model(self, device: str | None = None):
        """Load the trained adapter with its base model (e.g. after a run in worker processes, where `model` is
        None); fills `model` and `tokenizer` and returns (model, tokenizer)."""
        from .api import load

        self.model, self.tokenizer = load(self.adapter_path, device=device)
        return self.model, self.tokenizer

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return self.__dataclass_fields__.keys()
