"""The public entry points: lora_sft, prepare_dataset, load.

`lora_sft` reads top to bottom as the recipe: validate -> read data -> pick backend and plan ->
tokenize -> load model + LoRA -> train -> save. Nothing is written and no model is loaded until the
config and every data row have been validated.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from . import config as cfg
from .config import LoraSFTConfig
from .console import quiet_third_party
from .result import TrainingResult


def _suggest_unknown_keywords(func):
    """Turn Python's bare 'unexpected keyword' TypeError into one that names the closest valid parameter."""
    valid = list(inspect.signature(func).parameters)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        cfg.check_parameter_names(func.__name__, kwargs, valid)
        return func(*args, **kwargs)

    return wrapper


def log(message: str) -> None:
    from .hardware import is_main_process

    if is_main_process():
        print(f"training_hub: {message}", file=sys.stderr, flush=True)


@_suggest_unknown_keywords
def lora_sft(
    model_path: str,
    data_path: Any,
    ckpt_output_dir: str,
    *,
    backend: cfg.Backend = "auto",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: cfg.InitLoraWeights = True,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    loftq_config: dict[str, Any] | None = None,
    lora_adapter: str | None = None,
    dataset_type: cfg.DatasetType = "auto",
    field_messages: str = "messages",
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
    train_on_inputs: bool = False,
    truncation: cfg.Truncation = "truncate",
    max_seq_len: int = 2048,
    sample_packing: bool | None = None,
    data_output_dir: str | None = None,
    dataloader_num_workers: int = 0,
    eval_data_path: Any = None,
    eval_steps: int | None = None,
    eval_split: float | None = None,
    num_epochs: int = 3,
    max_steps: int | None = None,
    effective_batch_size: int | None = None,
    micro_batch_size: int | Literal["auto"] | None = None,
    gradient_accumulation_steps: int | None = None,
    learning_rate: float = 2e-4,
    lr_scheduler: cfg.LrScheduler = "linear",
    warmup_steps: int = 10,
    weight_decay: float = 0.01,
    max_grad_norm: float = 0.3,
    optim: cfg.Optimizer | None = None,
    gradient_checkpointing: cfg.GradientCheckpointing = "auto",
    seed: int = 42,
    bf16: bool | None = None,
    fp16: bool | None = None,
    tf32: bool | None = None,
    flash_attention: bool | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4",
    bnb_4bit_compute_dtype: cfg.ComputeDtype | None = None,
    bnb_4bit_use_double_quant: bool = True,
    max_tokens_per_gpu: int | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = 3,
    logging_steps: int = 1,
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: bool | Literal["auto"] | str | None = None,
    save_merged: bool = False,
    save_samples: int | None = None,
    checkpoint_at_epoch: bool | None = None,
    accelerate_full_state_at_epoch: bool | None = None,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    wandb_run_name: str | None = None,
    tensorboard_log_dir: str | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_experiment_name: str | None = None,
    mlflow_run_name: str | None = None,
    report_to: list[str] | None = None,
    nproc_per_node: int | Literal["auto", "gpu"] | None = None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    rdzv_id: int | str | None = None,
    rdzv_endpoint: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    enable_model_splitting: bool = False,
    trust_remote_code: bool = False,
    callbacks: list[Any] | None = None,
    dry_run: bool = False,
) -> TrainingResult:
    """Fine-tune `model_path` with LoRA (or QLoRA) on `data_path`, writing a PEFT adapter to `ckpt_output_dir`.

    Every parameter, its type, default and valid values are listed in docs/parameters.md; the most used:

    Args:
        model_path (str): local folder or hub id of a causal LM.
        data_path: .jsonl/.json/.parquet/.csv file, folder of such files, list of dicts or datasets.Dataset,
            in messages, alpaca, sharegpt, prompt/completion, text or pre-tokenized form (detected).
        ckpt_output_dir (str): where the adapter, tokenizer, run_config.json, training_metrics.jsonl and the
            checkpoint-N folders go. Must not hold an earlier run unless resume_from_checkpoint or
            overwrite_output_dir=True is given (docs/checkpoints.md).
        backend ("auto" | "unsloth" | "peft", default "auto"): Unsloth's fused kernels when importable,
            else plain transformers + PEFT (with a notice).
        lora_r (int, 16), lora_alpha (int, 32), lora_dropout (float, 0.0), target_modules (list | None: all
            linear projections of the decoder blocks), use_rslora, use_dora, init_lora_weights, rank_pattern,
            alpha_pattern: the LoRA adapter.
        num_epochs (int, 3), max_steps (int | None), learning_rate (float, 2e-4), lr_scheduler ("linear"),
            warmup_steps (10), weight_decay (0.01), max_grad_norm (0.3), optim (None: adamw_8bit on a GPU,
            adamw_torch_fused on the CPU), seed (42).
        effective_batch_size (int | None), micro_batch_size (int | "auto" | None),
            gradient_accumulation_steps (int | None): give any two (or one); the rest is derived
            (x world size). Nothing given: micro 2, accumulation 1.
        max_seq_len (int, 2048), truncation ("truncate" | "drop" | "error"), train_on_inputs (False: loss on
            assistant tokens only), sample_packing (None: on with a GPU, off on the CPU),
            dataloader_num_workers (int, 0: batches are collated in the training process).
        load_in_4bit / load_in_8bit (False), bnb_4bit_*: QLoRA. bf16 / fp16 / tf32 (None: bf16 on GPUs that
            have it, fp32 on the CPU). gradient_checkpointing ("auto" | True | False | "offload").
        save_steps (500), save_total_limit (3), logging_steps (1), callbacks (TrainerCallbacks).
        resume_from_checkpoint (True | "auto" | path | None): continue the run in ckpt_output_dir from its newest
            complete checkpoint (True), from it or from scratch ("auto"), or from the given checkpoint-N folder.
        lora_adapter (str | None): start from a saved LoRA adapter's weights and shape.
        save_merged (bool, False): also write ckpt_output_dir/merged, the base with the LoRA folded in (16-bit).
        dry_run (bool, False): validate, read and tokenize the data and print the plan; load no model.

    Returns:
        TrainingResult with model, tokenizer, trainer, paths, final metrics, plan and data summary.

    Raises:
        TypeError: an unknown parameter name (the closest valid one is suggested).
        ValueError (ConfigError / DataError): a bad value or bad data, naming the parameter or file:line.
        TrainingStopped (RuntimeError): SIGTERM/SIGINT (a checkpoint was saved) or divergence (a non-finite
            loss; the last good checkpoint is kept); the message says how to continue.
    """
    config = LoraSFTConfig(**{name: value for name, value in locals().items()})
    return run(config)


