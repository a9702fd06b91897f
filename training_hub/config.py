"""The run configuration: one typed dataclass, validated as a whole before anything heavy happens.

`LoraSFTConfig` is the single source of truth for parameter names, types and defaults: `lora_sft`'s
signature repeats them (a test keeps the two in step) and the CLI is derived from the dataclass.
Validation here is pure Python (no torch, no transformers) so a wrong name or value fails in
milliseconds; choices that depend on the hardware (precision, batch, packing) are made in `plan.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from .data.schema import DatasetType
from .data.schema import TruncationMode as Truncation
from .data.settings import settings_problems
from .distributed import launch_problems

Backend = Literal["auto", "unsloth", "peft"]
GradientCheckpointing = Union[bool, Literal["auto", "offload"]]
# transformers' "cosine_with_min_lr" and "warmup_stable_decay" are not offered: they need scheduler arguments
# (min_lr / num_decay_steps) that lora_sft does not take, and would fail only after the model has loaded.
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
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


REQUIRED = dataclasses.MISSING
DATA_PATH_FIELDS = ("data_path", "eval_data_path", "pre_lora_data_path")  # a path, or rows/a Dataset in memory


def param(default: Any, doc: str) -> Any:
    """A config field with its one-line documentation (`REQUIRED` for the three positional parameters)."""
    if default is REQUIRED:
        return dataclasses.field(metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


class ConfigError(ValueError):
    """One or more parameters are invalid; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} invalid parameter(s):\n{lines}")


