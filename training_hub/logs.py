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
    """Show the library's lines on stderr when the application has not configured logging itself.

    Like transformers' own logger: a handler is added to the "training_hub" logger (never to the root) only
    when neither it nor the root logger has one, and its level is set to INFO only when nobody set it.
    Safe to call repeatedly."""
    if not any(isinstance(f, MainProcessOnly) for f in logger.filters):
        logger.addFilter(MainProcessOnly())
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("training_hub: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # the handler above prints it; a root handler added later would print it twice
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
