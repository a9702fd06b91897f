"""Checkpoints that are never half-written, and the guards that stop a run cleanly (SIGTERM/SIGINT, a
non-finite loss). Which checkpoint a run resumes from is `resume.py`'s.

The Hugging Face Trainer writes `checkpoint-N/` in place (adapter, optimizer, scheduler, RNG states,
trainer_state.json). When it has finished, `on_save` runs and we write `checkpoint-N/training_hub_complete.json`
(temp file + rename): a checkpoint without it was interrupted while being written, and resume never picks
it. The marker also records what must not change across a resume (the config and the data fingerprint).
Only complete checkpoints count towards `save_total_limit` (we rotate them ourselves, after the marker).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .files import write_atomic
from .hardware import is_main_process
from .outputs import CHECKPOINT_PREFIX, COMPLETE_MARKER, PHASE_PRE_LORA, TRAINER_STATE, replace_final_adapter

logger = logging.getLogger("training_hub")
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

# Consecutive non-finite gradient norms after which an fp16 run (whose loss scaler skips such steps) has diverged.
FP16_SKIPPED_STEPS_LIMIT = 10
# Logged steps in a row after which exactly-zero gradients (a flat loss: nothing is learned any more) or exploded
# adapter weights stop the run. "Exploded": the largest |weight| is this many times what it was at the start (and
# above the floor, so that a start near zero does not count); training at sane learning rates moves LoRA weights
# by well under 2x (measured: 0.125 -> 0.126 over 15 steps at 2e-4; 1e6 -> 9e9 in 2 steps at learning_rate=1e6).
STALLED_LOGGED_STEPS = 5
EXPLODED_WEIGHT_FACTOR = 1000.0
EXPLODED_WEIGHT_FLOOR = 100.0


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


def data_fingerprint(raw_fingerprint: str, summary: dict[str, Any]) -> str:
    """The training data's identity: the rows' content hash plus what tokenization kept (counts, template note)."""
    import hashlib

    blob = json.dumps({"rows": raw_fingerprint, "tokenized": summary}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- the metrics file of a resumed run ---------------------------------------------------------------------

def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric rows after `step` (and end-of-run summaries) so a resumed run appends without duplicates.

    A last line torn by a kill mid-write is dropped with a notice; a damaged line before it is an error naming it.
    Returns the number of rows dropped."""
    if not path.exists():
        return 0
    rows = read_metric_rows(path)
    kept = [row for row in rows if _keep_row(row, step)]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return len(rows) - len(kept)


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of training_metrics.jsonl (none when it does not exist yet); a torn last line (the run was killed
    while writing it) is left out with a notice, any other line that is not JSON is a ConfigError naming path:line.
    The one reader of that file: resume, the console's summary, the loss plot and the model card use it."""
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
             if line.strip()]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number != lines[-1][0]:
                raise ConfigError([f"{path}:{number} is not a JSON metrics row ({error.msg}); delete or repair that "
                                   "line"]) from None
            logger.warning("%s:%d was cut off when the run was stopped (%r); dropping that line", path, number, line[:80])
    return rows


def _keep_row(row: dict[str, Any], step: int) -> bool:
    if row.get("phase") == PHASE_PRE_LORA:  # a finished phase 1's rows: phase 2 resumes after them
        return True
    return row.get("step", 0) <= step and "train_loss" not in row  # train_loss: the end-of-run summary


def resumed_train_loss(metrics_path: Path) -> float | None:
    """Mean training loss over all steps from the metrics file (each logged loss averages the steps since the last)."""
    total, last, steps = 0.0, 0, 0
    for row in read_metric_rows(metrics_path):
        if "loss" in row and isinstance(row["loss"], (int, float)) and row.get("phase") != PHASE_PRE_LORA:
            total += row["loss"] * (row["step"] - last)
            steps += row["step"] - last
            last = row["step"]
    return total / steps if steps else None


# What a checkpoint holds besides the adapter and tokenizer; under FSDP2 accelerate adds the gathered trainable
# weights and optimizer state (pytorch_model_fsdp.bin, optimizer.bin) it resumes from.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", TRAINER_STATE, "training_args.bin",
                        "README.md", COMPLETE_MARKER, "pytorch_model_fsdp.bin", "optimizer.bin")


def copy_adapter(checkpoint: Path, out: Path, step: int | None) -> None:
    """Make a checkpoint's adapter and tokenizer the final ones in `out` (temp folder, then moved in)."""
    def fill(tmp: Path) -> None:
        for item in checkpoint.iterdir():
            if item.is_file() and item.name not in TRAINING_STATE_FILES and not item.name.startswith("rng_state"):
                shutil.copy2(item, tmp / item.name)

    replace_final_adapter(out, fill, step)


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


# ---- a full disk -------------------------------------------------------------------------------------------

# torch.save reports a full disk as "unexpected pos ..." or "[Errno 22] Invalid argument" (the errno is lost), so a
# failed write with less free space than this is taken for a full disk too.
DISK_NEARLY_FULL_BYTES = 64 * 2**20