@dataclass
class LoraSFTConfig:
    """Everything a LoRA/QLoRA supervised fine-tuning run needs: each field's one-line doc is written here, once.

    `lora_sft`'s docstring, `training-hub lora-sft --help` and docs/parameters.md are checked against these
    docs by tests (`training_hub.reference` regenerates them)."""

    # What to train and where to write it.
    model_path: str = param(REQUIRED, "local folder or hub id of a causal LM")
    data_path: Any = param(REQUIRED, "training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a list "
                                     "of dicts or a datasets.Dataset, in any format of docs/data.md (detected)")
    ckpt_output_dir: str = param(REQUIRED, "output folder for the adapter, tokenizer, run_config.json, "
                                           "training_metrics.jsonl and checkpoint-N folders (docs/checkpoints.md)")
    backend: Backend = param("auto", "'unsloth' (fused kernels), 'peft' (plain transformers + PEFT), or 'auto': packed "
                                     "16-bit LoRA on a GPU with FlexAttention and no FlashAttention trains on the peft "
                                     "backend's FlexAttention route (measured faster, docs/benchmarks.md), otherwise "
                                     "Unsloth when it imports, else PEFT with a notice; the choice is printed")

    # LoRA.
    lora_r: int = param(16, "LoRA rank (> 0)")
    lora_alpha: int = param(32, "LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = param(0.0, "dropout on the LoRA input, in [0, 1) (0 keeps Unsloth's fast path)")
    target_modules: list[str] | None = param(None, "module names to adapt; None: every linear projection inside "
                                                   "the decoder blocks (q/k/v/o/gate/up/down for Llama/Qwen)")
    use_rslora: bool = param(False, "rank-stabilised LoRA scaling (alpha / sqrt(r))")
    use_dora: bool = param(False, "DoRA (weight-decomposed LoRA; vLLM cannot serve DoRA adapters)")
    init_lora_weights: InitLoraWeights = param(True, "PEFT's LoRA initialisation: True, False or 'gaussian' "
                                                     "(PiSSA/OLoRA/EVA are not offered: they change the base or need a data pass)")
    rank_pattern: dict[str, int] | None = param(None, "per-module rank overrides, PEFT semantics (e.g. {'q_proj': 8})")
    alpha_pattern: dict[str, int] | None = param(None, "per-module alpha overrides, PEFT semantics")
    loftq_config: dict[str, Any] | None = param(None, "LoftQ initialisation settings (refused: see below)")
    lora_adapter: str | None = param(None, "a saved PEFT LoRA adapter folder to continue training from; its r, "
                                           "alpha, targets and dropout are used")
    finetune_vision_layers: bool = param(False, "vision-language models: adapt the vision encoder's linear layers "
                                                "(a text-only model must leave it False)")
    finetune_language_layers: bool = param(True, "vision-language models: adapt the language model's linear layers "
                                                 "(a text-only model must leave it True)")

    # Data.
    dataset_type: DatasetType = param("auto", "the rows' format; 'auto' detects it from their fields (docs/data.md)")
    field_messages: str = param("messages", "column holding the conversation")
    field_instruction: str = param("instruction", "alpaca instruction column")
    field_input: str = param("input", "alpaca input column")
    field_output: str = param("output", "alpaca output column")
    train_on_inputs: bool = param(False, "loss on every token; False: on assistant answers (and their end-of-turn "
                                         "token) only")
    train_on_reasoning: bool = param(True, "train on assistant reasoning (reasoning_content) as part of the answer; "
                                           "False: render it as context only")
    truncation: Truncation = param("truncate", "rows longer than max_seq_len: 'truncate' (keep the start), 'drop', "
                                               "or 'error' naming the row")
    max_seq_len: int = param(2048, "tokens per sequence and per packed bin (>= 2)")
    sample_packing: bool | None = param(None, "pack several rows per sequence; None: on with a GPU, off on the CPU "
                                              "(True on the CPU needs backend='peft')")
    data_output_dir: str | None = param(None, "tokenized-data cache folder (default ~/.cache/training_hub/data; "
                                               "'none' disables it)")
    dataloader_num_workers: int = param(0, "processes collating batches; 0 collates in the training process")
    eval_data_path: Any = param(None, "evaluation data, read and tokenized exactly like data_path; eval_loss is "
                                      "logged")
    eval_steps: int | None = param(None, "evaluate every N steps; None: once per epoch (needs eval_data_path or "
                                         "eval_split)")
    eval_split: float | None = param(None, "hold out this share of the training rows, in (0, 1), for evaluation")

    # Phase 1 (optional): every parameter of the base trained on other data before the LoRA run (docs/two_phase.md).
    pre_lora_data_path: Any = param(None, "phase 1's data (text rows, or any format of docs/data.md): every parameter "
                                          "of the base is trained on it first and saved as a 16-bit model in "
                                          "ckpt_output_dir/pre_lora/model, the base of the LoRA run; None: no phase 1")
    pre_lora_max_steps: int | None = param(None, "phase 1's optimizer steps; overrides pre_lora_num_epochs")
    pre_lora_num_epochs: int = param(1, "phase 1's passes over its data (unless pre_lora_max_steps)")
    pre_lora_learning_rate: float = param(2e-5, "phase 1's peak learning rate (a full fine-tune wants a lower one "
                                                "than LoRA)")

    # Optimisation.
    num_epochs: int = param(3, "passes over the data (unless max_steps)")
    max_steps: int | None = param(None, "optimizer steps; overrides num_epochs")
    effective_batch_size: int | None = param(None, "sequences per optimizer step over all processes; give any two "
                                                   "of the three batch settings and the third is derived")
    micro_batch_size: int | Literal["auto"] | None = param(None, "sequences per forward pass per process; 'auto': "
                                                                 "the largest that fits; None with nothing else: 2")
    gradient_accumulation_steps: int | None = param(None, "forward passes per optimizer step")
    learning_rate: float = param(2e-4, "peak learning rate")
    lr_scheduler: LrScheduler = param("linear", "transformers learning-rate schedule (cosine_with_min_lr and "
                                                "warmup_stable_decay are refused: they need arguments lora_sft does not take)")
    warmup_steps: int = param(10, "linear warm-up steps")
    weight_decay: float = param(0.01, "AdamW weight decay")
    max_grad_norm: float = param(0.3, "gradient clipping norm")
    optim: Optimizer | None = param(None, "transformers optimizer name; None: adamw_8bit on a GPU with "
                                          "bitsandbytes, else adamw_torch_fused")
    gradient_checkpointing: GradientCheckpointing = param("auto", "'auto': the cheapest of off / on / offload that "
                                                                  "fits in GPU memory (off on the CPU); 'offload' is "
                                                                  "Unsloth's offloaded checkpointing")
    seed: int = param(42, "seeds data order, dropout and the LoRA initialisation")

    # Precision, kernels, quantization.
    bf16: bool | None = param(None, "bfloat16 training; None: bf16 on GPUs that have it, float32 on the CPU; "
                                    "False: float32 unless fp16=True")
    fp16: bool | None = param(None, "float16 training (GPU only); None: only on GPUs without bf16")
    tf32: bool | None = param(None, "TF32 matmuls on NVIDIA GPUs")
    flash_attention: bool | None = param(None, "None: FlashAttention 2 when flash_attn is installed, else SDPA (on "
                                               "the peft backend, packed GPU batches use FlexAttention: one kernel per "
                                               "layer); True without flash_attn is an error")
    load_in_4bit: bool = param(False, "QLoRA: 4-bit (bitsandbytes) base weights")
    load_in_8bit: bool = param(False, "8-bit base weights (GPU only)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = param("nf4", "4-bit data type (with load_in_4bit)")
    bnb_4bit_compute_dtype: ComputeDtype | None = param(None, "4-bit compute dtype; None: the training dtype")
    bnb_4bit_use_double_quant: bool = param(True, "quantize the 4-bit quantization constants too")
    max_tokens_per_gpu: int | None = param(None, "token budget per micro batch")

    # Saving, resuming, logging.
    save_steps: int = param(500, "checkpoint every N optimizer steps and at the end")
    save_total_limit: int | None = param(3, "complete checkpoints kept (None: all)")
    logging_steps: int = param(1, "log every N steps: one console line (loss, learning rate, gradient norm, tokens/s, "
                                  "ETA), one training_metrics.jsonl row, the trackers; loss.png and a README.md "
                                  "model card are written at the end")
    overwrite_output_dir: bool = param(False, "replace an earlier run in ckpt_output_dir (not with "
                                              "resume_from_checkpoint)")
    resume_from_checkpoint: bool | Literal["auto"] | str | None = param(
        None, "True: continue from the newest complete checkpoint; 'auto': that, or start fresh; a path: that "
              "checkpoint")
    save_merged: bool = param(False, "also write ckpt_output_dir/merged: the LoRA folded into the 16-bit base")
    save_samples: int | None = param(None, "also checkpoint each time another N training sequences have been seen "
                                           "(step x effective batch)")
    checkpoint_at_epoch: bool | None = param(None, "also checkpoint at the end of every epoch")
    accelerate_full_state_at_epoch: bool | None = param(None, "also checkpoint the full training state (adapter, "
                                                              "optimizer, scheduler, RNG) at every epoch end")
    wandb_project: str | None = param(None, "log to Weights & Biases in this project (any wandb_* turns it on; rank 0 "
                                            "starts and ends the run; offline mode and the key stay wandb's settings; "
                                            "the wandb extra)")
    wandb_entity: str | None = param(None, "Weights & Biases entity (team or user)")
    wandb_run_name: str | None = param(None, "Weights & Biases run name")
    tensorboard_log_dir: str | None = param(None, "folder for TensorBoard event files (the tensorboard extra)")
    mlflow_tracking_uri: str | None = param(None, "log to MLflow at this URI: a server, or sqlite:///path/mlflow.db "
                                                  "(any mlflow_* turns it on; rank 0 starts the run and ends it FINISHED "
                                                  "or FAILED; the mlflow extra)")
    mlflow_experiment_name: str | None = param(None, "MLflow experiment (created if missing)")
    mlflow_run_name: str | None = param(None, "MLflow run name")
    report_to: list[str] | None = param(None, "other transformers logging integrations by name (e.g. ['comet_ml']); "
                                              "wandb, mlflow and tensorboard are set up by their own parameters")

    # Distributed.
    nproc_per_node: int | Literal["auto", "gpu"] | None = param(
        None, "processes per node: from plain python, N > 1 makes lora_sft start N workers itself and return "
              "their result; 'auto': every visible GPU (1 on a CPU-only machine); 'gpu': every visible GPU; under "
              "torchrun it must equal torchrun's (docs/distributed.md)")
    nnodes: int | None = param(None, "nodes of a self-launched job (each node runs the same call); needs "
                                     "rdzv_endpoint, or master_addr with node_rank")
    node_rank: int | None = param(None, "this node's number, 0..nnodes-1 (node 0 hosts the rendezvous); unset with "
                                        "rdzv_endpoint: nodes are numbered on arrival")
    rdzv_id: int | str | None = param(None, "the job's id, the same on every node")
    rdzv_endpoint: str | None = param(None, "'host:port' where the nodes meet (c10d); not with master_addr/master_port")
    master_addr: str | None = param(None, "the torchrun-style meeting host, with node_rank")
    master_port: int | None = param(None, "the torchrun-style meeting port (default 29500)")
    enable_model_splitting: bool = param(False, "for a model larger than one GPU (peft backend): under a launch "
                                                "(torchrun, nproc_per_node, nnodes) FSDP2 shards the base, LoRA and "
                                                "optimizer state over the GPU processes (each holds 1/N; the adapter "
                                                "is saved whole); one plain process spreads the layers over its GPUs "
                                                "(device_map='balanced'). Refused with CPU processes (accelerate runs "
                                                "FSDP on GPUs only), with load_in_8bit under a launch, with "
                                                "backend='unsloth', and in one process with fewer than 2 GPUs "
                                                "(docs/distributed.md)")

    # Misc.
    trust_remote_code: bool = param(False, "allow the model's own Python code to run")
    callbacks: list[Any] | None = param(None, "transformers TrainerCallbacks added to the trainer (Python only)")
    dry_run: bool = param(False, "validate, read and tokenize the data, print the plan and the steps, epochs and "
                                 "tokens the run would take; load no model, write nothing (any ckpt_output_dir will do)")

    def __post_init__(self) -> None:
        problems = type_problems(self) or value_problems(self)
        if problems:
            raise ConfigError(problems)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every parameter that has a default, with it."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not REQUIRED}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callbacks and in-memory datasets are described, not serialised)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "callbacks" and value:
                value = [type(c).__name__ for c in value]
            elif f.name in DATA_PATH_FIELDS and value is not None and not isinstance(value, str):
                value = f"<in-memory {type(value).__name__}>"
            out[f.name] = value
        return out


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoraSFTConfig))
PARAMETER_DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in dataclasses.fields(LoraSFTConfig)}

