"""The output folder (`ckpt_output_dir`): every file name in it, its checks, the final save, and the result.

What a finished run leaves:
    adapter_config.json, adapter_model.safetensors   the PEFT adapter (top level: `load()` and vLLM read it)
    tokenizer files, chat_template.jinja             the tokenizer the data was tokenized with
    run_config.json                                  resolved config, plan, data summary, versions, metrics
    training_metrics.jsonl                           one JSON object per logging step, written live
    checkpoint-N/                                    resumable checkpoints, marked complete when fully written
    merged/                                          with save_merged: the LoRA folded into the 16-bit base
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .files import replace_files_in
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

logger = logging.getLogger("training_hub")


def folder_problems(out: Path, overwrite_output_dir: bool, resuming: bool) -> list[str]:
    """Refuse to mix a new run into a folder that holds earlier work (checked before anything is written).

    A resumed run continues the run in the folder (`resume.find_resume` checks what it holds)."""
    if out.exists() and not out.is_dir():
        return [f"ckpt_output_dir={str(out)!r} exists and is not a folder"]
    if not out.is_dir() or overwrite_output_dir or resuming:
        return []
    earlier = sorted(p.name for p in out.iterdir()
                     if p.name in (ADAPTER_WEIGHTS, METRICS_FILE, MANIFEST_FILE) or p.name.startswith(CHECKPOINT_PREFIX))
    if earlier:
        return [f"ckpt_output_dir={str(out)!r} already holds a run ({', '.join(earlier[:4])}): choose a new folder, "
                "pass resume_from_checkpoint=True (or 'auto') to continue it, or overwrite_output_dir=True to replace it"]
    return []


def create(out: Path, overwrite_output_dir: bool) -> None:
    """Make the folder (rank 0); an earlier run in it is removed first when overwriting."""
    if not is_main_process():
        return
    if overwrite_output_dir and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_adapter(model, tokenizer, out: Path) -> None:
    """Write the final adapter + tokenizer to a temporary folder, then move the files in (rank 0 only)."""
    from .export import vllm_warnings

    if not is_main_process():
        return

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_files_in(out, fill)
    for warning in vllm_warnings(json.loads((out / ADAPTER_CONFIG).read_text())):
        logger.warning(warning)


def save_merged(model_path: str, out: Path, dtype: str, trust_remote_code: bool) -> None:
    """Write out/merged: the adapter in `out` folded into the 16-bit base (rank 0, in a separate process)."""
    from .export import merge_adapter_isolated

    if is_main_process():
        merged = merge_adapter_isolated(model_path, out, out / MERGED_DIR, dtype=dtype, trust_remote_code=trust_remote_code)
        logger.info(f"merged {dtype} model in {merged}")


def result(out: Path, plan, data_summary, metrics: dict[str, Any] | None = None, model: Any = None,
           tokenizer: Any = None, trainer: Any = None) -> TrainingResult:
    """The one place a `TrainingResult` is made: the paths of `out`, the plan and data summary as dicts."""
    return TrainingResult(output_dir=out, adapter_path=out, metrics_path=out / METRICS_FILE,
                          config_path=out / MANIFEST_FILE, metrics=metrics or {}, plan=asdict(plan),
                          data_summary=data_summary.to_dict(), model=model, tokenizer=tokenizer, trainer=trainer)
