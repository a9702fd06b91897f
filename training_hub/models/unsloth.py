"""The Unsloth backend. The only module that imports unsloth.

Unsloth patches transformers, TRL and PEFT when it is imported, so it must come first: every entry point
that may train with Unsloth calls `import_unsloth()` before anything imports transformers.
"""

from __future__ import annotations

import logging
import sys

from ..config import LoraSFTConfig
from ..plan import RunPlan
from .adapters import load_adapter_weights
from .common import (LoadedModel, check_quantized, count_parameters, device_map, lora_kwargs, quantization_config,
                     torch_dtype)
from .targets import check_targets_exist, linear_projection_names

logger = logging.getLogger("training_hub")
INSTALL_HINT = ('install the lora extra from a clone of this project: pip install -e ".[lora]" (on a CUDA machine); '
                "on a CPU-only machine see the README (unsloth==2026.10.9 with --no-deps)")


def import_unsloth() -> str | None:
    """Import Unsloth so that its patches apply. Returns None on success, else the reason it failed."""
    if "unsloth" in sys.modules:
        return None
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # Unsloth raises ImportError, NotImplementedError or RuntimeError by platform
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if late:
        import torch

        if torch.cuda.is_available():
            logger.warning(f"{', '.join(late)} was imported before Unsloth, so some of Unsloth's speed-ups may not "
                           "apply; `import training_hub` (or unsloth) before transformers/trl/peft.")
    return None


def gradient_checkpointing_argument(mode: str):
    return {"off": False, "on": True, "offload": "unsloth"}[mode]


def load_unsloth_model(config: LoraSFTConfig, plan: RunPlan, tokenizer) -> LoadedModel:
    reason = import_unsloth()
    if reason is not None:
        raise ImportError(f"backend='unsloth' but Unsloth could not be imported ({reason}). {INSTALL_HINT}")
    from unsloth import FastLanguageModel

    quant = quantization_config(config, plan.dtype)
    extra = {"quantization_config": quant} if quant is not None else {}
    model, _ = FastLanguageModel.from_pretrained(  # its own tokenizer copy is not used: ours tokenized the data
        model_name=config.model_path,
        max_seq_length=config.max_seq_len,
        dtype=torch_dtype(plan.dtype),
        load_in_4bit=config.load_in_4bit,  # passed explicitly: Unsloth's own default is True
        load_in_8bit=config.load_in_8bit,
        full_finetuning=False,
        device_map=device_map(plan),
        trust_remote_code=config.trust_remote_code,
        attn_implementation=plan.attn_implementation,
        use_gradient_checkpointing=gradient_checkpointing_argument(plan.gradient_checkpointing),
        **extra,
    )
    check_quantized(model, config)
    targets = list(config.target_modules) if config.target_modules else linear_projection_names(model)
    check_targets_exist(model, targets)
    model = FastLanguageModel.get_peft_model(
        model,
        target_modules=targets,
        use_gradient_checkpointing=gradient_checkpointing_argument(plan.gradient_checkpointing),
        random_state=config.seed,  # Unsloth's default would be 3407, not the run's seed
        max_seq_length=config.max_seq_len,
        **lora_kwargs(config),
    )
    if config.lora_adapter is not None:  # Unsloth's LoRA layers, shaped like the adapter (config carries its
        load_adapter_weights(model, config.lora_adapter)  # r/alpha/targets), then its weights
    trainable, total = count_parameters(model)
    return LoadedModel(model, tokenizer, targets, trainable, total)
