"""The plain transformers + PEFT backend (the baseline, and the fallback when Unsloth is unavailable)."""

from __future__ import annotations

from ..config import LoraSFTConfig
from ..plan import RunPlan
from .adapters import adapter_targets
from .attention import loadable_attention
from .common import LoadedModel, check_quantized, count_parameters, device_map, lora_kwargs, quantization_config, torch_dtype
from .targets import check_targets_exist, linear_projection_names
from .vision import auto_model_class, vision_targets


def load_peft_model(config: LoraSFTConfig, plan: RunPlan, tokenizer, vision: bool = False) -> LoadedModel:
    """The base model (`AutoModelForImageTextToText` when `vision`, else a causal LM) with LoRA."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    sharded = plan.model_splitting == "fsdp2"
    quant = quantization_config(config, plan.dtype, sharded)
    model = auto_model_class(vision).from_pretrained(
        config.model_path,
        dtype=torch_dtype(plan.dtype),
        attn_implementation=loadable_attention(plan.attn_implementation),
        quantization_config=quant,
        device_map=device_map(plan, quantized=quant is not None),
        trust_remote_code=config.trust_remote_code,
    )
    check_quantized(model, config)
    # Not under FSDP2: it casts every 16-bit weight but the 4-bit ones to float32 (embeddings and norms at twice
    # the memory, layers of mixed dtypes to shard), and the sharded route checkpoints activations with FSDP's wrapper.
    if quant is not None and not sharded:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing != "off",
            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)  # LoRA A matrices are drawn from the global generator
    if config.lora_adapter is not None:  # continue from a saved adapter: its own LoraConfig, trainable
        model = PeftModel.from_pretrained(model, config.lora_adapter, is_trainable=True)
        targets = adapter_targets(model)
    elif vision and not config.target_modules:  # a regex over full module names: the chosen towers only
        pattern = vision_targets(model, config.finetune_language_layers, config.finetune_vision_layers)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=pattern, **lora_kwargs(config)))
        targets = [pattern]
    else:
        targets = list(config.target_modules) if config.target_modules else linear_projection_names(model)
        check_targets_exist(model, targets)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, **lora_kwargs(config)))
    trainable, total = count_parameters(model)
    return LoadedModel(model, tokenizer, targets, trainable, total)
