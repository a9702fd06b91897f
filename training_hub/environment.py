"""Checks of the world outside the config (paths, the process launch), made once before anything is read.

`LoraSFTConfig` validates values alone, so a saved config can be re-validated anywhere; what depends on this
machine and this launch is checked here, and every problem is reported at once with the config's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import LoraSFTConfig

LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def launched_processes_per_node() -> int:
    """Processes per node of the current launch (torchrun sets LOCAL_WORLD_SIZE; 1 for plain python)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def environment_problems(config: LoraSFTConfig) -> list[str]:
    problems = []
    model = str(config.model_path)
    if model.startswith(LOCAL_PATH_PREFIXES) and not Path(model).expanduser().exists():
        problems.append(f"model_path={model!r}: no such folder (give a local model folder, or a hub id like "
                        "'Qwen/Qwen2.5-1.5B')")
    launched = launched_processes_per_node()
    if config.nproc_per_node is not None and config.nproc_per_node != launched:
        problems.append(f"nproc_per_node={config.nproc_per_node!r}: launching the processes from lora_sft is not "
                        f"supported yet, and this launch has {launched} process(es) per node; run `torchrun "
                        "--nproc-per-node N script.py` and leave nproc_per_node unset (or equal to N)")
    return problems
