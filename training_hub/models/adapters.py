"""Starting from an existing LoRA adapter (`lora_adapter=PATH`): its shape wins, conflicting values are errors.

Pure Python on the config side (reads adapter_config.json only), so a conflict fails before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, LoraSFTConfig
from ..outputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# LoraSFTConfig field -> adapter_config.json key, for the settings that define the adapter's shape.
SHAPE_FIELDS = {
    "lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "target_modules",
    "use_rslora": "use_rslora", "use_dora": "use_dora", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
}


def read_adapter_config(path: str | Path, name: str = "lora_adapter") -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter folder, after checking the folder is one (safetensors weights).

    `name` is the parameter the path came from, for the error message."""
    folder = Path(path)
    problems = []
    if not (folder / ADAPTER_CONFIG).is_file():
        problems.append(f"{name}={str(path)!r}: no {ADAPTER_CONFIG} there (give the folder of a PEFT adapter)")
    elif not (folder / ADAPTER_WEIGHTS).is_file():
        problems.append(f"{name}={str(path)!r}: no {ADAPTER_WEIGHTS} there (only safetensors weights are read)")
    if problems:
        raise ConfigError(problems)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") != "LORA":
        raise ConfigError([f"{name}={str(path)!r} is a {adapter.get('peft_type')} adapter; only LoRA is supported"])
    return adapter


def _adapter_value(adapter: dict[str, Any], field: str) -> Any:
    value = adapter.get(SHAPE_FIELDS[field])
    if field == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)
    if field in ("rank_pattern", "alpha_pattern"):
        return dict(value) if value else None
    return value


def _same(field: str, a: Any, b: Any) -> bool:
    if field == "target_modules" and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(a) == sorted(b)
    return a == b


def with_adapter_settings(config: LoraSFTConfig) -> LoraSFTConfig:
    """The config with the adapter's r/alpha/targets/... when `lora_adapter` is given.

    A value left at its default takes the adapter's; a value set to something else that disagrees with the
    adapter is an error (a LoRA adapter's shape cannot change while training continues from it)."""
    if config.lora_adapter is None:
        return config
    adapter = read_adapter_config(config.lora_adapter)
    defaults = {f.name: f.default for f in dataclasses.fields(LoraSFTConfig)}
    updates, conflicts = {}, []
    for field in SHAPE_FIELDS:
        theirs, ours = _adapter_value(adapter, field), getattr(config, field)
        if field == "target_modules" and isinstance(theirs, str):
            theirs = None  # a regular expression: PEFT applies it from the adapter itself
        if ours != defaults[field] and not _same(field, ours, theirs):
            conflicts.append(f"{field}={ours!r} but the adapter at {config.lora_adapter} has {SHAPE_FIELDS[field]}={theirs!r}")
        elif theirs is not None or field in ("rank_pattern", "alpha_pattern", "target_modules"):
            updates[field] = theirs
    if conflicts:
        raise ConfigError([f"lora_adapter: {c}; leave it unset to use the adapter's value" for c in conflicts])
    return dataclasses.replace(config, **updates)


def unsloth_problems(path: str | Path) -> list[str]:
    """Adapter features the Unsloth backend does not rebuild from a saved adapter (the peft backend does)."""
    adapter = read_adapter_config(path)
    problems = []
    if isinstance(adapter.get("target_modules"), str):
        problems.append("target_modules given as a regular expression")
    for key in ("modules_to_save", "layers_to_transform", "layers_pattern"):
        if adapter.get(key):
            problems.append(f"{key}={adapter[key]!r}")
    if adapter.get("bias", "none") != "none":
        problems.append(f"bias={adapter['bias']!r}")
    return [f"lora_adapter={str(path)!r} uses {p}, which backend='unsloth' does not rebuild; use backend='peft'"
            for p in problems]


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy a saved adapter's LoRA weights into `model` (a PeftModel of the same shape); every LoRA weight must match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(Path(path) / ADAPTER_WEIGHTS))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"lora_adapter={str(path)!r} does not fit this model: {len(missing)} LoRA weights missing "
                         f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}); "
                         "was it trained on another base model?")


def adapter_targets(model) -> list[str]:
    """The module names a loaded PeftModel adapts."""
    targets = model.peft_config[model.active_adapter].target_modules
    return sorted(targets) if not isinstance(targets, str) else [targets]
