"""Facts about the machine and the process group, read once per run."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """What the run can use. Memory figures are GiB, for the GPU this process trains on."""

    device: str  # "cuda" or "cpu"
    gpu_name: str | None = None
    gpu_count: int = 0
    bf16_supported: bool = False
    total_memory_gib: float | None = None
    free_memory_gib: float | None = None
    flash_attn_installed: bool = False
    xformers_usable: bool = False  # installed, and its compiled kernels load with this torch
    bitsandbytes_installed: bool = False
    flex_attention_usable: bool = False  # torch's FlexAttention can train here (torch >= 2.6 with Triton)
    liger_kernel_installed: bool = False

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"

    def describe(self) -> str:
        if not self.is_gpu:
            return f"CPU ({os.cpu_count()} cores)"
        return f"{self.gpu_name} ({self.total_memory_gib:.0f} GiB, {self.free_memory_gib:.1f} GiB free) x{self.gpu_count}"


def world_size() -> int:
    """Processes in the job (set by torchrun); 1 for a plain `python` run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gpu_count() -> int:
    """CUDA GPUs this process can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def xformers_usable() -> bool:
    """xformers is installed and its compiled kernels load with this torch: only then does Unsloth use it (a
    wheel built for another torch imports, warns, and is skipped)."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers
    except Exception:
        return False
    return bool(getattr(xformers, "_has_cpp_library", False))


def detect() -> Hardware:
    """Inspect torch's view of the accelerator this process would train on."""
    import torch

    from .models.attention import flex_attention_problem

    common = dict(
        flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
        xformers_usable=xformers_usable(),
        bitsandbytes_installed=importlib.util.find_spec("bitsandbytes") is not None,
        flex_attention_usable=flex_attention_problem() is None,
        liger_kernel_installed=importlib.util.find_spec("liger_kernel") is not None,
    )
    if not torch.cuda.is_available():
        return Hardware(device="cpu", **common)
    index = local_rank() % torch.cuda.device_count()
    free, total = torch.cuda.mem_get_info(index)
    return Hardware(
        device="cuda",
        gpu_name=torch.cuda.get_device_name(index),
        gpu_count=torch.cuda.device_count(),
        bf16_supported=torch.cuda.is_bf16_supported(),
        total_memory_gib=total / 2**30,
        free_memory_gib=free / 2**30,
        **common,
    )
