"""Checkpoints that are never half-written, resume that continues the same run, and the guards that stop a
run cleanly (SIGTERM/SIGINT, a non-finite loss).

The Hugging Face Trainer writes `checkpoint-N/` in place (adapter, optimizer, scheduler, RNG states,
trainer_state.json). When it has finished, `on_save` runs and we write `checkpoint-N/training_hub_complete.json`
(temp file + rename): a checkpoint without it was interrupted while being written, and resume never picks
it. The marker also records what must not change across a resume (the config and the data fingerprint).
Only complete checkpoints count towards `save_total_limit` (we rotate them ourselves, after the marker).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .files import replace_files_in, write_atomic
from .hardware import is_main_process
from .models.adapters import ADAPTER_WEIGHTS

COMPLETE_MARKER = "training_hub_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

# Settings that may differ between a run and its resumption (DECISIONS 11): length, saving, logging, and
# where things are read from (the data itself is compared by fingerprint).
MAY_CHANGE_ON_RESUME = frozenset({
    "max_steps", "num_epochs", "save_steps", "save_total_limit", "logging_steps", "save_merged", "save_samples",
    "checkpoint_at_epoch", "accelerate_full_state_at_epoch",
    "resume_from_checkpoint", "overwrite_output_dir", "callbacks", "dry_run", "data_path", "data_output_dir",
    "dataloader_num_workers", "eval_data_path", "wandb_project", "wandb_entity", "wandb_run_name", "tensorboard_log_dir",
    "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "report_to",
})
# Consecutive non-finite gradient norms after which an fp16 run (whose loss scaler skips such steps) has diverged.
FP16_SKIPPED_STEPS_LIMIT = 10


# ---- finding and validating checkpoints --------------------------------------------------------------------

def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(out: Path) -> list[Path]:
    """`checkpoint-N` folders of `out`, oldest step first (complete or not)."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def read_marker(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


@dataclass
class ResumePoint:
    """Where a run continues from: a complete checkpoint (or None to start fresh) and what to set aside."""

    checkpoint: Path | None
    step: int = 0
    set_aside: list[Path] = field(default_factory=list)  # incomplete checkpoints, and complete ones newer than ours


def find_resume_point(out: Path, resume: bool | str | None) -> ResumePoint | None:
    """Read-only: which checkpoint `resume_from_checkpoint` means. None when not resuming.

    True needs a complete checkpoint; "auto" takes the newest complete one or starts fresh; a path means
    that checkpoint, which must exist and be complete.
    """
    if resume is None or resume is False:
        return None
    if isinstance(resume, str) and resume != "auto":
        return _explicit_resume_point(out, Path(resume))
    everything = list_checkpoints(out)
    complete = [p for p in everything if is_complete(p)]
    if complete:
        chosen = complete[-1]
        return ResumePoint(chosen, checkpoint_step(chosen), [p for p in everything if p != chosen and not is_complete(p)])
    if resume is True:
        raise ConfigError([f"resume_from_checkpoint=True but {str(out)!r} holds no complete checkpoint "
                           f"({_describe(everything)}); pass resume_from_checkpoint='auto' to start fresh when "
                           "there is none"])
    if (out / ADAPTER_WEIGHTS).exists():
        raise ConfigError([f"resume_from_checkpoint='auto': {str(out)!r} holds a finished adapter but no complete "
                           "checkpoint to continue from; choose a new folder or pass overwrite_output_dir=True"])
    return ResumePoint(None, 0, everything)


def _describe(checkpoints: list[Path]) -> str:
    if not checkpoints:
        return "no checkpoint-N folder"
    return f"only incomplete ones: {', '.join(p.name for p in checkpoints)}"


def _explicit_resume_point(out: Path, path: Path) -> ResumePoint:
    if not path.is_dir():
        raise ConfigError([f"resume_from_checkpoint={str(path)!r}: no such folder"])
    step = checkpoint_step(path)
    if step is None or not (path / "trainer_state.json").is_file():
        raise ConfigError([f"resume_from_checkpoint={str(path)!r} is not a checkpoint-N folder written by training"])
    if not is_complete(path):
        raise ConfigError([f"resume_from_checkpoint={str(path)!r} is incomplete (no {COMPLETE_MARKER}: the run was "
                           "stopped while saving it); pass resume_from_checkpoint=True to take the newest complete one"])
    later = [p for p in list_checkpoints(out) if checkpoint_step(p) > step or (checkpoint_step(p) < step and not is_complete(p))]
    return ResumePoint(path, step, later if path.parent.resolve() == out.resolve() else [])


