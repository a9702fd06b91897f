"""Config -> TRL SFTConfig/SFTTrainer, and the callbacks every run carries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import LoraSFTConfig
from .hardware import is_main_process
from .plan import RunPlan


def build_sft_config(config: LoraSFTConfig, plan: RunPlan, output_dir: Path, evaluate: bool = False,
                     own_collator: bool = False, layer_classes: list[str] | None = None):
    """Every TrainingArguments field that matters is passed explicitly: Unsloth patches the defaults.
    `own_collator`: the rows are the collator's input (vision: text and image sources), kept whole.
    `layer_classes`: the model's decoder layer classes, each its own FSDP2 unit (plan.model_splitting "fsdp2")."""
    from trl import SFTConfig

    sharded = plan.model_splitting == "fsdp2"
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=plan.optim,
        seed=config.seed,
        data_seed=config.seed,
        bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16",
        tf32=plan.tf32,
        use_cpu=plan.device == "cpu",
        # Unsloth applies its own checkpointing in get_peft_model; TRL's would wrap it a second time. Under FSDP2
        # FSDP's own activation checkpointing replaces it (fsdp_settings).
        gradient_checkpointing=plan.backend == "peft" and plan.gradient_checkpointing == "on" and not sharded,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=config.max_seq_len,
        packing=plan.sample_packing,
        packing_strategy="bfd",
        padding_free=plan.sample_packing,
        pad_to_multiple_of=plan.packed_length,  # FlexAttention: every packed row one length, compiled once
        use_liger_kernel=plan.liger_kernel,
        logging_steps=config.logging_steps,
        eval_strategy=("steps" if config.eval_steps else "epoch") if evaluate else "no",
        eval_steps=config.eval_steps,
        per_device_eval_batch_size=plan.micro_batch_size,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as is, so the divergence guard sees it
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotated by checkpoints.guard_callback, counting only complete checkpoints
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=plan.device == "cuda",
        dataloader_num_workers=config.dataloader_num_workers,
        ddp_find_unused_parameters=False if plan.world_size > 1 and not sharded else None,
        fsdp=sharded or None,
        fsdp_config=fsdp_settings(layer_classes or [], plan.gradient_checkpointing == "on") if sharded else None,
        remove_unused_columns=not own_collator,
        dataset_kwargs={"skip_prepare_dataset": True} if own_collator else None,
    )


def fsdp_settings(layer_classes: list[str], activation_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments' `fsdp_config` for sharding the model over the processes with FSDP2 (accelerate's
    fully_shard): each decoder layer its own unit, then the embeddings, the head and the rest. FULL_STATE_DICT: a
    checkpoint's adapter is gathered on rank 0 as a normal PEFT adapter (the trainable weights only, see
    `trainer_class`), and accelerate's resume state holds the LoRA weights and their optimizer state."""
    if not layer_classes:
        raise ValueError("enable_model_splitting under a launch shards each decoder layer, but this model names no "
                         "decoder layer class (its _no_split_modules is empty)")
    return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": layer_classes,
            "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": activation_checkpointing, "cpu_ram_efficient_loading": False}


def decoder_layer_classes(model) -> list[str]:
    """The model's decoder layer class names (transformers' `_no_split_modules`) that occur in it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(module).__name__ for module in base.modules()}
    return [name for name in (getattr(base, "_no_split_modules", None) or []) if name in present]


def gathered_adapter_state(model) -> dict[str, Any]:
    """The trainable (LoRA) weights of an FSDP2-sharded model as full tensors on rank 0's CPU (empty on the other
    ranks). Every rank must call it: the shards are gathered collectively. The frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def trainer_class(plan: RunPlan):
    """TRL's SFTTrainer without its model card, and on the CPU without Unsloth, with the loss computed the
    transformers way.

    TRL writes a README.md model card into the output folder each time it saves a checkpoint
    (`SFTTrainer._save_checkpoint` calls the public `create_model_card`); that can fail a run at a checkpoint
    (it raised NameError 'wandb' once) and would overwrite a user's README.md, so it is a no-op here.
    TRL 1.15 always computes the loss through a fused LM head whose kernel is Triton-only, so a plain PEFT
    model cannot train on a CPU with it (Unsloth replaces that head when it is imported). The CPU subclass
    returns `transformers.Trainer.compute_loss` (the model's own cross-entropy on the given labels);
    only TRL's entropy/token-accuracy metrics are lost. `use_cache=False` keeps packed samples apart
    (transformers builds block-diagonal masks from position ids only without a KV cache).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class NoModelCardSFTTrainer(SFTTrainer):
        def create_model_card(self, *args, **kwargs) -> None:
            """Not written: training_hub describes the output folder itself."""

    class ShardedSFTTrainer(NoModelCardSFTTrainer):
        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            """A checkpoint's adapter under FSDP2: only the trainable weights are gathered (Trainer's own save
            gathers the whole model, frozen base included, on rank 0's CPU at every checkpoint)."""
            folder = output_dir or self.args.output_dir
            state_dict = gathered_adapter_state(self.model)
            if self.args.should_save:
                self.model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(folder)

    if plan.model_splitting == "fsdp2":
        return ShardedSFTTrainer
    if not (plan.device == "cpu" and plan.backend == "peft"):
        return NoModelCardSFTTrainer

    class CPUSFTTrainer(NoModelCardSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CPUSFTTrainer


def build_trainer(model, tokenizer, train_dataset, eval_dataset, config: LoraSFTConfig, plan: RunPlan,
                  output_dir: Path, callbacks: list[Any], data_collator=None):
    """The trainer; `data_collator` (vision runs) replaces TRL's, and `tokenizer` is then the processor."""
    cls = trainer_class(plan)
    layers = decoder_layer_classes(model) if plan.model_splitting == "fsdp2" else None
    return cls(
        model=model,
        args=build_sft_config(config, plan, output_dir, evaluate=eval_dataset is not None,
                              own_collator=data_collator is not None, layer_classes=layers),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        callbacks=callbacks,
    )


def sdpa_backends(names: list[str] | None):
    """Training runs inside torch's scoped SDPA backend choice (`torch.nn.attention.sdpa_kernel`) when the plan
    restricts it; torch's own choice otherwise. The restriction ends with the context."""
    import contextlib

    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in names])


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def metrics_callback(path: Path, resumed: bool = False, phase: str | None = None):
    """A TrainerCallback writing one JSON object per logging step to `path`, flushed live (rank 0 only).

    After a resume the Trainer's end-of-run `train_loss` averages only the steps of this process over all the
    run's steps; the summary line gets the whole run's mean from the file instead (the figure run_config.json
    holds too). With `phase`, each row says which phase of a two-phase run wrote it."""
    from transformers import TrainerCallback

    from .checkpoints import resumed_train_loss

    class MetricsFileCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not is_main_process():
                return
            entry = {"step": state.global_step, "epoch": _jsonable(state.epoch), **({"phase": phase} if phase else {})}
            entry.update({k: _jsonable(v) for k, v in logs.items()})
            if resumed and "train_loss" in entry:
                entry["train_loss"] = resumed_train_loss(path) or entry["train_loss"]
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    return MetricsFileCallback()