def nearest_existing(folder: Path) -> Path:
    """`folder`, or the closest folder above it that exists (where it would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def disk_full_message(error: BaseException, folder: Path) -> str | None:
    """The message for `error`, raised while writing into `folder`, when it came from a full disk; else None."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if getattr(error, "errno", None) != errno.ENOSPC and free >= DISK_NEARLY_FULL_BYTES:
        return None
    complete = [p for p in list_checkpoints(folder) if is_complete(p)]
    last = f"the last complete checkpoint, {complete[-1].name}, is kept" if complete else "no checkpoint was complete yet"
    detail = str(error).splitlines()[0] if str(error) else ""
    return (f"No space left on device while writing into {folder}: {format_bytes(free)} free ({type(error).__name__}: "
            f"{detail}). Free space or move ckpt_output_dir to a larger disk; {last}, and resume_from_checkpoint=True "
            "continues from it")


class TrainingStopped(RuntimeError):
    """Training stopped before the end: a signal (checkpoint saved) or divergence (last good checkpoint kept)."""


class DiskFull(TrainingStopped):
    """Writing into the output folder failed because its disk is full (the last complete checkpoint is kept)."""


@contextmanager
def disk_full_errors(folder: Path):
    """Turn an error raised by a write into `folder` on a full disk into DiskFull naming the folder and the free space."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        message = disk_full_message(error, folder)
        if message is None:
            raise
        raise DiskFull(message) from error


# ---- stopping cleanly --------------------------------------------------------------------------------------

@dataclass
class StopRequest:
    """Why the run must stop, set by the signal handler or the divergence checks; read by the guard callback."""

    signal_name: str | None = None
    bad_loss: str | None = None
    bad_grad: str | None = None
    bad_weights: str | None = None
    fp16_skipped: int = 0
    zero_grad_steps: int = 0
    exploded_steps: int = 0
    start_weight_scale: float | None = None

    @property
    def diverged(self) -> str | None:
        """What went non-finite first, the loss being the most telling (the weights are checked before each save)."""
        return self.bad_loss or self.bad_grad or self.bad_weights

    def note_loss(self, loss: float, step: int) -> None:
        if self.bad_loss is None and not math.isfinite(loss):
            self.bad_loss = f"the training loss is {loss} at step {step}"

    def note_grad_norm(self, norm: float | None, step: int, loss_scaler: bool) -> None:
        self.zero_grad_steps = self.zero_grad_steps + 1 if norm == 0.0 else 0
        if self.bad_grad is None and self.zero_grad_steps >= STALLED_LOGGED_STEPS:
            self.bad_grad = (f"the gradient norm was exactly 0 for {self.zero_grad_steps} logged steps in a row up to step "
                             f"{step}: the adapter no longer learns (a flat loss)")
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

    def note_weight_scale(self, scale: float, step: int) -> None:
        """`scale`: the largest |adapter weight|; the first value noted (at the start of training) is the reference."""
        if self.start_weight_scale is None:
            self.start_weight_scale = scale
            return
        limit = max(EXPLODED_WEIGHT_FACTOR * self.start_weight_scale, EXPLODED_WEIGHT_FLOOR)
        self.exploded_steps = self.exploded_steps + 1 if math.isfinite(scale) and scale > limit else 0
        if self.bad_weights is None and self.exploded_steps >= STALLED_LOGGED_STEPS:
            self.bad_weights = (f"the largest adapter weight was above {limit:.3g} ({EXPLODED_WEIGHT_FACTOR:g}x its "
                                f"{self.start_weight_scale:.3g} at the start) for {self.exploded_steps} logged steps in a "
                                f"row, {scale:.3g} at step {step}: the weights exploded")

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
            logger.warning(f"{stop.signal_name} received: saving a checkpoint at the end of this step, then "
                           "stopping (send it again to stop at once)")

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


def _weight_scale(model) -> float:
    """The largest |value| among the trainable (adapter) weights, in one device sync."""
    import torch

    with torch.no_grad():
        peaks = [p.detach().abs().amax().float() for p in model.parameters() if p.requires_grad and p.numel()]
        return float(torch.stack([peak.to(peaks[0].device) for peak in peaks]).max()) if peaks else 0.0


def guard_callback(out: Path, stop: StopRequest, config_dict: dict[str, Any], data_fingerprint: str,
                   save_total_limit: int | None, loss_scaler: bool):
    """The TrainerCallback that marks checkpoints complete, rotates them, and turns stop requests into a save+stop
    (signal) or a stop without saving (divergence)."""
    from transformers import TrainerCallback

    class CheckpointGuard(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                stop.note_weight_scale(_weight_scale(model), state.global_step)

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

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                stop.note_loss(float(logs["loss"]), state.global_step)
            if "grad_norm" in logs:
                stop.note_grad_norm(float(logs["grad_norm"]), state.global_step, loss_scaler)
            if "loss" in logs and model is not None:
                stop.note_weight_scale(_weight_scale(model), state.global_step)
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
        return (f"Training diverged: {stop.diverged}. Usual causes: {'; '.join(causes)}. Nothing after it was saved; "
                f"{last}. Start a new run from it with lora_adapter=<that folder> and a lower learning rate, or "
                "resume it as is with resume_from_checkpoint=True.")
    if stop.signal_name is not None:
        return (f"Training stopped by {stop.signal_name}; {last}. Continue with resume_from_checkpoint=True "
                f"(same ckpt_output_dir={str(out)!r}).")
    return None
