"""Vision-language models: detected from the config, their LoRA targets, and the checks before loading.

A model is vision-language when its config's ``model_type`` is one that transformers'
``AutoModelForImageTextToText`` maps (LLaVA, Qwen2-VL/2.5-VL, Gemma 3, Idefics3, mllama, ...). Such a model
is loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor`` on the peft backend; the LoRA targets
are the linear projections inside the blocks of its language model (``finetune_language_layers``) and of
its vision encoder (``finetune_vision_layers``); the projector between them is not adapted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .targets import BLOCK_LISTS, LINEAR_CLASS_NAMES

# Module-path components under which a vision-language model keeps its two towers (transformers' names).
LANGUAGE_ROOTS = ("language_model", "text_model")
VISION_ROOTS = ("vision_tower", "visual", "vision_model", "vision_encoder")
VISION_PARAMETERS = ("finetune_vision_layers", "finetune_language_layers")


def is_vision_language(model_config: dict) -> bool:
    """Whether a model's ``config.json`` (as a dict) describes a vision-language model: it has a vision
    sub-config and transformers maps its model type to an image-text-to-text model. transformers is imported
    only for configs with a vision sub-config, so a text run can still import Unsloth first."""
    if "vision_config" not in model_config:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def detect(model_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model at ``model_path`` (a folder or a hub id) is vision-language, from its config.json only.
    A config that cannot be read here counts as a text model's (loading it later gives the real error)."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model_path, "config.json"))
        except Exception:  # offline, a gated or misspelled repository, ...: the model loader reports it
            return False
    try:
        return is_vision_language(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def vision_problems(config, vision: bool) -> list[str]:
    """The settings a vision-language model cannot take (packing, the Unsloth backend, the data cache, vision
    parameters beside target_modules or lora_adapter), or the vision parameters set for a text model."""
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
    if changed and config.lora_adapter is not None:
        problems.append(f"lora_adapter and {' and '.join(changed)} are both given: training continues on the "
                        "adapter's own modules; leave them at their defaults")
    if config.sample_packing:
        problems.append("sample_packing=True with a vision-language model: image-text batches are not packed (each "
                        "row's image tokens must stay with its pixel values); leave sample_packing unset")
    if config.pre_lora_data_path is not None:
        problems.append("pre_lora_data_path with a vision-language model: the full-parameter phase is built for causal "
                        "language models only; train the vision model with LoRA alone, or run phase 1 on its own")
    if config.backend == "unsloth":
        problems.append("backend='unsloth' with a vision-language model: training_hub trains these with transformers "
                        "+ PEFT (AutoModelForImageTextToText); its Unsloth route (FastVisionModel and Unsloth's "
                        "vision collator) is not built yet, and Unsloth's CPU backend has no vision models. Use "
                        "backend='peft' or 'auto'")
    cache = cache_problem(config.data_output_dir)
    return problems + ([cache] if cache else [])


def cache_problem(data_output_dir: str | None) -> str | None:
    """Vision rows are not cached: a data_output_dir would be ignored."""
    if data_output_dir is None:
        return None
    return (f"data_output_dir={data_output_dir!r}: tokenized data is not cached for a vision-language model (its rows "
            "name images that the processor reads per batch); leave it unset")


def vision_plan(plan):
    """A vision-language run's plan: its notes, and Liger's kernels off. transformers applies Liger per model type,
    which for these models also patches the vision encoder, and for Qwen2-VL in transformers 5.x its RoPE patch
    replaces a function the model no longer calls; only text models were measured and tested with Liger."""
    import dataclasses

    notes = [note for note in plan.notes if not note.startswith("Liger kernels")]
    if plan.liger_kernel:
        notes.append("Liger kernels not applied to a vision-language model (measured and tested on text models only)")
    return dataclasses.replace(plan, liger_kernel=False, notes=notes + vision_notes())


def vision_notes() -> list[str]:
    """What the plan says of a vision-language run."""
    return ["backend peft for a vision-language model (AutoModelForImageTextToText + AutoProcessor; the Unsloth "
            "vision route is not built, and Unsloth's CPU backend has no vision models)", "no sample packing: image-text batches are padded per batch by the processor"]


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
    # Inside a numbered block only: the same names also occur outside the blocks (Qwen2-VL's patch embedding
    # convolution is `visual.patch_embed.proj`, beside the blocks' `attn.proj`).
    blocks = "|".join(BLOCK_LISTS)
    alternatives = [rf"{re.escape(prefix)}\.(?:[^.]+\.)*?(?:{blocks})\.\d+\.(?:[^.]+\.)*(?:{'|'.join(sorted(names))})"
                    for prefix, names in sorted(towers.items())]
    return "|".join(alternatives) if len(alternatives) == 1 else "(?:" + ")|(?:".join(alternatives) + ")"


def plan_config(config):
    """The config the plan is made from: vision batches are never packed (the processor pads each batch;
    `vision_problems` refuses sample_packing=True)."""
    import dataclasses

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
