"""Experiment trackers: transformers' own callbacks, handed a writer that we create.

transformers 5.17 takes the TensorBoard folder only from an environment variable, which a library must not
write; its `TensorBoardCallback` also accepts a ready `SummaryWriter`, so we make one for the folder given.
Only rank 0 logs. Weights & Biases and MLflow are not supported yet (config.NOT_SUPPORTED_YET).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .config import LoraSFTConfig
from .hardware import is_main_process

TENSORBOARD_HINT = 'pip install "training-hub[tensorboard]" (or pip install tensorboard)'


def tracker_problems(config: LoraSFTConfig) -> list[str]:
    """What would stop a configured tracker, found before any model is loaded or any file written."""
    if config.tensorboard_log_dir is None:
        return []
    problems = []
    if not str(config.tensorboard_log_dir).strip():
        problems.append("tensorboard_log_dir is empty: give a folder for the event files, or None")
    elif Path(config.tensorboard_log_dir).expanduser().is_file():
        problems.append(f"tensorboard_log_dir={config.tensorboard_log_dir!r} is a file: give a folder")
    if importlib.util.find_spec("tensorboard") is None:
        problems.append(f"tensorboard_log_dir={config.tensorboard_log_dir!r}: TensorBoard logging needs the "
                        f"tensorboard package: {TENSORBOARD_HINT}")
    return problems


def tracker_callbacks(config: LoraSFTConfig) -> list[Any]:
    """TrainerCallbacks that log every logging step to the configured trackers (none on ranks other than 0).

    TensorBoard gets what `training_metrics.jsonl` gets (train/loss, train/learning_rate, train/grad_norm, ...,
    and eval/* when evaluating), with the optimizer step as x-axis; the writer is closed when training ends.
    """
    if config.tensorboard_log_dir is None or not is_main_process():
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    writer = SummaryWriter(log_dir=str(Path(config.tensorboard_log_dir).expanduser()))
    return [TensorBoardCallback(tb_writer=writer)]
