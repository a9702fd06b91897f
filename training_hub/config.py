"""The run configuration: one typed dataclass, validated as a whole before anything heavy happens.

`LoraSFTConfig` is the single source of truth for parameter names, types and defaults: `lora_sft`'s
signature repeats them (a test keeps the two in step) and the CLI is derived from the dataclass.
Validation here is pure Python (no torch, no transformers) so a wrong name or value fails in
milliseconds; choices that depend on the hardware (precision, batch, packing) are made in `plan.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from .data.schema import DatasetType
from .data.schema import TruncationMode as Truncation

Backend = Literal["auto", "unsloth", "peft"]
GradientCheckpointing = Union[bool, Literal["auto", "offload"]]
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]
# Hugging Face optimizer names we have run; others are refused rather than passed on untested.
Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
    "paged_adamw_32bit", "adafactor", "sgd", "adagrad", "rmsprop", "lion_8bit", "paged_lion_8bit",
]
# PiSSA/OLoRA rewrite the base weights (the saved adapter would need the modified base) and EVA needs a data
# pass before training: not offered rather than half honoured.
InitLoraWeights = Union[bool, Literal["gaussian"]]
ComputeDtype = Literal["bfloat16", "float16", "float32"]


class ConfigError(ValueError):
    """One or more parameters are invalid; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} invalid parameter(s):\n{lines}")


@dataclass
class LoraSFTConfig:
    """Everything a LoRA/QLoRA supervised fine-tuning run needs. See docs/parameters.md."""

    # What to train and where to write it.
    model_path: str
    data_path: Any
    ckpt_output_dir: str
    backend: Backend = "auto"

    # LoRA.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: InitLoraWeights = True
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, int] | None = None
    loftq_config: dict[str, Any] | None = None
    lora_adapter: str | None = None

    # Data.
    dataset_type: DatasetType = "auto"
    field_messages: str = "messages"
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    train_on_inputs: bool = False
    truncation: Truncation = "truncate"
    max_seq_len: int = 2048
    sample_packing: bool | None = None
    data_output_dir: str | None = None
    dataloader_num_workers: int = 0
    eval_data_path: Any = None
    eval_steps: int | None = None
    eval_split: float | None = None

    # Optimisation.
    num_epochs: int = 3
    max_steps: int | None = None
    effective_batch_size: int | None = None
    micro_batch_size: int | Literal["auto"] | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: LrScheduler = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    optim: Optimizer | None = None
    gradient_checkpointing: GradientCheckpointing = "auto"
    seed: int = 42

    # Precision, kernels, quantization.
    bf16: bool | None = None
    fp16: bool | None = None
    tf32: bool | None = None
    flash_attention: bool | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: ComputeDtype | None = None
    bnb_4bit_use_double_quant: bool = True
    max_tokens_per_gpu: int | None = None

    # Saving, resuming, logging.
    save_steps: int = 500
    save_total_limit: int | None = 3
    logging_steps: int = 1
    overwrite_output_dir: bool = False
    resume_from_checkpoint: bool | Literal["auto"] | str | None = None
    save_merged: bool = False
    save_samples: int | None = None
    checkpoint_at_epoch: bool | None = None
    accelerate_full_state_at_epoch: bool | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    tensorboard_log_dir: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None
    report_to: list[str] | None = None

    # Distributed.
    nproc_per_node: int | Literal["auto", "gpu"] | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    rdzv_id: int | str | None = None
    rdzv_endpoint: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    enable_model_splitting: bool = False

    # Misc.
    trust_remote_code: bool = False
    callbacks: list[Any] | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        problems = type_problems(self) or value_problems(self)
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callbacks and in-memory datasets are described, not serialised)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "callbacks" and value:
                value = [type(c).__name__ for c in value]
            elif f.name in ("data_path", "eval_data_path") and value is not None and not isinstance(value, str):
                value = f"<in-memory {type(value).__name__}>"
            out[f.name] = value
        return out


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoraSFTConfig))

