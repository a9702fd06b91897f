"""The tokenized-data cache: one folder per key, written to a temporary name then renamed.

Location: ``cache_dir``, else ``$TRAINING_HUB_CACHE``, else ``~/.cache/training_hub/data``. The value
``"none"`` (either way) disables the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .schema import DataSummary, TokenizedData

# Bump when the tokenization or masking code changes what it produces.
CODE_VERSION = "data-2"
DEFAULT_CACHE = Path("~/.cache/training_hub/data")
SUMMARY_FILE = "summary.json"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """The cache folder to use, or None when caching is disabled (``"none"``)."""
    value = cache_dir if cache_dir is not None else os.environ.get("TRAINING_HUB_CACHE") or DEFAULT_CACHE
    if str(value).strip().lower() == "none":
        return None
    return Path(value).expanduser()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: vocabulary, merges, normalizer, special tokens, class."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, tokenizer: Any, template: str | None, **settings: Any) -> str:
    """The key of one tokenization: data, tokenizer, template, settings and the code version."""
    parts = {
        "code": CODE_VERSION,
        "data": fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template or "",
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_cached(folder: Path) -> TokenizedData | None:
    """The cached result in ``folder``, or None when there is none (a complete entry has its summary)."""
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    from datasets import load_from_disk

    summary = DataSummary(**json.loads(summary_path.read_text()))
    return TokenizedData(load_from_disk(str(folder / "dataset")), summary, from_cache=True, cache_path=str(folder))


def save_cached(folder: Path, data: TokenizedData) -> None:
    """Write ``data`` under a temporary name beside ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        data.dataset.save_to_disk(str(temporary / "dataset"))
        (temporary / SUMMARY_FILE).write_text(json.dumps(data.summary.to_dict(), indent=1))
        os.replace(temporary, folder)
    except OSError:
        if not (folder / SUMMARY_FILE).is_file():
            raise
        # Another process wrote the same entry first: theirs is identical.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
