"""Where a run starts: fresh, or from a complete checkpoint of the same run. One `Resume` object always exists.

It owns the checks (the checkpoint's settings and data must match the run's), the preparation of the output
folder for a resumed run (checkpoints it will not use are set aside, the metrics file is cut back), the
Trainer's `resume_from_checkpoint` argument and the token count the checkpoint had reached.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoints
from .checkpoints import checkpoint_step, is_complete, list_checkpoints, read_marker
from .config import ConfigError, LoraSFTConfig
from .distributed import RENDEZVOUS_ADDRESS_FIELDS
from .hardware import is_main_process
from .outputs import COMPLETE_MARKER, FINAL_MARKER, METRICS_FILE, TRAINER_STATE

logger = logging.getLogger("training_hub")

# Settings that may differ between a run and its resumption: length, saving, logging, and where things are
# read from (the data itself is compared by fingerprint).
MAY_CHANGE_ON_RESUME = frozenset({
    "max_steps", "num_epochs", "save_steps", "save_total_limit", "logging_steps", "save_merged", "save_samples",
    "checkpoint_at_epoch", "accelerate_full_state_at_epoch", "report_to",
    "resume_from_checkpoint", "overwrite_output_dir", "callbacks", "dry_run", "data_path", "data_output_dir",
    "dataloader_num_workers", "eval_data_path", "wandb_project", "wandb_entity", "wandb_run_name", "tensorboard_log_dir",
    "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name",
    # Phase 1's settings are checked against its own record (pre_lora.py); once it is complete they may be left out.
    "pre_lora_data_path", "pre_lora_max_steps", "pre_lora_num_epochs", "pre_lora_learning_rate",
    *RENDEZVOUS_ADDRESS_FIELDS,  # where the nodes meet, and each node's own node_rank, change nothing trained
})


@dataclass
class Resume:
    """A fresh start (`checkpoint` None) or a complete checkpoint to continue from, plus what to set aside."""

    checkpoint: Path | None = None
    step: int = 0
    set_aside: list[Path] = field(default_factory=list)  # incomplete checkpoints, and complete ones newer than ours
    requested: bool = False  # resume_from_checkpoint was given (the folder may hold the run's earlier work)

    @property
    def trainer_argument(self) -> str | None:
        """The Trainer's `resume_from_checkpoint`."""
        return str(self.checkpoint) if self.checkpoint is not None else None

    def tokens_seen(self) -> int:
        """Tokens the run had seen at the checkpoint (0 when fresh); read before training, as rotation may delete it."""
        if self.checkpoint is None:
            return 0
        state = json.loads((self.checkpoint / TRAINER_STATE).read_text())
        return int(state.get("num_input_tokens_seen") or 0)

    def reached(self, max_steps: int | None) -> bool:
        """The checkpoint is already at `max_steps`: nothing is left to train."""
        return self.checkpoint is not None and max_steps is not None and self.step >= max_steps

    def config_problems(self, config_dict: dict[str, Any]) -> list[str]:
        """Settings that differ from the checkpoint's run (only length, saving and logging may change)."""
        if self.checkpoint is None:
            return []
        # A parameter added since the checkpoint was written had its default then.
        saved = {**json.loads(json.dumps(LoraSFTConfig.defaults(), default=str)), **read_marker(self.checkpoint)["config"]}
        now = json.loads(json.dumps(config_dict, default=str))
        changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in sorted(now)
                   if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != now[k]]
        if not changed:
            return []
        return [f"resume_from_checkpoint: {self.checkpoint} was trained with other settings ({'; '.join(changed)}). "
                "Only max_steps, num_epochs and the save/log settings may change when resuming; start a new run "
                "(optionally from its adapter: lora_adapter=<checkpoint folder>) to change the others"]

    def data_problems(self, data_fingerprint: str) -> list[str]:
        if self.checkpoint is None:
            return []
        saved = read_marker(self.checkpoint).get("data_fingerprint")
        if saved == data_fingerprint:
            return []
        return [f"resume_from_checkpoint: the training data differs from the data {self.checkpoint} was trained on "
                f"(fingerprint {saved} then, {data_fingerprint} now); resuming would not continue the same run"]

    def prepare_output(self, out: Path) -> None:
        """Set aside the checkpoints not used and cut the metrics back to the checkpoint's step (rank 0)."""
        if not self.requested or not is_main_process():
            return
        for notice in set_aside(self.set_aside):
            logger.info(notice)
        dropped = checkpoints.truncate_metrics(out / METRICS_FILE, self.step)
        start = (f"resuming from {self.checkpoint} (step {self.step})" if self.checkpoint is not None
                 else "no checkpoint yet: starting fresh")
        logger.info(start + (f"; {dropped} metric rows after it removed" if dropped else ""))


def find_resume(out: Path, resume_from_checkpoint: bool | str | None) -> Resume:
    """Read-only: which checkpoint `resume_from_checkpoint` means (a fresh `Resume` when not resuming).

    True needs a complete checkpoint; "auto" takes the newest complete one or starts fresh; a path means
    that checkpoint, which must exist and be complete.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return Resume()
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint != "auto":
        return _explicit(out, Path(resume_from_checkpoint))
    everything = list_checkpoints(out)
    complete = [p for p in everything if is_complete(p)]
    if complete:
        chosen = complete[-1]
        return Resume(chosen, checkpoint_step(chosen), [p for p in everything if p != chosen and not is_complete(p)], True)
    if resume_from_checkpoint is True:
        raise ConfigError([f"resume_from_checkpoint=True but {str(out)!r} holds no complete checkpoint "
                           f"({_describe(everything)}); pass resume_from_checkpoint='auto' to start fresh when "
                           "there is none"])
    if (out / FINAL_MARKER).exists():
        raise ConfigError([f"resume_from_checkpoint='auto': {str(out)!r} holds a finished adapter but no complete "
                           "checkpoint to continue from; choose a new folder or pass overwrite_output_dir=True"])
    return Resume(None, 0, everything, True)


def _describe(found: list[Path]) -> str:
    if not found:
        return "no checkpoint-N folder"
    return f"only incomplete ones: {', '.join(p.name for p in found)}"


def _explicit(out: Path, path: Path) -> Resume:
    if not path.is_dir():
        raise ConfigError([f"resume_from_checkpoint={str(path)!r}: no such folder"])
    step = checkpoint_step(path)
    if step is None or not (path / TRAINER_STATE).is_file():
        raise ConfigError([f"resume_from_checkpoint={str(path)!r} is not a checkpoint-N folder written by training"])
    if not is_complete(path):
        raise ConfigError([f"resume_from_checkpoint={str(path)!r} is incomplete (no {COMPLETE_MARKER}: the run was "
                           "stopped while saving it); pass resume_from_checkpoint=True to take the newest complete one"])
    later = [p for p in list_checkpoints(out) if checkpoint_step(p) > step or (checkpoint_step(p) < step and not is_complete(p))]
    return Resume(path, step, later if path.parent.resolve() == out.resolve() else [], True)


def set_aside(paths: list[Path]) -> list[str]:
    """Rename checkpoints resume will not use to `checkpoint-N.set-aside-<time>` (never deleted). Returns notices."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    notices = []
    for path in paths:
        target = path.with_name(f"{path.name}.set-aside-{stamp}")
        os.replace(path, target)
        why = "complete but newer than the checkpoint resumed from" if is_complete(target) else "incomplete: the run stopped while saving it"
        notices.append(f"set aside {path.name} ({why}) as {target.name}")
    return notices