# Parameters whose feature is not built yet: any value other than the default is refused with this reason,
# never silently ignored.
NOT_SUPPORTED_YET: dict[str, str] = {
    "loftq_config": ("LoftQ initialisation (its adapter is only right with the quantized base it was fitted to, not "
                     "with the 16-bit base that is saved, merged and served; use load_in_4bit=True)"),
    "max_tokens_per_gpu": ("token-budget batching (use sample_packing with micro_batch_size: a packed micro batch holds "
                           "at most micro_batch_size x max_seq_len tokens)"),
    "nnodes": "multi-node training",
    "node_rank": "multi-node training",
    "rdzv_id": "multi-node training",
    "rdzv_endpoint": "multi-node training",
    "master_addr": "multi-node training",
    "master_port": "multi-node training",
    "enable_model_splitting": "splitting one model over several GPUs",
}


def check_parameter_names(func_name: str, given: typing.Iterable[str], valid: typing.Iterable[str] = PARAMETER_NAMES):
    """Raise TypeError for the first unknown keyword, suggesting the closest valid name."""
    valid = list(valid)
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " See docs/parameters.md for the full list."
            raise TypeError(f"{func_name}() got an unexpected keyword argument '{name}'.{hint}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """A small runtime check of the annotations used in LoraSFTConfig."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_problems(config: LoraSFTConfig) -> list[str]:
    hints = typing.get_type_hints(LoraSFTConfig)
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            problems.append(f"{f.name}={value!r}: expected {_type_name(hints[f.name])}")
    return problems


def _positive(config, names, allow_none=False, allow_zero=False) -> list[str]:
    out = []
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0)):
            continue
        bound = ">= 0" if allow_zero else "> 0"
        out.append(f"{name}={value!r}: must be a number {bound}")
    return out