@quiet_third_party()
def run(config: LoraSFTConfig) -> TrainingResult:
    """Train from a validated config (the body of `lora_sft`, shared with the CLI)."""
    from . import checkpoints, data
    from .models.adapters import unsloth_problems, with_adapter_settings
    from .models.unsloth import import_unsloth
    from .logs import enable_default_output
    from .tracking import tracker_problems

    enable_default_output()
    out = Path(config.ckpt_output_dir)
    _raise_problems((cfg.output_dir_problems(out, config.overwrite_output_dir, config.resume_from_checkpoint)
                     if not config.dry_run else [])  # a dry run writes nothing, so any folder will do
                    + tracker_problems(config))
    resume = checkpoints.find_resume_point(out, config.resume_from_checkpoint)
    config = with_adapter_settings(config)
    if resume is not None:
        _raise_problems(checkpoints.resume_config_problems(resume, config.to_dict()))
    loaded = data.load_examples(config.data_path, **_data_fields(config))
    log(f"data: {len(loaded)} rows, format {loaded.format} ({loaded.source})")
    eval_loaded = None
    if config.eval_split is not None:
        loaded, eval_loaded = data.split_examples(loaded, config.eval_split, config.seed)
        log(f"eval data: {eval_loaded.source}")
    if config.eval_data_path is not None:
        eval_loaded = data.load_examples(config.eval_data_path, **_data_fields(config))
        log(f"eval data: {len(eval_loaded)} rows, format {eval_loaded.format} ({eval_loaded.source})")
    backend = _resolve_backend(config.backend, import_unsloth)
    if backend == "unsloth" and config.lora_adapter is not None:
        _raise_problems(unsloth_problems(config.lora_adapter))
    plan, tokenized, eval_tokenized, tokenizer = _plan_and_tokenize(config, loaded, eval_loaded, backend)
    fingerprint = checkpoints.data_fingerprint(loaded.fingerprint, tokenized.summary.to_dict())
    if resume is not None:
        _raise_problems(checkpoints.resume_data_problems(resume, fingerprint))
    if config.dry_run:
        return _dry_run_result(config, plan, tokenized)
    if resume is not None and resume.checkpoint is not None and resume.step >= (config.max_steps or float("inf")):
        return _finish_from_checkpoint(config, plan, tokenized, resume.checkpoint)
    return _train(config, plan, tokenizer, tokenized, eval_tokenized, resume, fingerprint)


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise cfg.ConfigError(problems)