def final_metrics(train_metrics: dict[str, Any], state, plan: RunPlan, resumed_metrics: Path | None = None,
                  tokens_before: int = 0) -> dict[str, Any]:
    """The Trainer's end-of-run metrics, plus tokens/s over this session's tokens, MFU and peak GPU memory.

    After a resume, train_loss is the whole run's (from the metrics file): the Trainer averages only the steps
    of this process over all steps."""
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in train_metrics.items()}
    if resumed_metrics is not None:
        from .checkpoints import resumed_train_loss

        metrics["train_loss"] = resumed_train_loss(resumed_metrics) or metrics.get("train_loss")
    runtime = metrics.get("train_runtime") or 0.0
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    this_session = tokens - tokens_before  # a resumed run's runtime covers only the steps after the checkpoint
    metrics.update(global_step=state.global_step, num_tokens=tokens,
                   tokens_per_second=this_session / runtime if runtime else 0.0)
    if plan.flops_per_token and plan.peak_tflops:
        metrics["mfu"] = metrics["tokens_per_second"] * plan.flops_per_token / (plan.peak_tflops * 1e12)
    if plan.device == "cuda":
        import torch

        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def train_to_the_end(trainer, stop, folder: Path, resume, plan: RunPlan, learning_rate: float,
                     contexts=()) -> dict[str, Any]:
    """`trainer.train()` from `resume`'s checkpoint under the stop guard: SIGTERM / Ctrl-C save and stop, a full disk
    is named, `plan`'s SDPA backends apply, plus `contexts` (e.g. tracker runs). Raises TrainingStopped when the
    guard or a signal stopped the run; returns the final metrics (`final_metrics`) otherwise."""
    import contextlib
    import logging

    from . import checkpoints, distributed, outputs

    if resume.checkpoint is not None and plan.world_size > 1 and plan.device == "cpu":
        distributed.allow_indexed_cpu_map_location()  # transformers loads the optimizer with map_location="cpu:0"
    tokens_before = resume.tokens_seen()
    with contextlib.ExitStack() as stack:
        for context in (*contexts, checkpoints.stop_on_signals(stop), sdpa_backends(plan.sdpa_backends),
                        checkpoints.disk_full_errors(folder)):
            stack.enter_context(context)
        output = trainer.train(resume_from_checkpoint=resume.trainer_argument)
    message = checkpoints.stopped_message(stop, folder, learning_rate, plan.dtype)
    if message is not None:
        logging.getLogger("training_hub").error(message)
        raise checkpoints.TrainingStopped(message)
    resumed_metrics = folder / outputs.METRICS_FILE if resume.checkpoint is not None else None
    return final_metrics(output.metrics, trainer.state, plan, resumed_metrics, tokens_before)


def save_schedule_callback(save_samples: int | None, effective_batch_size: int, at_epoch_end: bool):
    """A TrainerCallback asking for extra checkpoints (the public training-hub's settings), or None when none are
    asked for: one each time another `save_samples` training sequences have been seen (step x effective batch),
    and one at the end of every epoch when `at_epoch_end`. They add to `save_steps`' checkpoints and are ordinary
    complete checkpoints (adapter, optimizer, scheduler, RNG: enough to resume), rotated by `save_total_limit`."""
    if save_samples is None and not at_epoch_end:
        return None
    from transformers import TrainerCallback

    class SaveSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if save_samples and step * effective_batch_size // save_samples > (step - 1) * effective_batch_size // save_samples:
                control.should_save = True

        def on_epoch_end(self, args, state, control, **kwargs):
            if at_epoch_end:
                control.should_save = True

    return SaveSchedule()