def value_problems(config: LoraSFTConfig) -> list[str]:
    """Every value problem at once (types are already known to be right)."""
    c = config
    p: list[str] = []
    for name in ("model_path", "ckpt_output_dir"):
        if not str(getattr(c, name)).strip():
            p.append(f"{name} is empty: give a path (or, for model_path, a hub id)")
    model = str(c.model_path)
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        p.append(f"model_path={model!r}: no such folder (give a local model folder, or a hub id like 'Qwen/Qwen2.5-1.5B')")
    if c.data_path is None or (isinstance(c.data_path, str) and not c.data_path.strip()):
        p.append("data_path is empty: give a .jsonl/.json/.parquet/.csv file, a folder, a list of dicts or a Dataset")
    p += _positive(c, ["lora_r", "lora_alpha", "num_epochs", "learning_rate", "max_seq_len", "save_steps", "logging_steps"])
    p += _positive(c, ["max_steps", "effective_batch_size", "gradient_accumulation_steps", "save_total_limit",
                       "save_samples"], allow_none=True)
    p += _positive(c, ["warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"], allow_zero=True)
    if c.micro_batch_size is not None and c.micro_batch_size != "auto":
        p += _positive(c, ["micro_batch_size"])
    if not 0.0 <= c.lora_dropout < 1.0:
        p.append(f"lora_dropout={c.lora_dropout!r}: must be in [0, 1)")
    if c.target_modules is not None and not c.target_modules:
        p.append("target_modules=[]: give module names (e.g. ['q_proj', 'v_proj']) or None for all linear projections")
    for name in ("rank_pattern", "alpha_pattern"):
        bad = {k: v for k, v in (getattr(c, name) or {}).items() if v <= 0}
        if bad:
            p.append(f"{name}={bad!r}: ranks/alphas must be > 0")
    if c.eval_steps is not None and c.eval_data_path is None and c.eval_split is None:
        p.append(f"eval_steps={c.eval_steps}: evaluation needs eval_data_path (a file or dataset like data_path) "
                 "or eval_split (a share of the training rows)")
    p += _positive(c, ["eval_steps"], allow_none=True)
    if c.eval_split is not None and not 0.0 < c.eval_split < 1.0:
        p.append(f"eval_split={c.eval_split!r}: the share of training rows held out for evaluation, in (0, 1)")
    if c.eval_split is not None and c.eval_data_path is not None:
        p.append("eval_split and eval_data_path are both given: evaluate on a separate file or on a split, not both")
    if c.load_in_4bit and c.load_in_8bit:
        p.append("load_in_4bit and load_in_8bit are both True: choose one")
    if c.bf16 and c.fp16:
        p.append("bf16 and fp16 are both True: choose one (or neither, to let training_hub pick for the hardware)")
    if c.use_dora and c.load_in_8bit:
        p.append("use_dora with load_in_8bit is not supported by PEFT: use load_in_4bit or 16-bit")
    launched = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if c.nproc_per_node is not None and c.nproc_per_node != launched:
        p.append(f"nproc_per_node={c.nproc_per_node!r}: launching the processes from lora_sft is not supported yet, and "
                 f"this launch has {launched} process(es) per node; run `torchrun --nproc-per-node N script.py` "
                 "and leave nproc_per_node unset (or equal to N)")
    if not c.load_in_4bit:
        ignored = [n for n in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
                   if getattr(c, n) != LoraSFTConfig.__dataclass_fields__[n].default]
        if ignored:
            p.append(f"{', '.join(ignored)} set without load_in_4bit=True: they only apply to 4-bit loading")
    if c.callbacks is not None:
        p += _callback_problems(c.callbacks)
    if c.overwrite_output_dir and c.resume_from_checkpoint not in (None, False):
        p.append(f"overwrite_output_dir=True with resume_from_checkpoint={c.resume_from_checkpoint!r}: choose one "
                 "(overwriting deletes the checkpoints a resume would continue from)")
    if isinstance(c.resume_from_checkpoint, str) and not c.resume_from_checkpoint.strip():
        p.append("resume_from_checkpoint='': give True, 'auto' or a checkpoint-N folder")
    if c.lora_adapter is not None and not c.lora_adapter.strip():
        p.append("lora_adapter='': give the folder of a PEFT LoRA adapter (adapter_config.json) or None")
    for name, feature in NOT_SUPPORTED_YET.items():
        default = LoraSFTConfig.__dataclass_fields__[name].default
        if getattr(c, name) != default:
            p.append(f"{name}={getattr(c, name)!r}: {feature} is not supported yet; leave it at {default!r}")
    return p


def _callback_problems(callbacks: list[Any]) -> list[str]:
    out = []
    for i, cb in enumerate(callbacks):
        if not any(hasattr(cb, m) for m in ("on_log", "on_step_end", "on_train_begin", "on_train_end", "on_save")):
            out.append(f"callbacks[{i}]={cb!r}: expected a transformers.TrainerCallback (class or instance)")
    return out


def output_dir_problems(ckpt_output_dir: str | Path, overwrite_output_dir: bool,
                        resume_from_checkpoint: bool | str | None = None) -> list[str]:
    """Refuse to mix a new run into a folder that holds earlier work (checked before anything is written).

    Resuming continues the run in the folder (checkpoints.find_resume_point checks what it holds)."""
    out = Path(ckpt_output_dir)
    if out.exists() and not out.is_dir():
        return [f"ckpt_output_dir={str(out)!r} exists and is not a folder"]
    resuming = resume_from_checkpoint not in (None, False)
    if not out.is_dir() or overwrite_output_dir or resuming:
        return []
    earlier = sorted(
        p.name for p in out.iterdir()
        if p.name in ("adapter_model.safetensors", "training_metrics.jsonl", "run_config.json") or p.name.startswith("checkpoint-")
    )
    if earlier:
        return [f"ckpt_output_dir={str(out)!r} already holds a run ({', '.join(earlier[:4])}): choose a new folder, "
                "pass resume_from_checkpoint=True (or 'auto') to continue it, or overwrite_output_dir=True to replace it"]
    return []
