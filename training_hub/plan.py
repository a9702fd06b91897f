"""Hardware-dependent choices: batch math, precision, packing, optimizer, checkpointing, attention.

Everything here is a pure function of the validated config, the hardware facts and the model's shape,
so each rule is unit-tested without a GPU. Explicit user values always win; every automatic choice
is recorded with its reason in `RunPlan.notes` and printed at the start of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError, LoraSFTConfig
from .data.schema import DataSummary
from .distributed import resolve_model_splitting
from .hardware import Hardware

# Only the part of free GPU memory that a run may plan to fill: beyond ~70% the allocator thrashes
# (measured: 8B, seq 2048, micro batch 8 at 75 GiB ran slower than micro batch 4 at 45 GiB on an H100).
MEMORY_HEADROOM = 0.70
MAX_AUTO_MICRO_BATCH = 16
# Vendor dense bf16 peaks (TFLOP/s) for the MFU printed after training; unknown GPUs get no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "A6000": 155.0}
CPU_MAX_AUTO_MICRO_BATCH = 4


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder's config that memory and FLOPs depend on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    num_parameters: int  # all parameters of the base model
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = getattr(config, "text_config", None) or config
        h, i, n, v = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or h // heads
        per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * i
        tied = bool(getattr(text, "tie_word_embeddings", False))
        return cls(h, i, n, v, n * per_layer + v * h * (1 if tied else 2), tied)

    @property
    def matmul_parameters(self) -> int:
        """N of the FLOPs formula: the decoder blocks plus the LM head (whose matmul runs, tied or not)."""
        return self.num_parameters - (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)

    def flops_per_token(self, mean_context: float, recompute: bool) -> float:
        """Training FLOPs per token for LoRA: k·N + k·2·layers·ctx·hidden, N = `matmul_parameters`.

        k = 4 without recomputation (forward 2N, backward 2N: the frozen base needs no weight gradients),
        6 with gradient checkpointing (one more forward); ctx = mean attended context per token.
        """
        k = 6 if recompute else 4
        return k * (self.matmul_parameters + 2 * self.num_layers * mean_context * self.hidden_size)


@dataclass
class RunPlan:
    backend: str
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    tf32: bool | None
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    sample_packing: bool
    gradient_checkpointing: str  # "off" | "on" | "offload"
    optim: str
    attn_implementation: str  # "sdpa" | "flash_attention_2" | models.attention.FLEX_ATTENTION
    sdpa_backends: list[str] | None = None  # torch.nn.attention.SDPBackend names training runs under; None: all
    packed_length: int | None = None  # every packed row padded to this many tokens (FlexAttention: static shapes)
    liger_kernel: bool = False  # Liger's RMSNorm / SwiGLU / RoPE kernels, through TrainingArguments.use_liger_kernel
    notes: list[str] = field(default_factory=list)
    flops_per_token: float | None = None
    peak_tflops: float | None = None  # the GPU's nominal dense bf16 rate, for MFU
    # "balanced": one process spreads the layers over the visible GPUs; "fsdp2": every process holds 1/world_size
    model_splitting: str | None = None


def resolve_precision(config: LoraSFTConfig, hw: Hardware) -> tuple[str, list[str]]:
    if not hw.is_gpu:
        if config.fp16:
            raise ConfigError(["fp16=True: float16 training needs a GPU; on the CPU use fp32 (default) or bf16=True"])
        if config.tf32:
            raise ConfigError(["tf32=True: TF32 is an NVIDIA GPU feature; leave tf32 unset on the CPU"])
        if config.bf16:
            return "bfloat16", ["dtype bfloat16 (bf16=True)"]
        return "float32", ["dtype float32 (CPU default; pass bf16=True to use bfloat16)"]
    if config.bf16 and not hw.bf16_supported:
        raise ConfigError([f"bf16=True: {hw.gpu_name} does not support bfloat16; use fp16=True"])
    if config.fp16:
        return "float16", ["dtype float16 (fp16=True)"]
    if config.bf16 or (config.bf16 is None and hw.bf16_supported):
        return "bfloat16", ["dtype bfloat16" + (" (bf16=True)" if config.bf16 else " (GPU supports it)")]
    if config.bf16 is False and not config.fp16:  # as in TrainingArguments: bf16=False alone means fp32
        return "float32", ["dtype float32 (bf16=False" + (", fp16=False)" if config.fp16 is False else ")")]
    return "float16", ["dtype float16 (GPU has no bfloat16)"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_batch(
    effective: int | None, micro: int | str | None, accumulation: int | None, world: int, max_micro: int
) -> tuple[int, int, int, list[str]]:
    """Derive (micro, accumulation, effective) from any two, check them when all three are given.

    `max_micro` is the largest micro batch that fits (used for "auto", or when only the effective batch
    is given). With nothing given, the reference's semantics hold: micro 2, accumulation 1.
    """
    auto = micro == "auto" or (micro is None and effective is not None and accumulation is None)
    if effective is not None:
        if effective % world:
            raise ConfigError([f"effective_batch_size={effective} is not divisible by the {world} processes"])
        per_rank = effective // world
        if accumulation is not None:
            if per_rank % accumulation:
                valid = [d for d in divisors(per_rank)]
                raise ConfigError([f"effective_batch_size={effective} with gradient_accumulation_steps={accumulation} "
                                   f"over {world} process(es) leaves no whole micro batch; valid accumulation steps: {valid}"])
            derived = per_rank // accumulation
            if not auto and micro is not None and micro != derived:
                raise ConfigError([f"micro_batch_size={micro} x gradient_accumulation_steps={accumulation} x {world} "
                                   f"process(es) = {micro * accumulation * world}, not effective_batch_size={effective}; "
                                   f"drop one of the three, or use micro_batch_size={derived}"])
            return derived, accumulation, effective, []
        if not auto:
            if per_rank % micro:
                raise ConfigError([f"effective_batch_size={effective} is not a multiple of micro_batch_size={micro} x "
                                   f"{world} process(es); valid micro batch sizes: {divisors(per_rank)}"])
            return micro, per_rank // micro, effective, []
        chosen = max(d for d in divisors(per_rank) if d <= max(1, max_micro))
        return chosen, per_rank // chosen, effective, [
            f"micro batch {chosen} x accumulation {per_rank // chosen} (largest divisor of {per_rank} that fits: <= {max_micro})"]
    accumulation = accumulation or 1
    if auto:
        chosen = max(1, max_micro)
        return chosen, accumulation, chosen * accumulation * world, [f"micro batch {chosen} (largest that fits)"]
    micro = micro or 2
    return micro, accumulation, micro * accumulation * world, []


# The peft backend (transformers + PEFT, FlexAttention or SDPA, Liger) keeps more per token than Unsloth's fused
# kernels, which the formula below was fitted to. Measured on one H200 (docs/benchmarks.md), packed, no
# checkpointing: 8B shape 10.8 GiB per 2,048-token sequence against 7.75 estimated (1.39x), 1.5B shape 4.6 against
# 3.7 (1.25x). The larger ratio is used for every shape.
PEFT_ACTIVATION_RATIO = 1.4


def activation_bytes_per_token(shape: ModelShape, checkpointing: str, backend: str = "unsloth") -> float:
    """Training-time activation memory per token, fitted to Unsloth runs on an H100 (docs/benchmarks.md) and
    scaled by `PEFT_ACTIVATION_RATIO` for the peft backend.

    Without checkpointing a layer keeps ~10 hidden-size and ~6 intermediate-size bf16 values per token
    (8B shape: 124 KiB per token per layer, measured 117). With checkpointing only each layer's input
    stays (2 bytes x hidden), plus one layer being recomputed; offloading moves the inputs to CPU RAM.
    """
    full_layer = 10 * shape.hidden_size + 6 * shape.intermediate_size
    if checkpointing == "off":
        per_token = shape.num_layers * full_layer
    elif checkpointing == "on":
        per_token = shape.num_layers * 2 * shape.hidden_size + full_layer
    else:
        per_token = full_layer
    return per_token * (PEFT_ACTIVATION_RATIO if backend == "peft" else 1.0)


# Decoder layers an FSDP2 rank holds gathered whole at once: the one computing and the next one, prefetched.
FSDP_GATHERED_LAYERS = 2


def weight_bytes(shape: ModelShape, quantization: str | None, fsdp_shards: int | None = None) -> float:
    """The base weights one GPU holds: all of them, or under FSDP2 over `fsdp_shards` processes its 1/fsdp_shards
    plus `FSDP_GATHERED_LAYERS` layers gathered whole (over one process too: the gathered copy is a second one)."""
    per_param = {"4bit": 0.56, "8bit": 1.06}.get(quantization or "", 2.0)
    if fsdp_shards is None:
        return shape.num_parameters * per_param
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    layer = (shape.num_parameters - embeddings) / shape.num_layers
    return (shape.num_parameters / fsdp_shards + FSDP_GATHERED_LAYERS * layer) * per_param


# Planned per GPU besides the weights and activations: CUDA context, LoRA weights, gradients, optimizer state.
FIXED_GPU_BYTES = 2 * 2**30


def max_micro_batch_that_fits(shape: ModelShape, seq_len: int, checkpointing: str, free_gib: float,
                              quantization: str | None, backend: str = "unsloth", fsdp_shards: int | None = None) -> int:
    budget = free_gib * 2**30 * MEMORY_HEADROOM - weight_bytes(shape, quantization, fsdp_shards) - FIXED_GPU_BYTES
    per_sequence = activation_bytes_per_token(shape, checkpointing, backend) * seq_len
    return int(max(0, budget) // per_sequence)


def choose_checkpointing_and_micro(config: LoraSFTConfig, hw: Hardware, shape: ModelShape | None, seq_len: int,
                                   backend: str, fsdp_shards: int | None = None) -> tuple[str, int, list[str]]:
    """Pick gradient checkpointing (unless given) and the largest micro batch that fits with it (each GPU holding
    its share of the weights under FSDP2, see `weight_bytes`)."""
    explicit = {True: "on", False: "off", "offload": "offload"}.get(config.gradient_checkpointing)
    if explicit == "offload" and backend != "unsloth":
        raise ConfigError(["gradient_checkpointing='offload' is Unsloth's offloaded checkpointing; "
                           "with backend='peft' use True or False"])
    if not hw.is_gpu or shape is None:
        return explicit or "off", CPU_MAX_AUTO_MICRO_BATCH, ([] if explicit else ["gradient checkpointing off (CPU)"])
    quant = "4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None
    options = [explicit] if explicit else ["off", "on", "offload"] if backend == "unsloth" else ["off", "on"]
    wanted = config.micro_batch_size if isinstance(config.micro_batch_size, int) else 1
    for mode in options:
        fits = max_micro_batch_that_fits(shape, seq_len, mode, hw.free_memory_gib, quant, backend, fsdp_shards)
        if fits >= wanted or mode == options[-1]:
            why = f"estimated {fits} sequence(s) of {seq_len} tokens fit in {MEMORY_HEADROOM:.0%} of {hw.free_memory_gib:.0f} GiB free"
            notes = [] if explicit else [f"gradient checkpointing {mode} ({why})"]
            return mode, min(max(fits, 1), MAX_AUTO_MICRO_BATCH), notes
    raise AssertionError("unreachable")


def resolve_optimizer(config: LoraSFTConfig, hw: Hardware, sharded: bool = False) -> tuple[str, list[str]]:
    """The optimizer (HF name). Under FSDP2 (`sharded`) the trainable parameters are DTensor shards, which
    bitsandbytes' 8-bit and paged optimizers do not take; torch's AdamW does."""
    if config.optim is not None:
        if not hw.is_gpu and ("8bit" in config.optim or "paged" in config.optim):
            raise ConfigError([f"optim={config.optim!r}: 8-bit and paged optimizers need a GPU; on the CPU use "
                               "'adamw_torch_fused' (default) or 'adamw_torch'"])
        if sharded and ("8bit" in config.optim or "paged" in config.optim):
            raise ConfigError([f"optim={config.optim!r} with enable_model_splitting under a launch (FSDP2): "
                               "bitsandbytes' 8-bit and paged optimizers do not take sharded (DTensor) parameters; "
                               "use 'adamw_torch' (the default there) or leave optim unset"])
        return config.optim, []
    if sharded:
        return "adamw_torch", ["optimizer adamw_torch (FSDP2: the LoRA weights are DTensor shards, which "
                               "bitsandbytes' 8-bit optimizer does not take; LoRA's optimizer state is small)"]
    if hw.is_gpu and hw.bitsandbytes_installed:
        return "adamw_8bit", ["optimizer adamw_8bit (GPU default; bitsandbytes installed)"]
    if hw.is_gpu:
        return "adamw_torch_fused", ["optimizer adamw_torch_fused (bitsandbytes not installed)"]
    return "adamw_torch_fused", ["optimizer adamw_torch_fused (CPU default)"]


# SDPA backends for Unsloth's packed attention on torch's SDPA: cuDNN left out. Unsloth runs one SDPA call per
# run of equal document lengths there, and cuDNN plans each new length anew (~0.3 ms of CPU per call); with
# flash / memory-efficient only, the 1.5B shape trained 1.23x faster on an H100 (docs/benchmarks.md).
PACKED_SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
# Packed batches on the peft backend run one FlexAttention kernel per layer with a document mask
# (models/attention.py) instead of SDPA with a dense mask; the benchmark's lever rows switch these off.
PACKED_FLEX_ATTENTION = True
LIGER_KERNELS = True


def resolve_attention(config: LoraSFTConfig, hw: Hardware, backend: str, packing: bool,
                      sharded: bool = False) -> tuple[str, list[str] | None, list[str]]:
    """(the model's `attn_implementation`, SDPA backends to train under or None for torch's own choice, notes).

    With Unsloth the kernel is Unsloth's choice: FlashAttention when installed, else xformers when it loads,
    else torch's SDPA. With plain transformers + PEFT, packed batches on a GPU run FlexAttention when torch
    has it, except under FSDP2 sharding (`sharded`), where it was not run. The note names the one that will run.
    """
    from .models.attention import FLEX_ATTENTION

    if config.flash_attention and not hw.is_gpu:
        raise ConfigError(["flash_attention=True: FlashAttention needs a CUDA GPU; leave it unset on the CPU"])
    if config.flash_attention and not hw.flash_attn_installed:
        raise ConfigError(["flash_attention=True but the flash_attn package is not installed: "
                           "pip install flash-attn --no-build-isolation, or leave flash_attention unset to use SDPA"])
    if hw.is_gpu and hw.flash_attn_installed and config.flash_attention is not False:
        return "flash_attention_2", None, ["attention: FlashAttention 2 (installed)"]
    reason = "flash_attention=False" if config.flash_attention is False else "flash_attn not installed" if hw.is_gpu else "CPU"
    if hw.is_gpu and backend == "unsloth" and hw.xformers_usable:
        return "sdpa", None, [f"attention: xformers through Unsloth ({reason}; one block-diagonal kernel per packed batch)"]
    if hw.is_gpu and backend == "unsloth" and packing:
        return "sdpa", PACKED_SDPA_BACKENDS, [
            f"attention: PyTorch SDPA through Unsloth ({reason}, no usable xformers), flash / memory-efficient "
            "kernels only: packed batches make one call per document length, which cuDNN would plan anew each time"]
    if sharded and packing and hw.is_gpu:
        return "sdpa", None, [f"attention: PyTorch SDPA ({reason}; the packed FlexAttention route has not been run under "
                              "FSDP2 sharding)"]
    if hw.is_gpu and backend == "peft" and packing and PACKED_FLEX_ATTENTION and hw.flex_attention_usable:
        return FLEX_ATTENTION, None, [
            f"attention: FlexAttention ({reason}), one kernel per layer for each packed micro batch with a document "
            "mask; packed rows are padded to one length so that it compiles once"]
    return "sdpa", None, [f"attention: PyTorch SDPA ({reason})"]


def auto_backend(config: LoraSFTConfig, hw: Hardware) -> tuple[str | None, str]:
    """The backend `backend="auto"` trains with where the benchmark measured a winner, with the reason; None
    where Unsloth stays the choice (when it imports).

    Packed 16-bit LoRA on a GPU without FlashAttention: the peft backend's FlexAttention route (one kernel per
    layer, Liger kernels) against Unsloth's one SDPA call per document, one H200 (docs/benchmarks.md): 8B shape
    12,304 vs 11,261 tokens/s (1.09x), 1.5B shape 35,777 vs 17,717 (2.02x). QLoRA / 8-bit, unpacked batches,
    offloaded checkpointing and FlashAttention machines were not measured on it, and stay with Unsloth.
    """
    if not (hw.is_gpu and PACKED_FLEX_ATTENTION and hw.flex_attention_usable) or hw.flash_attn_installed:
        return None, ""
    if config.sample_packing is False or config.load_in_4bit or config.load_in_8bit:
        return None, ""
    if config.gradient_checkpointing == "offload" or config.flash_attention:
        return None, ""
    return "peft", ("backend peft (backend='auto'): packed 16-bit LoRA trains fastest here on the FlexAttention route, "
                    "one attention kernel per layer, where Unsloth would make one SDPA call per document "
                    "(no FlashAttention installed)")


def resolve_liger(hw: Hardware, backend: str) -> tuple[bool, list[str]]:
    """Liger's fused RMSNorm, SwiGLU and RoPE kernels on the peft backend (Unsloth has its own)."""
    if not (hw.is_gpu and backend == "peft" and LIGER_KERNELS):
        return False, []
    if not hw.liger_kernel_installed:
        return False, ["Liger kernels not used (liger-kernel not installed)"]
    return True, ["Liger kernels for RMSNorm, SwiGLU and RoPE (liger-kernel installed); the loss stays TRL's "
                  "fused LM head"]


