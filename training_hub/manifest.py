"""run_config.json: the output folder describes itself (config, plan, data, versions, hardware, metrics)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import write_atomic
from .hardware import is_main_process
from .outputs import MANIFEST_FILE
from .pre_lora import read_record

PACKAGES = ("training-hub-lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth",
            "unsloth_zoo", "bitsandbytes", "xformers", "flash_attn")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None


def write(out: Path, config, plan, summary, loaded_model, data_fingerprint: str,
          metrics: dict[str, Any] | None = None) -> Path:
    """Write (or rewrite) the manifest atomically; rank 0 only.

    `data_fingerprint` identifies the normalized data and its tokenization; with the chat template's hash,
    the seed (in the config), the versions and the hardware it says what produced the adapter."""
    path = out / MANIFEST_FILE
    if not is_main_process():
        return path
    manifest = {
        "config": config.to_dict(),
        "plan": asdict(plan),
        "data": {**summary.to_dict(), "fingerprint": data_fingerprint,
                 "chat_template_sha256": sha256(loaded_model.tokenizer.chat_template)},
        "model": {"target_modules": loaded_model.target_modules,
                  "trainable_parameters": loaded_model.trainable_parameters,
                  "total_parameters": loaded_model.total_parameters},
        "versions": package_versions(),
        "hardware": {"platform": platform.platform(), "python": platform.python_version(), "device": plan.device,
                     "cpu_count": os.cpu_count()},
        "metrics": metrics,
        "pre_lora": read_record(out),  # phase 1 of a two-phase run: settings, data, steps, losses (or None)
    }
    write_atomic(path, json.dumps(manifest, indent=2, default=str))
    return path
