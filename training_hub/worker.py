"""One worker process of a self-launched run: `python -m training_hub.worker run.json`.

Started by `training_hub.distributed.launch` through torch's elastic launcher (which sets RANK, WORLD_SIZE,
MASTER_ADDR, ...). It rebuilds the run's config from run.json, trains like a torchrun process, and on rank 0
writes the result file the calling process reads. `record` writes an exception to the error file the
launcher reads, so the caller gets this rank's message.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record


def _show_progress(level: int) -> None:
    """This process is an entry point like the CLI: show the library's log lines at the caller's level."""
    from .logs import enable_default_output, logger

    logger.setLevel(level)
    enable_default_output()


def load_callbacks(path: str | None, backend: str) -> list:
    """The caller's callbacks; Unsloth is imported first when it may train (unpickling imports transformers)."""
    if path is None:
        return []
    if backend != "peft":
        from .models.unsloth import import_unsloth

        import_unsloth()
    return pickle.loads(Path(path).read_bytes())


@record
def main(argv: list[str] | None = None) -> None:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    sys.path.extend(p for p in spec["sys_path"] if p not in sys.path)  # the caller's modules (callback classes)
    _show_progress(spec["log_level"])
    from . import distributed
    from .recipe import run
    from .config import LoraSFTConfig
    from .hardware import is_main_process

    callbacks = load_callbacks(spec["callbacks"], spec["config"]["backend"])
    config = LoraSFTConfig(**spec["config"], callbacks=callbacks or None)
    result = run(config)
    if is_main_process():
        distributed.write_result(result, Path(spec["result"]))


if __name__ == "__main__":
    main()