# Parameters whose feature is not built yet: any value other than the default is refused with this reason,
# never silently ignored.
NOT_SUPPORTED_YET: dict[str, str] = {
    "loftq_config": ("LoftQ initialisation (its adapter is only right with the quantized base it was fitted to, not "
                     "with the 16-bit base that is saved, merged and served; use load_in_4bit=True)"),
    "max_tokens_per_gpu": ("token-budget batching (use sample_packing with micro_batch_size: a packed micro batch holds "
                           "at most micro_batch_size x max_seq_len tokens)"),
}


def check_parameter_names(func_name: str, given: typing.Iterable[str], valid: typing.Iterable[str] = PARAMETER_NAMES):
    """Raise TypeError for the first unknown keyword, suggesting the closest valid name."""
    valid = list(valid)
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " See docs/parameters.md for the full list."
            raise TypeError(f"{func_name}() got an unexpected keyword argument '{name}'.{hint}")


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) in (list, dict):
        return f"{typing.get_origin(tp).__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is Any:
        return "Any"
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
            problems.append(f"{f.name}={value!r}: expected {type_name(hints[f.name])}")
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
    if c.data_path is None or (isinstance(c.data_path, str) and not c.data_path.strip()):
        p.append("data_path is empty: give a .jsonl/.json/.parquet/.csv file, a folder, a list of dicts or a Dataset")
    p += _positive(c, ["lora_r", "lora_alpha", "num_epochs", "learning_rate", "save_steps", "logging_steps"])
    p += settings_problems(c.max_seq_len, c.truncation)
    p += _positive(c, ["max_steps", "effective_batch_size", "gradient_accumulation_steps", "save_total_limit",
                       "save_samples"], allow_none=True)
    p += _positive(c, ["warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"], allow_zero=True)
    p += launch_problems(c, {})  # the launch settings' own values; against a running launch: environment.py
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
    p += _evaluation_problems(c)
    if c.load_in_4bit and c.load_in_8bit:
        p.append("load_in_4bit and load_in_8bit are both True: choose one")
    if c.bf16 and c.fp16:
        p.append("bf16 and fp16 are both True: choose one (or neither, to let training_hub pick for the hardware)")
    if c.use_dora and c.load_in_8bit:
        p.append("use_dora with load_in_8bit is not supported by PEFT: use load_in_4bit or 16-bit")
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
    if not (c.finetune_vision_layers or c.finetune_language_layers):
        p.append("finetune_vision_layers=False and finetune_language_layers=False: nothing would be adapted; set one "
                 "of them True")
    if c.lora_adapter is not None and not c.lora_adapter.strip():
        p.append("lora_adapter='': give the folder of a PEFT LoRA adapter (adapter_config.json) or None")
    from .pre_lora import pre_lora_problems  # here: pre_lora imports outputs, which imports this module

    p += pre_lora_problems(c)
    for name, feature in NOT_SUPPORTED_YET.items():
        default = LoraSFTConfig.__dataclass_fields__[name].default
        if getattr(c, name) != default:
            p.append(f"{name}={getattr(c, name)!r}: {feature} is not supported yet; leave it at {default!r}")
    return p


def _evaluation_problems(c: LoraSFTConfig) -> list[str]:
    p = _positive(c, ["eval_steps"], allow_none=True)
    if c.eval_steps is not None and c.eval_data_path is None and c.eval_split is None:
        p.append(f"eval_steps={c.eval_steps}: evaluation needs eval_data_path (a file or dataset like data_path) "
                 "or eval_split (a share of the training rows)")
    if c.eval_split is not None and not 0.0 < c.eval_split < 1.0:
        p.append(f"eval_split={c.eval_split!r}: the share of training rows held out for evaluation, in (0, 1)")
    if c.eval_split is not None and c.eval_data_path is not None:
        p.append("eval_split and eval_data_path are both given: evaluate on a separate file or on a split, not both")
    return p


def _callback_problems(callbacks: list[Any]) -> list[str]:
    out = []
    for i, cb in enumerate(callbacks):
        if not any(hasattr(cb, m) for m in ("on_log", "on_step_end", "on_train_begin", "on_train_end", "on_save")):
            out.append(f"callbacks[{i}]={cb!r}: expected a transformers.TrainerCallback (class or instance)")
    return out