def _data_fields(config: LoraSFTConfig) -> dict[str, Any]:
    return dict(dataset_type=config.dataset_type, field_messages=config.field_messages,
                field_instruction=config.field_instruction, field_input=config.field_input,
                field_output=config.field_output)


def _resolve_backend(requested: str, import_unsloth) -> str:
    if requested == "peft":
        return "peft"
    reason = import_unsloth()
    if reason is None:
        return "unsloth"
    if requested == "unsloth":
        from .models.unsloth import INSTALL_HINT

        raise ImportError(f"backend='unsloth' but Unsloth could not be imported ({reason}). {INSTALL_HINT}")
    log(f"Unsloth is not available ({reason}); training with plain transformers + PEFT")
    return "peft"


def _plan_and_tokenize(config: LoraSFTConfig, loaded, eval_loaded, backend: str):
    """Load the tokenizer, make the plan (errors before tokenizing), tokenize the training (and evaluation) data
    the same way, refine the plan to the data. Returns (plan, tokenized, eval_tokenized or None, tokenizer)."""
    from transformers import AutoConfig

    from . import data, hardware
    from .plan import ModelShape, make_plan

    hw = hardware.detect()
    shape = ModelShape.from_config(AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code))
    make_plan(config, hw, backend, shape, config.max_seq_len, hardware.world_size())  # fail fast on impossible settings
    tokenizer = load_tokenizer(config.model_path, config.trust_remote_code)
    tokenize = functools.partial(data.tokenize_examples, tokenizer=tokenizer, max_seq_len=config.max_seq_len,
                                 train_on_inputs=config.train_on_inputs, truncation=config.truncation,
                                 cache_dir=config.data_output_dir)
    tokenized = tokenize(loaded)
    log(f"data summary:\n{tokenized.summary}")
    eval_tokenized = tokenize(eval_loaded) if eval_loaded is not None else None
    if eval_tokenized is not None:
        log(f"eval data summary:\n{eval_tokenized.summary}")
    seq_len = config.max_seq_len if (config.sample_packing or hw.is_gpu) else max(1, tokenized.summary.tokens_max)
    summary = tokenized.summary
    plan = make_plan(config, hw, backend, shape, seq_len, hardware.world_size(),
                     mean_row_tokens=summary.tokens_total / max(1, summary.rows_out))
    log(f"plan on {hw.describe()}: backend {plan.backend}; " + "; ".join(plan.notes))
    return plan, tokenized, eval_tokenized, tokenizer


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token: the EOS token when it has none (padding is never trained on,
    and the embeddings are never resized behind the user's back)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {model_path} has neither a pad nor an EOS token; add one to it "
                             "(tokenizer.add_special_tokens) and save it before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dry_run_result(config: LoraSFTConfig, plan, tokenized) -> TrainingResult:
    from dataclasses import asdict

    from .console import dry_run_summary

    out = Path(config.ckpt_output_dir)
    log(dry_run_summary(config, plan, tokenized.summary))
    return TrainingResult(output_dir=out, adapter_path=out, metrics_path=out / "training_metrics.jsonl",
                          config_path=out / "run_config.json", plan=asdict(plan), data_summary=tokenized.summary.to_dict())


def _train(config: LoraSFTConfig, plan, tokenizer, tokenized, eval_tokenized, resume, fingerprint: str) -> TrainingResult:
    from dataclasses import asdict

    from . import card, checkpoints, console, manifest, tracking, training
    from .models import load_model

    out = _prepare_output(config, resume)
    loaded_model = load_model(config, plan, tokenizer)
    log(loaded_model.describe())
    if not loaded_model.tokenizer.chat_template and tokenized.summary.format not in ("text", "passthrough"):
        # The data was rendered with the fallback template (data.masking.make_renderer's rule: no usable
        # template of its own): save it so generation uses the same format.
        from .data import FALLBACK_CHAT_TEMPLATE

        loaded_model.tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    metrics_path = out / training.METRICS_FILE
    config_path = manifest.write(out, config, plan, tokenized.summary, loaded_model, fingerprint)
    stop = checkpoints.StopRequest()
    guard = checkpoints.guard_callback(out, stop, config.to_dict(), fingerprint, config.save_total_limit,
                                       loss_scaler=plan.dtype == "float16")
    resumed = resume is not None and resume.checkpoint is not None
    schedule = training.save_schedule_callback(config.save_samples, plan.effective_batch_size,
                                               bool(config.checkpoint_at_epoch or config.accelerate_full_state_at_epoch))
    callbacks = [training.metrics_callback(metrics_path, resumed=resumed), *([schedule] if schedule else []), guard,
                 *tracking.tracker_callbacks(config), *(config.callbacks or [])]
    eval_dataset = eval_tokenized.dataset if eval_tokenized is not None else None
    trainer = training.build_trainer(loaded_model.model, loaded_model.tokenizer, tokenized.dataset, eval_dataset,
                                     config, plan, out, callbacks)
    console.replace_progress_callbacks(trainer, console.console_callback(
        console.run_facts(config, plan, loaded_model, tokenized.summary, out)))
    start = str(resume.checkpoint) if resume is not None and resume.checkpoint is not None else None
    tokens_before = _tokens_seen(Path(start)) if start else 0  # read now: rotation may delete the checkpoint
    with tracking.tracker_runs(config), checkpoints.stop_on_signals(stop), training.sdpa_backends(plan.sdpa_backends):
        output = trainer.train(resume_from_checkpoint=start)
    _raise_if_stopped(stop, out, config, plan)
    metrics = _final_metrics(output.metrics, trainer.state, plan, metrics_path if start else None, tokens_before)
    _save_adapter(trainer, loaded_model.tokenizer, out)
    if config.save_merged:
        _save_merged(config, plan, out)
    trainer.accelerator.wait_for_everyone()  # other ranks must not exit while rank 0 is still saving
    manifest.write(out, config, plan, tokenized.summary, loaded_model, fingerprint, metrics=metrics)
    card.write_run_report(out)
    console.logger.info(console.end_summary(metrics, console.last_losses(metrics_path), out, plan.peak_tflops))
    return TrainingResult(output_dir=out, adapter_path=out, metrics_path=metrics_path, config_path=config_path,
                          metrics=metrics, plan=asdict(plan), data_summary=tokenized.summary.to_dict(),
                          model=loaded_model.model, tokenizer=loaded_model.tokenizer, trainer=trainer)


def _prepare_output(config: LoraSFTConfig, resume) -> Path:
    """Create the output folder; when resuming, set aside checkpoints not used and cut the metrics back."""
    from . import checkpoints, training
    from .hardware import is_main_process

    out = Path(config.ckpt_output_dir)
    if not is_main_process():
        return out
    if config.overwrite_output_dir and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume is None:
        return out
    for notice in checkpoints.set_aside(resume.set_aside):
        log(notice)
    dropped = checkpoints.truncate_metrics(out / training.METRICS_FILE, resume.step)
    start = f"resuming from {resume.checkpoint} (step {resume.step})" if resume.checkpoint else "no checkpoint yet: starting fresh"
    log(start + (f"; {dropped} metric rows after it removed" if dropped else ""))
    return out


def _finish_from_checkpoint(config: LoraSFTConfig, plan, tokenized, checkpoint: Path) -> TrainingResult:
    """A resume whose checkpoint already reached max_steps: nothing to train (the Trainer would run one more step),
    the final adapter is the checkpoint's (e.g. the run was stopped after its last checkpoint, before the end)."""
    from dataclasses import asdict

    from . import card, checkpoints, manifest, training
    from .checkpoints import checkpoint_step
    from .hardware import is_main_process

    out = Path(config.ckpt_output_dir)
    log(f"{checkpoint.name} is at step {checkpoint_step(checkpoint)} >= max_steps={config.max_steps}: nothing to train; "
        f"the final adapter is {checkpoint.name}'s")
    if is_main_process():
        checkpoints.copy_adapter(checkpoint, out)
        card.write_run_report(out)
        if config.save_merged:
            _save_merged(config, plan, out)
    return TrainingResult(output_dir=out, adapter_path=out, metrics_path=out / training.METRICS_FILE,
                          config_path=out / manifest.MANIFEST_FILE, metrics={"global_step": checkpoint_step(checkpoint)},
                          plan=asdict(plan), data_summary=tokenized.summary.to_dict())


def _raise_if_stopped(stop, out: Path, config: LoraSFTConfig, plan) -> None:
    from . import checkpoints

    message = checkpoints.stopped_message(stop, out, config.learning_rate, plan.dtype)
    if message is not None:
        log(message)
        raise checkpoints.TrainingStopped(message)


def _save_merged(config: LoraSFTConfig, plan, out: Path) -> None:
    from .export import merge_adapter_isolated
    from .hardware import is_main_process

    if is_main_process():
        dtype = "float16" if plan.dtype == "float16" else "bfloat16"
        merged = merge_adapter_isolated(config.model_path, out, out / "merged", dtype=dtype,
                                        trust_remote_code=config.trust_remote_code)
        log(f"merged {dtype} model in {merged}")


def _tokens_seen(checkpoint: Path) -> int:
    """Tokens the run had seen when `checkpoint` was written (its trainer_state.json)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen") or 0)


def _final_metrics(train_metrics: dict[str, Any], state, plan, resumed_metrics: Path | None = None,
                   tokens_before: int = 0) -> dict[str, Any]:
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in train_metrics.items()}
    if resumed_metrics is not None:  # the Trainer averages only the steps of this process over all steps
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


def _save_adapter(trainer, tokenizer, out: Path) -> None:
    """Write the final adapter + tokenizer to a temporary folder, then move the files in (rank 0 only)."""
    from .export import vllm_warnings
    from .files import replace_files_in
    from .hardware import is_main_process
    from .models.adapters import ADAPTER_CONFIG

    if not is_main_process():
        return

    def fill(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_files_in(out, fill)
    for warning in vllm_warnings(json.loads((out / ADAPTER_CONFIG).read_text())):
        log(f"warning: {warning}")


def prepare_dataset(
    data_path: Any,
    *,
    model_path: str | None = None,
    tokenizer: Any = None,
    max_seq_len: int = 2048,
    dataset_type: cfg.DatasetType = "auto",
    train_on_inputs: bool = False,
    truncation: cfg.Truncation = "truncate",
    field_messages: str = "messages",
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
    data_output_dir: str | None = None,
    trust_remote_code: bool = False,
):
    """Validate, normalize and tokenize a dataset exactly as `lora_sft` would, without loading a model.

    Give `model_path` (its tokenizer is loaded) or a `tokenizer`. Returns a `TokenizedData` whose
    `.dataset` has one row per example (`input_ids`, `labels` with -100 where no loss is taken) and whose
    `.summary` counts rows, tokens and truncation; `training_hub.data.format_example(ids, labels, tokenizer)`
    prints an example with the trained spans marked.
    """
    from . import data

    if (model_path is None) == (tokenizer is None):
        raise ValueError("prepare_dataset needs exactly one of model_path= or tokenizer=")
    loaded = data.load_examples(data_path, dataset_type=dataset_type, field_messages=field_messages,
                                field_instruction=field_instruction, field_input=field_input, field_output=field_output)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path, trust_remote_code)
    return data.tokenize_examples(loaded, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                                  truncation=truncation, cache_dir=data_output_dir)


def load(ckpt_output_dir: str | Path, device: str | None = None):
    """Load a trained adapter with its base model for generation. Returns (model, tokenizer).

    The base model is the one named in the adapter's `adapter_config.json`.
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    path = Path(ckpt_output_dir)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} holds no adapter (adapter_config.json); point to a lora_sft output folder")
    model = AutoPeftModelForCausalLM.from_pretrained(str(path))
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tokenizer
