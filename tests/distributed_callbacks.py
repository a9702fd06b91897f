"""TrainerCallbacks for the self-launch tests: importable classes, so the worker processes can unpickle them."""

import os
import signal

from transformers import TrainerCallback


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RecordPid(TrainerCallback):
    """Append this worker's pid to `path` when training begins (to check that no worker outlives the run)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


class FailOnRank(TrainerCallback):
    """Rank `rank` raises (or SIGKILLs itself, with kill=True) at the end of step `step` (after its save, if any)."""

    def __init__(self, rank: int, step: int, kill: bool = False):
        self.rank, self.step, self.kill = rank, step, kill

    def on_step_end(self, args, state, control, **kwargs):
        if not self.kill and _rank() == self.rank and state.global_step == self.step:
            raise ValueError(f"rank {self.rank} broke on purpose at step {self.step}")

    def on_save(self, args, state, control, **kwargs):
        if self.kill and _rank() == self.rank and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
