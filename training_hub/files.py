"""Writes that never leave a half-written file behind: a reader sees the old content or the new, not a mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_files_in(out: Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write files into a fresh temporary folder inside `out`, then move each one into `out`.

    A crash while `fill` runs leaves `out`'s previous files as they were (the final adapter is only replaced
    once the new one is fully written)."""
    tmp = out / ".final-adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