def packed_length(attention: str, micro_batch_size: int, seq_len: int) -> int | None:
    """The static length packed rows are padded to under FlexAttention; None (pad to the batch's own) otherwise."""
    from .models.attention import FLEX_ATTENTION, static_packed_length

    return static_packed_length(micro_batch_size, seq_len) if attention == FLEX_ATTENTION else None


def resolve_packing(config: LoraSFTConfig, hw: Hardware, backend: str) -> tuple[bool, list[str]]:
    if config.sample_packing is None:
        return hw.is_gpu, [f"sample packing {'on (GPU default)' if hw.is_gpu else 'off (CPU default)'}"]
    if config.sample_packing and not hw.is_gpu and backend == "unsloth":
        raise ConfigError(["sample_packing=True on the CPU: Unsloth turns packing off there. Use backend='peft' "
                           "(padding-free packing with per-sample position ids), or leave sample_packing unset"])
    return config.sample_packing, []


def peak_tflops(hw: Hardware) -> float | None:
    if not hw.is_gpu or not hw.gpu_name:
        return None
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in hw.gpu_name), None)


def make_plan(config: LoraSFTConfig, hw: Hardware, backend: str, shape: ModelShape | None, world: int = 1,
              data: DataSummary | None = None, launched: bool = False) -> RunPlan:
    """All hardware-dependent decisions for one run, sized to the tokenized `data` when given; `launched`: the run's
    processes were started by a launcher (torchrun, or lora_sft itself), even a single one.

    Sequences are `max_seq_len` long when packed (and on a GPU, where batches are sized for the worst case);
    unpacked CPU batches are padded to their longest row at most. Raises ConfigError for impossible combinations."""
    if (config.load_in_4bit or config.load_in_8bit) and not hw.bitsandbytes_installed:
        raise ConfigError(["load_in_4bit/load_in_8bit need bitsandbytes: pip install bitsandbytes"])
    if config.load_in_8bit and not hw.is_gpu:
        raise ConfigError(["load_in_8bit=True needs a GPU (bitsandbytes' 8-bit matmul has no CPU kernel); "
                           "use load_in_4bit=True or 16-bit LoRA on the CPU"])
    packing, pack_notes = resolve_packing(config, hw, backend)
    seq_len = config.max_seq_len if (packing or hw.is_gpu or data is None) else max(1, data.tokens_max)
    mean_row_tokens = data.tokens_total / max(1, data.rows_out) if data is not None else None
    dtype, notes = resolve_precision(config, hw)
    quantization = "4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None
    splitting, split_notes = resolve_model_splitting(config.enable_model_splitting, hw, world, launched, quantization,
                                                     config.bnb_4bit_compute_dtype or dtype)
    checkpointing, max_micro, ckpt_notes = choose_checkpointing_and_micro(config, hw, shape, seq_len, backend,
                                                                          world if splitting == "fsdp2" else None)
    micro, accumulation, effective, batch_notes = resolve_batch(
        config.effective_batch_size, config.micro_batch_size, config.gradient_accumulation_steps, world, max_micro)
    optim, optim_notes = resolve_optimizer(config, hw, splitting == "fsdp2")
    attention, sdpa_backends, attn_notes = resolve_attention(config, hw, backend, packing, splitting == "fsdp2")
    liger, liger_notes = resolve_liger(hw, backend)
    return RunPlan(
        backend=backend, device=hw.device, dtype=dtype, tf32=config.tf32, world_size=world,
        micro_batch_size=micro, gradient_accumulation_steps=accumulation, effective_batch_size=effective,
        sample_packing=packing, gradient_checkpointing=checkpointing, optim=optim, attn_implementation=attention,
        sdpa_backends=sdpa_backends, packed_length=packed_length(attention, micro, seq_len), liger_kernel=liger,
        notes=notes + ckpt_notes + batch_notes + pack_notes + optim_notes + attn_notes + liger_notes + split_notes,
        flops_per_token=shape.flops_per_token((mean_row_tokens or seq_len) / 2, checkpointing != "off") if shape else None,
        peak_tflops=peak_tflops(hw), model_splitting=splitting,
    )
