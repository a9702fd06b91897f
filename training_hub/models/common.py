"""What both backends share: the loaded-model record, LoRA settings, and the dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import LoraSFTConfig
from ..plan import RunPlan


@dataclass
class LoadedModel:
    model: Any  # a peft.PeftModel
    tokenizer: Any
    target_modules: list[str]
    trainable_parameters: int
    total_parameters: int

    def describe(self) -> str:
        share = 100 * self.trainable_parameters / max(1, self.total_parameters)
        return (f"trainable LoRA parameters: {self.trainable_parameters:,} of {self.total_parameters:,} ({share:.3f}%), "
                f"targets {self.target_modules}")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lora_kwargs(config: LoraSFTConfig) -> dict[str, Any]:
    """The LoraConfig fields both backends pass on (target_modules are resolved per model)."""
    kwargs: dict[str, Any] = dict(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        bias="none",
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=config.init_lora_weights,
    )
    if config.rank_pattern:
        kwargs["rank_pattern"] = dict(config.rank_pattern)
    if config.alpha_pattern:
        kwargs["alpha_pattern"] = dict(config.alpha_pattern)
    return kwargs


def quantization_config(config: LoraSFTConfig, compute_dtype: str, sharded: bool = False):
    """A BitsAndBytesConfig for QLoRA / 8-bit, or None for 16-bit LoRA. `sharded` (FSDP2): the packed 4-bit
    weights are stored in the compute dtype instead of uint8, since FSDP2 shards floating-point tensors only."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = torch_dtype(config.bnb_4bit_compute_dtype or compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
    )


def device_map(plan: RunPlan, quantized: bool = False):
    """Each process trains a whole copy on its own device (DDP under torchrun), or one process spreads the layers
    over the visible GPUs (enable_model_splitting), or each process loads the base where FSDP2 shards it from:
    16-bit weights into CPU RAM (a GPU keeps only its shard), 4-bit weights onto its own GPU (bitsandbytes
    quantizes there)."""
    if plan.model_splitting == "balanced":
        return "balanced"
    if plan.device == "cpu" or (plan.model_splitting == "fsdp2" and not quantized):
        return {"": "cpu"}
    from ..hardware import local_rank

    return {"": local_rank()}


def check_quantized(model, config: LoraSFTConfig) -> None:
    """Refuse a silent 16-bit fallback when 4-/8-bit loading was asked for."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return
    wanted = "Linear4bit" if config.load_in_4bit else "Linear8bitLt"
    if not any(type(m).__name__ == wanted for m in model.modules()):
        raise RuntimeError(f"{'load_in_4bit' if config.load_in_4bit else 'load_in_8bit'}=True, but the model was "
                           f"loaded without {wanted} layers (a silent 16-bit fallback); check that bitsandbytes "
                           "works on this machine (python -m bitsandbytes)")


def count_parameters(model) -> tuple[int, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def load_model(config: LoraSFTConfig, plan: RunPlan, tokenizer, vision: bool = False) -> LoadedModel:
    """Load the base model for `plan.backend` and wrap it with LoRA. `tokenizer` is the one the data was
    tokenized with (pad-token policy applied): it is the one trained with and saved, on both backends. A
    vision-language model (`vision`, peft backend only) comes with its processor as `tokenizer`."""
    if plan.backend == "unsloth":
        from .unsloth import load_unsloth_model

        return load_unsloth_model(config, plan, tokenizer)
    from .peft import load_peft_model

    return load_peft_model(config, plan, tokenizer, vision)
