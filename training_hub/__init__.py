"""training_hub: one call to fine-tune a causal LM with LoRA or QLoRA.

    from training_hub import lora_sft
    result = lora_sft(model_path="Qwen/Qwen2.5-1.5B-Instruct", data_path="train.jsonl", ckpt_output_dir="out")

Importing this package is light: torch, transformers and Unsloth are imported only when a call needs them.
"""

from .api import load, lora_sft, prepare_dataset
from .checkpoints import TrainingStopped
from .config import ConfigError, LoraSFTConfig
from .export import merge_adapter
from .plot import plot_loss
from .result import TrainingResult

__version__ = "0.1.0"
__all__ = ["lora_sft", "prepare_dataset", "load", "merge_adapter", "plot_loss", "LoraSFTConfig", "ConfigError", "TrainingResult", "TrainingStopped"]
