"""The output folder (`ckpt_output_dir`): every file name in it, its checks, the final save, and the result.

What a finished run leaves:
    adapter_config.json, adapter_model.safetensors   the PEFT adapter (top level: `load()` and vLLM read it)
    tokenizer files, chat_template.jinja             the tokenizer the data was tokenized with
    run_config.json                                  resolved config, plan, data summary, versions, metrics
    training_metrics.jsonl                           one JSON object per logging step, written live
    checkpoint-N/                                    resumable checkpoints, marked complete when fully written
    merged/                                          with save_merged: the LoRA folded into the 16-bit base
    pre_lora/                                        with pre_lora_data_path: phase 1 and its model (pre_lora.py)
    training_hub_final.json                          written last: the top-level adapter is complete

The folder is the run's or it is refused: a run writes only the names above, refuses a folder whose files of
those names it did not write, never writes into the base model's, the adapter's or the data's folder, and
holds a lock while it trains. `overwrite_output_dir` moves an earlier run aside (never a file it did not
write) once the new run has loaded its model, and deletes it when the new run's first checkpoint is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import DATA_PATH_FIELDS, ConfigError
from .files import replace_files_in, write_atomic
from .hardware import is_main_process
from .result import TrainingResult

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST_FILE = "run_config.json"
METRICS_FILE = "training_metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "training_hub_complete.json"  # inside checkpoint-N/, written last
TRAINER_STATE = "trainer_state.json"  # inside checkpoint-N/, written by the Trainer
MERGED_DIR = "merged"
PRE_LORA_DIR = "pre_lora"  # a two-phase run's phase 1: its checkpoints and the phase-1 model (pre_lora.py)
PHASE_PRE_LORA, PHASE_LORA = "pre_lora", "lora"  # the "phase" of a two-phase run's metrics rows

logger = logging.getLogger("training_hub")


def folder_problems(config) -> list[str]:
    """Why the run may not write into `ckpt_output_dir` (checked before anything is read or written)."""
    out = Path(config.ckpt_output_dir)
    problems = []
    for what, folder in protected_folders(config).items():
        if folder.is_dir() and inside(out, folder):
            problems.append(f"ckpt_output_dir={str(out)!r} is inside {what} {str(folder)!r}: the run's files would mix "
                            "with it; choose a folder of its own")
        elif not folder.is_dir() and inside(folder, out):
            problems.append(f"ckpt_output_dir={str(out)!r} holds {what} {str(folder)!r}: keep the data outside the "
                            "output folder")
    if out.exists() and not out.is_dir():
        return problems + [f"ckpt_output_dir={str(out)!r} exists and is not a folder"]
    if config.dry_run or not out.is_dir():
        return problems  # a dry run writes nothing
    holder = lock_holder(out)
    if holder is not None:
        problems.append(describe_lock(out, holder))
    collisions = foreign_collisions(out)
    if collisions:
        problems.append(f"ckpt_output_dir={str(out)!r} holds files training_hub did not write but a run would "
                        f"overwrite: {', '.join(collisions)}; move them, or choose another folder")
    resuming = config.resume_from_checkpoint not in (None, False)
    if holds_run(out) and not (config.overwrite_output_dir or resuming):
        earlier = sorted(p.name for p in out.iterdir() if p.name in (ADAPTER_WEIGHTS, METRICS_FILE, MANIFEST_FILE)
                         or p.name.startswith(CHECKPOINT_PREFIX))
        problems.append(f"ckpt_output_dir={str(out)!r} already holds a run ({', '.join(earlier[:4])}): choose a new "
                        "folder, pass resume_from_checkpoint=True (or 'auto') to continue it, or overwrite_output_dir=True "
                        "to replace it")
    return problems


@contextmanager
def claimed(out: Path, overwrite_output_dir: bool):
    """Own the folder while training and saving (rank 0): create it, take its lock, move an earlier run aside
    when overwriting. The lock is released at the end, also on errors; one left by a killed run is stale and
    taken over with a notice."""
    if not is_main_process():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    take_lock(out)
    try:
        if overwrite_output_dir:
            move_aside_earlier_run(out)
        yield
    finally:
        (out / LOCK_FILE).unlink(missing_ok=True)


def take_lock(out: Path) -> None:
    path = out / LOCK_FILE
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = lock_holder(out)
        if holder is not None:
            raise ConfigError([describe_lock(out, holder)]) from None
        logger.warning(f"taking over a stale lock in {out} (its process is gone): {path.read_text().strip()}")
        write_atomic(path, record)
        return
    with os.fdopen(fd, "w") as f:
        f.write(record)


def move_aside_earlier_run(out: Path) -> None:
    """Move the earlier run's files (only names a run writes) into `.replaced-<time>/`."""
    earlier = [p for p in out.iterdir() if is_run_entry(p.name) and not p.name.startswith(REPLACED_PREFIX)]
    if not earlier:
        return
    aside = out / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in earlier:
        os.replace(path, aside / path.name)
    logger.info(f"overwrite_output_dir: the earlier run's {len(earlier)} files and folders are in {aside.name} until "
                "this run's first checkpoint is complete")


def discard_replaced_runs(out: Path) -> None:
    """Delete earlier runs moved aside by overwrite_output_dir (once the new run has a complete checkpoint)."""
    if is_main_process() and out.is_dir():
        for path in out.iterdir():
            if path.name.startswith(REPLACED_PREFIX) and path.is_dir():
                shutil.rmtree(path)


