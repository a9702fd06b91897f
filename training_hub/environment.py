"""Checks of the world outside the config (paths, the process launch), made once before anything is read.

`LoraSFTConfig` validates values alone, so a saved config can be re-validated anywhere; what depends on this
machine and this launch is checked here, and every problem is reported at once with the config's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import LoraSFTConfig
from .distributed import running_launch_problems, under_launcher

LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def environment_problems(config: LoraSFTConfig) -> list[str]:
    problems = []
    model = str(config.model_path)
    if model.startswith(LOCAL_PATH_PREFIXES) and not Path(model).expanduser().exists():
        problems.append(f"model_path={model!r}: no such folder (give a local model folder, or a hub id like "
                        "'Qwen/Qwen2.5-1.5B')")
    # The launch settings' own values were checked with the config; here, against the launch this process runs in.
    return problems + (running_launch_problems(config, os.environ) if under_launcher(os.environ) else [])