def data_fingerprint(raw_fingerprint: str, summary: dict[str, Any]) -> str:
    """The training data's identity: the rows' content hash plus what tokenization kept (counts, template note)."""
    import hashlib

    blob = json.dumps({"rows": raw_fingerprint, "tokenized": summary}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_config_problems(point: ResumePoint, config_dict: dict[str, Any]) -> list[str]:
    """Settings that differ from the checkpoint's run (only length, saving and logging may change)."""
    if point.checkpoint is None:
        return []
    saved = read_marker(point.checkpoint)["config"]
    now = json.loads(json.dumps(config_dict, default=str))
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in sorted(now)
               if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != now[k]]
    if not changed:
        return []
    return [f"resume_from_checkpoint: {point.checkpoint} was trained with other settings ({'; '.join(changed)}). "
            "Only max_steps, num_epochs and the save/log settings may change when resuming; start a new run "
            "(optionally from its adapter: lora_adapter=<checkpoint folder>) to change the others"]


def resume_data_problems(point: ResumePoint, data_fingerprint: str) -> list[str]:
    if point.checkpoint is None:
        return []
    saved = read_marker(point.checkpoint).get("data_fingerprint")
    if saved == data_fingerprint:
        return []
    return [f"resume_from_checkpoint: the training data differs from the data {point.checkpoint} was trained on "
            f"(fingerprint {saved} then, {data_fingerprint} now); resuming would not continue the same run"]


# ---- preparing the output folder for a resumed run ---------------------------------------------------------

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


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric rows after `step` (and end-of-run summaries) so a resumed run appends without duplicates.

    Returns the number of rows dropped."""
    if not path.exists():
        return 0
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if _keep_row(json.loads(line), step)]
    write_atomic(path, "".join(line + "\n" for line in kept))
    return len(rows) - len(kept)


def _keep_row(row: dict[str, Any], step: int) -> bool:
    return row.get("step", 0) <= step and "train_loss" not in row  # train_loss: the end-of-run summary


def resumed_train_loss(metrics_path: Path) -> float | None:
    """Mean training loss over all steps from the metrics file (each logged loss averages the steps since the last)."""
    total, last, steps = 0.0, 0, 0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" in row and isinstance(row["loss"], (int, float)):
            total += row["loss"] * (row["step"] - last)
            steps += row["step"] - last
            last = row["step"]
    return total / steps if steps else None


TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                        "README.md", COMPLETE_MARKER)


def copy_adapter(checkpoint: Path, out: Path) -> None:
    """Make a checkpoint's adapter and tokenizer the final ones in `out` (temp folder, then moved in)."""
    def fill(tmp: Path) -> None:
        for item in checkpoint.iterdir():
            if item.is_file() and item.name not in TRAINING_STATE_FILES and not item.name.startswith("rng_state"):
                shutil.copy2(item, tmp / item.name)

    replace_files_in(out, fill)


# ---- marking, rotating -------------------------------------------------------------------------------------

def mark_complete(checkpoint: Path, step: int, config_dict: dict[str, Any], data_fingerprint: str) -> None:
    marker = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_fingerprint": data_fingerprint,
              "files": sorted(p.name for p in checkpoint.iterdir()), "config": config_dict}
    write_atomic(checkpoint / COMPLETE_MARKER, json.dumps(marker, indent=2, default=str))