def discard_replaced_callback(out: Path):
    """A TrainerCallback that deletes the moved-aside earlier run after the first complete checkpoint (it runs
    after the checkpoint guard, which marks checkpoints complete)."""
    from transformers import TrainerCallback

    class DiscardReplacedRun(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            discard_replaced_runs(out)

    return DiscardReplacedRun()


def replace_final_adapter(out: Path, fill, step: int | None) -> None:
    """Replace the top-level adapter so that it is complete or visibly not: the final marker goes first, the
    files are written to a temporary folder and moved in, and the marker is written last."""
    (out / FINAL_MARKER).unlink(missing_ok=True)
    replace_files_in(out, fill)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name in RUN_FILES)
    write_atomic(out / FINAL_MARKER, json.dumps({"step": step, "files": files}, indent=2))


def final_adapter_problem(path: Path) -> str | None:
    """Why the adapter in a lora_sft output folder cannot be used (None for a complete one, or a folder that
    is not a lora_sft output, such as a checkpoint or another tool's adapter)."""
    if (path / MANIFEST_FILE).is_file() and not (path / FINAL_MARKER).is_file():
        return (f"{path} holds no complete final adapter (no {FINAL_MARKER}: the run has not finished or was stopped "
                "while saving it); finish it with resume_from_checkpoint=True, or use one of its checkpoint-N folders")
    return None


def save_adapter(model, tokenizer, out: Path, step: int | None = None, state_dict: dict[str, Any] | None = None) -> None:
    """Write the final adapter + tokenizer to a temporary folder, then move the files in (rank 0 only).
    `state_dict`: the adapter's weights gathered from a sharded model (`training.gathered_adapter_state`)."""
    from .export import vllm_warnings

    if not is_main_process():
        return

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)

    replace_final_adapter(out, fill, step)
    for warning in vllm_warnings(json.loads((out / ADAPTER_CONFIG).read_text())):
        logger.warning(warning)


def save_merged(model_path: str, out: Path, dtype: str, trust_remote_code: bool) -> None:
    """Write out/merged: the adapter in `out` folded into the 16-bit base (rank 0, in a separate process)."""
    from .export import merge_adapter_isolated

    if is_main_process():
        merged = merge_adapter_isolated(model_path, out, out / MERGED_DIR, dtype=dtype, trust_remote_code=trust_remote_code)
        logger.info(f"merged {dtype} model in {merged}")


def result(out: Path, plan=None, data_summary=None, metrics: dict[str, Any] | None = None, model: Any = None,
           tokenizer: Any = None, trainer: Any = None) -> TrainingResult:
    """The one place a `TrainingResult` is made: the paths of `out`, the plan and data summary as dicts (empty
    when this process did not make them, e.g. the caller of a self-launched run on a node without rank 0)."""
    return TrainingResult(output_dir=out, adapter_path=out, metrics_path=out / METRICS_FILE,
                          config_path=out / MANIFEST_FILE, metrics=metrics or {},
                          plan=asdict(plan) if plan is not None else {},
                          data_summary=data_summary.to_dict() if data_summary is not None else {},
                          model=model, tokenizer=tokenizer, trainer=trainer)


# ---- ownership: what a run writes, what it may replace, and the lock -------------------------------------

FINAL_MARKER = "training_hub_final.json"  # written last by the final save: the top-level adapter is complete
LOCK_FILE = ".training_hub.lock"
REPLACED_PREFIX = ".replaced-"  # an earlier run moved aside by overwrite_output_dir, until the new one checkpoints
MODEL_CARD = "README.md"
LOSS_PLOT = "loss.png"
# Files a run writes at the top level (the tokenizer's, whichever of them it has, included).
RUN_FILES = frozenset({
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_FILE, METRICS_FILE, FINAL_MARKER, MODEL_CARD, LOSS_PLOT,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "vocab.txt", "spiece.model",
    "processor_config.json", "preprocessor_config.json",  # a vision-language model's processor
})


def is_run_entry(name: str) -> bool:
    """A top-level name that a training_hub run writes (file or folder)."""
    return (name in RUN_FILES or name in (MERGED_DIR, PRE_LORA_DIR) or name.startswith(CHECKPOINT_PREFIX)
            or name.startswith(REPLACED_PREFIX) or name.startswith(".final-adapter"))


def holds_run(out: Path) -> bool:
    """The folder holds (part of) an earlier training_hub run: its manifest, metrics, adapter or a checkpoint."""
    return out.is_dir() and any(p.name in (MANIFEST_FILE, METRICS_FILE, ADAPTER_WEIGHTS, PRE_LORA_DIR) or
                                p.name.startswith(CHECKPOINT_PREFIX) for p in out.iterdir())


def foreign_collisions(out: Path) -> list[str]:
    """Entries of a folder with no run in it that a run would overwrite: they are someone else's."""
    if not out.is_dir() or holds_run(out):
        return []
    return sorted(p.name for p in out.iterdir() if is_run_entry(p.name) and not p.name.startswith(REPLACED_PREFIX))


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies inside it (both resolved)."""
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


def protected_folders(config) -> dict[str, Path]:
    """Folders a run must never write into: the base model's, the adapter it continues from, the data's."""
    found = {}
    if Path(str(config.model_path)).expanduser().is_dir():
        found["model_path (the base model)"] = Path(str(config.model_path))
    if config.lora_adapter:
        found["lora_adapter"] = Path(config.lora_adapter)
    for name in DATA_PATH_FIELDS:
        value = getattr(config, name)
        if isinstance(value, str) and value.strip() and Path(value).expanduser().exists():
            found[name] = Path(value)
    return found


def lock_holder(out: Path) -> dict | None:
    """The lock's content when another live (or unknowable) process holds it; None when free or stale."""
    path = out / LOCK_FILE
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return None  # its process is gone: a stale lock, taken over with a notice
    return holder


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_lock(out: Path, holder: dict) -> str:
    return (f"ckpt_output_dir={str(out)!r} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('started')}): wait for it or choose another folder; if that run is gone, delete "
            f"{out / LOCK_FILE}")
