"""Vision-language models: detected from the config, their LoRA targets, and the checks before loading.

A model is vision-language when its config's ``model_type`` is one that transformers'
``AutoModelForImageTextToText`` maps (LLaVA, Qwen2-VL/2.5-VL, Gemma 3, Idefics3, mllama, ...). Such a model
is loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor`` on the peft backend; the LoRA targets
are the linear projections inside the blocks of its language model (``finetune_language_layers``) and of
its vision encoder (``finetune_vision_layers``); the projector between them is not adapted.
"""

from __future__ import annotations

import re

from .targets import BLOCK_LISTS, LINEAR_CLASS_NAMES

# Module-path components under which a vision-language model keeps its two towers (transformers' names).
LANGUAGE_ROOTS = ("language_model", "text_model")
VISION_ROOTS = ("vision_tower", "visual", "vision_model", "vision_encoder")
VISION_PARAMETERS = ("finetune_vision_layers", "finetune_language_layers")


def is_vision_language(model_config) -> bool:
    """Whether transformers maps this config's model type to an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(model_config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def detect(model_path: str, trust_remote_code: bool) -> bool:
    """Whether the model at ``model_path`` is vision-language (reads its config only)."""
    from transformers import AutoConfig

    return is_vision_language(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))


def vision_problems(config, vision: bool) -> list[str]:
    """The vision parameters against the model: set on a text model, or contradicting ``target_modules``."""
    from ..config import LoraSFTConfig

    changed = [name for name in VISION_PARAMETERS
               if getattr(config, name) != LoraSFTConfig.__dataclass_fields__[name].default]
    if not vision:
        return [f"{name}={getattr(config, name)!r}: {config.model_path} is a text-only model (its config is not an "
                "image-text-to-text architecture), so it has no vision layers to choose between; leave it at its "
                "default" for name in changed]
    problems = []
    if changed and config.target_modules:
        problems.append(f"target_modules and {' and '.join(changed)} are both given: target_modules names the adapted "
                        "modules itself; give one or the other")
    if config.data_output_dir is not None:
        problems.append(f"data_output_dir={config.data_output_dir!r}: tokenized data is not cached for a vision-language "
                        "model (its rows name images that the processor reads per batch); leave it unset")
    return problems


def vision_backend(backend: str) -> tuple[str, str]:
    """The backend a vision-language model trains on, and why: the peft backend; 'unsloth' is refused."""
    from ..config import ConfigError

    if backend == "unsloth":
        raise ConfigError(["backend='unsloth' with a vision-language model: training_hub trains these with "
                           "transformers + PEFT (AutoModelForImageTextToText); its Unsloth route (FastVisionModel "
                           "and Unsloth's vision collator) is not built yet. Use backend='peft' or 'auto'"])
    return "peft", "backend peft: a vision-language model (AutoModelForImageTextToText + AutoProcessor)"


def tower_linears(model, roots: tuple[str, ...]) -> dict[str, set[str]]:
    """For each tower found under one of ``roots``: its path prefix -> the names of the linear layers in its blocks."""
    found: dict[str, set[str]] = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if type(module).__name__ not in LINEAR_CLASS_NAMES:
            continue
        at = next((i for i, part in enumerate(parts) if part in roots), None)
        if at is not None and any(part in BLOCK_LISTS for part in parts[at + 1:-1]):
            found.setdefault(".".join(parts[: at + 1]), set()).add(parts[-1])
    return found


def vision_targets(model, language: bool, vision: bool) -> str:
    """A PEFT ``target_modules`` regex (matched against full module names) for the chosen towers."""
    towers: dict[str, set[str]] = {}
    for wanted, roots, what in ((language, LANGUAGE_ROOTS, "language model"), (vision, VISION_ROOTS, "vision encoder")):
        if not wanted:
            continue
        found = tower_linears(model, roots)
        if not found:
            raise ValueError(f"found no linear layers inside the {what} blocks of {type(model).__name__} (looked under "
                             f"{', '.join(roots)}); pass target_modules explicitly")
        towers.update(found)
    alternatives = [rf"{re.escape(prefix)}\..*\.(?:{'|'.join(sorted(names))})" for prefix, names in sorted(towers.items())]
    return "|".join(alternatives) if len(alternatives) == 1 else "(?:" + ")|(?:".join(alternatives) + ")"


def plan_config(config):
    """The config the plan is made from: vision batches are never packed (the processor pads each batch)."""
    import dataclasses

    from ..config import ConfigError

    if config.sample_packing:
        raise ConfigError(["sample_packing=True with a vision-language model: image-text batches are not packed "
                           "(each row's image tokens must stay with its pixel values); leave sample_packing unset"])
    return dataclasses.replace(config, sample_packing=False)


def auto_model_class(vision: bool):
    """The transformers Auto class a base model loads with: image-text-to-text or causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vision else AutoModelForCausalLM


def load_processing_class(path: str, vision: bool, trust_remote_code: bool = False):
    """The processor (vision-language) or tokenizer saved in ``path``."""
    from transformers import AutoProcessor, AutoTokenizer

    auto = AutoProcessor if vision else AutoTokenizer
    return auto.from_pretrained(path, trust_remote_code=trust_remote_code)