def rotate(out: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (incomplete ones are left for resume to set aside)."""
    if limit is None:
        return
    complete = [p for p in list_checkpoints(out) if is_complete(p)]
    for old in complete[:-limit]:
        (old / COMPLETE_MARKER).unlink()  # first, so a kill during the deletion leaves an incomplete folder
        shutil.rmtree(old)


# ---- stopping cleanly --------------------------------------------------------------------------------------

class TrainingStopped(RuntimeError):
    """Training stopped before the end: a signal (checkpoint saved) or divergence (last good checkpoint kept)."""


@dataclass
class StopRequest:
    """Why the run must stop, set by the signal handler or the divergence checks; read by the guard callback."""

    signal_name: str | None = None
    bad_loss: str | None = None
    bad_grad: str | None = None
    bad_weights: str | None = None
    fp16_skipped: int = 0

    @property
    def diverged(self) -> str | None:
        """What went non-finite first, the loss being the most telling (the weights are checked before each save)."""
        return self.bad_loss or self.bad_grad or self.bad_weights

    def note_loss(self, loss: float, step: int) -> None:
        if self.bad_loss is None and not math.isfinite(loss):
            self.bad_loss = f"the training loss is {loss} at step {step}"

    def note_grad_norm(self, norm: float | None, step: int, loss_scaler: bool) -> None:
        if norm is None or math.isfinite(norm):
            self.fp16_skipped = 0
            return
        self.fp16_skipped += 1
        if self.bad_grad is not None:
            return
        if not loss_scaler:
            self.bad_grad = f"the gradient norm is {norm} at step {step}"
        elif self.fp16_skipped >= FP16_SKIPPED_STEPS_LIMIT:
            self.bad_grad = f"the gradient norm was non-finite for {self.fp16_skipped} logged steps in a row up to step {step}"

    def note_weights(self, finite: bool, step: int) -> None:
        if self.bad_weights is None and not finite:
            self.bad_weights = f"the adapter weights are non-finite after step {step}"


@contextmanager
def stop_on_signals(stop: StopRequest):
    """While training, SIGTERM/SIGINT ask for a checkpoint at the end of the current step, then a stop.

    The previous handlers come back afterwards, and right after the first signal, so a second one acts as before
    (e.g. Ctrl-C twice stops at once; the last complete checkpoint is kept). Outside the main thread nothing is
    installed (Python allows handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        stop.signal_name = signal.Signals(signum).name
        signal.signal(signum, previous[signum])
        if is_main_process():
            print(f"training_hub: {stop.signal_name} received: saving a checkpoint at the end of this step, then "
                  "stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is true on any rank (signals reach ranks at different steps; all must stop
    together). One all-reduce for all the flags."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in values.tolist())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _weights_finite(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def guard_callback(out: Path, stop: StopRequest, config_dict: dict[str, Any], data_fingerprint: str,
                   save_total_limit: int | None, loss_scaler: bool):
    """The TrainerCallback that marks checkpoints complete, rotates them, and turns stop requests into a save+stop
    (signal) or a stop without saving (divergence)."""
    from transformers import TrainerCallback

    class CheckpointGuard(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            signalled, diverged = _any_rank(stop.signal_name is not None, stop.diverged is not None)
            if signalled:
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:  # the weights' verdict is reduced over all ranks, so stop.diverged agrees
                (bad_weights,) = _any_rank(not _weights_finite(model))
                stop.note_weights(not bad_weights, state.global_step)
            if diverged or stop.diverged is not None:
                control.should_save = False  # never checkpoint a non-finite state
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                stop.note_loss(float(logs["loss"]), state.global_step)
            if "grad_norm" in logs:
                stop.note_grad_norm(float(logs["grad_norm"]), state.global_step, loss_scaler)
            if stop.diverged is not None:
                control.should_save = False
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank has written its RNG state
            if is_main_process():
                checkpoint = out / f"checkpoint-{state.global_step}"
                mark_complete(checkpoint, state.global_step, config_dict, data_fingerprint)
                rotate(out, save_total_limit)

    return CheckpointGuard()


def stopped_message(stop: StopRequest, out: Path, learning_rate: float, dtype: str) -> str | None:
    """The error for a run that stopped early, or None when it ran to the end."""
    complete = [p for p in list_checkpoints(out) if is_complete(p)]
    last = f"the last complete checkpoint is {complete[-1]}" if complete else "no checkpoint was saved yet"
    if stop.diverged is not None:
        causes = [f"a learning rate too high (learning_rate={learning_rate:g})"]
        if dtype == "float16":
            causes.append("fp16 overflow (use bf16 where the GPU has it)")
        causes.append("broken data (a row with extreme values)")
        return (f"Training diverged: {stop.diverged}. Usual causes: {'; '.join(causes)}. Nothing non-finite was saved; "
                f"{last}. Start a new run from it with lora_adapter=<that folder> and a lower learning rate, or "
                "resume it as is with resume_from_checkpoint=True.")
    if stop.signal_name is not None:
        return (f"Training stopped by {stop.signal_name}; {last}. Continue with resume_from_checkpoint=True "
                f"(same ckpt_output_dir={str(out)!r}).")
    return None
