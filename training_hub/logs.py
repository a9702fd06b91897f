"""The library's voice: the standard `logging` logger "training_hub".

Progress lines are INFO and come from the main process only; warnings come from every rank. Users silence,
redirect or raise it like any logger: `logging.getLogger("training_hub").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import logging
import sys

from .hardware import is_main_process

LOGGER_NAME = "training_hub"
logger = logging.getLogger(LOGGER_NAME)


class MainProcessOnly(logging.Filter):
    """Drops progress lines (below WARNING) on ranks other than 0, so N processes print one log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main_process()


def enable_default_output() -> None:
    """Show the library's lines on stderr, as transformers does for its own logger: a stderr handler on the
    "training_hub" logger (never on the root) unless it has one already, not propagated to the root, at INFO
    unless a level was set. Safe to call repeatedly.

    The root logger's handlers are not relied on: `import unsloth` calls `logging.basicConfig(level=WARNING)`,
    which would otherwise hide every progress line. To route the lines elsewhere, add a handler to this logger."""
    if not any(isinstance(f, MainProcessOnly) for f in logger.filters):
        logger.addFilter(MainProcessOnly())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("training_hub: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # the handler above prints it; a root handler would print it twice
