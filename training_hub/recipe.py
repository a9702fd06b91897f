"""The run, stage by stage: check -> read data -> plan and tokenize -> load the model -> train -> save.

Nothing is written and no model is loaded until the config, the environment and every data row have been
checked. Each stage is a function taking and returning small typed records.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, LoraSFTConfig
from .console import quiet_third_party
from .result import TrainingResult

logger = logging.getLogger("training_hub")


@dataclass
class Data:
    """Validated rows: the training set and the evaluation set (a file, a split, or none)."""

    train: Any  # data.LoadedData
    eval: Any = None


@dataclass
class Prepared:
    """Everything decided before a model is loaded: the plan, the tokenizer and the tokenized data."""

    plan: Any  # plan.RunPlan
    tokenizer: Any
    train: Any  # data.TokenizedData
    eval: Any  # data.TokenizedData | None
    fingerprint: str  # the training data's identity, checked on resume
    processor: Any = None  # a vision-language model's processor (its tokenizer is `tokenizer`)


@dataclass
class Trained:
    trainer: Any
    metrics: dict[str, Any]


@quiet_third_party()
def run(config: LoraSFTConfig) -> TrainingResult:
    """Train from a validated config (the body of `lora_sft`, shared with the CLI)."""
    from . import console, distributed, logs, outputs, preflight, pre_lora
    from .models.adapters import with_adapter_settings

    logs.enable_default_output()
    out = Path(config.ckpt_output_dir)
    resume = check_environment(config, out)
    config = with_adapter_settings(config)
    if distributed.needs_launch(config, os.environ):  # plain python asking for several processes: start them
        raise_problems(resume.config_problems(config.to_dict()))
        return distributed.launch(config)
    vision = detect_vision(config)
    data = read_data(config, vision)
    backend = choose_backend(config, vision)  # before phase 1: Unsloth, when chosen, is imported before transformers
    config = pre_lora.run_phase_one(config, out)  # phase 1 of a two-phase run; then its model is the base
    raise_problems(resume.config_problems(config.to_dict()))
    prepared = plan_and_tokenize(config, data, backend, vision)
    preflight.check(config, prepared.tokenizer, prepared.plan, prepared.train.summary, resume.checkpoint)
    raise_problems(resume.data_problems(prepared.fingerprint))
    if config.dry_run:
        logger.info(console.dry_run_summary(config, prepared.plan, prepared.train.summary))
        return outputs.result(out, prepared.plan, prepared.train.summary)
    if resume.reached(config.max_steps):
        return finish_from_checkpoint(config, prepared, resume.checkpoint, out)
    model = load_model(config, prepared)
    with outputs.claimed(out, config.overwrite_output_dir):
        trained = train(config, prepared, model, resume, out)
        return save(config, prepared, model, trained, out)


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def check_environment(config: LoraSFTConfig, out: Path):
    """What the config cannot know alone: paths, the launch, the output folder, trackers. Returns the `Resume`."""
    from . import outputs
    from .environment import environment_problems
    from .hardware import is_main_process
    from .pre_lora import lora_resume_setting
    from .resume import find_resume
    from .tracking import tracker_problems

    # Only rank 0 writes, so only it checks the folder: another rank could look after rank 0 started writing there.
    folder = outputs.folder_problems(config) if is_main_process() else []
    raise_problems(environment_problems(config) + folder + tracker_problems(config))
    return find_resume(out, lora_resume_setting(config, out))


def detect_vision(config: LoraSFTConfig) -> bool:
    """Whether the model is vision-language (from its config); the vision parameters are checked against it."""
    from .models import vision

    found = vision.detect(config.model_path, config.trust_remote_code)
    raise_problems(vision.vision_problems(config, found))
    return found


def read_data(config: LoraSFTConfig, vision: bool = False) -> Data:
    """Read and validate every row of the training (and evaluation) data (images too, for a vision model)."""
    from . import data

    settings = data.DataSettings.from_config(config)
    train = data.load_examples(config.data_path, **settings.loading(), images=vision)
    logger.info(f"data: {len(train)} rows, format {train.format} ({train.source})")
    evaluation = None
    if config.eval_split is not None:
        train, evaluation = data.split_examples(train, config.eval_split, config.seed)
        logger.info(f"eval data: {evaluation.source}")
    if config.eval_data_path is not None:
        evaluation = data.load_examples(config.eval_data_path, **settings.loading(), images=vision)
        logger.info(f"eval data: {len(evaluation)} rows, format {evaluation.format} ({evaluation.source})")
    return Data(train, evaluation)


def choose_backend(config: LoraSFTConfig, vision: bool = False) -> str:
    """'auto': the peft backend's packed FlexAttention route where it was measured fastest, else Unsloth when it
    imports (it must be imported before transformers), else 'peft' with a notice. Vision models: 'peft'."""
    from . import hardware
    from .models.adapters import unsloth_problems
    from .models.unsloth import INSTALL_HINT, import_unsloth
    from .plan import auto_backend

    if vision:  # vision_problems refused backend='unsloth'; the plan's notes say why
        return "peft"
    if config.backend == "peft" or config.enable_model_splitting:  # splitting: the peft backend (distributed.py)
        return "peft"
    if config.backend == "auto":
        preferred, why = auto_backend(config, hardware.detect())
        if preferred is not None:
            logger.info(why)
            return preferred
    reason = import_unsloth()
    if reason is not None and config.backend == "unsloth":
        raise ImportError(f"backend='unsloth' but Unsloth could not be imported ({reason}). {INSTALL_HINT}")
    if reason is not None:
        logger.info(f"Unsloth is not available ({reason}); training with plain transformers + PEFT")
        return "peft"
    if config.lora_adapter is not None:
        raise_problems(unsloth_problems(config.lora_adapter))
    return "unsloth"


def plan_and_tokenize(config: LoraSFTConfig, data: Data, backend: str, vision: bool = False) -> Prepared:
    """Tokenize the training and evaluation data the same way, then make the plan for this data and hardware."""
    from transformers import AutoConfig

    from . import checkpoints, distributed, hardware
    from .data import DataSettings, load_tokenizer, tokenize_examples
    from .data.cache import resolve_cache_dir
    from .data.vision import load_processor, tokenize_vision_examples
    from .models.vision import plan_config, vision_plan
    from .plan import ModelShape, make_plan

    settings = DataSettings.from_config(config).tokenizing()
    if vision:
        processor = load_processor(config.model_path, config.trust_remote_code)
        tokenizer, config = processor.tokenizer, plan_config(config)
        settings.pop("cache_dir")
        tokenize = functools.partial(tokenize_vision_examples, processor=processor, **settings)
    else:
        processor, tokenizer = None, load_tokenizer(config.model_path, config.trust_remote_code)
        tokenize = functools.partial(tokenize_examples, tokenizer=tokenizer, **settings)
    hw = hardware.detect()
    cached = "cache_dir" in settings and resolve_cache_dir(settings["cache_dir"]) is not None
    with distributed.node_main_first(os.environ, hw.is_gpu, cached):  # the others read what it cached
        train = tokenize(data.train)
        evaluation = tokenize(data.eval) if data.eval is not None else None
    logger.info(f"data summary:\n{train.summary}")
    if evaluation is not None:
        logger.info(f"eval data summary:\n{evaluation.summary}")
    shape = ModelShape.from_config(AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code))
    plan = make_plan(config, hw, backend, shape, hardware.world_size(), train.summary,
                     launched=distributed.under_launcher(os.environ))
    if vision:
        plan = vision_plan(plan)
    logger.info(f"plan on {hw.describe()}: backend {plan.backend}; " + "; ".join(plan.notes))
    fingerprint = checkpoints.data_fingerprint(data.train.fingerprint, train.summary.to_dict())
    return Prepared(plan, tokenizer, train, evaluation, fingerprint, processor)


def load_model(config: LoraSFTConfig, prepared: Prepared):
    """The base model with LoRA, on the plan's backend, holding the tokenizer the data was tokenized with."""
    from .data import FALLBACK_CHAT_TEMPLATE
    from .models import load_model as load_for_backend

    loaded = load_for_backend(config, prepared.plan, prepared.processor or prepared.tokenizer,
                              vision=prepared.processor is not None)
    logger.info(loaded.describe())
    if not loaded.tokenizer.chat_template and prepared.train.summary.format not in ("text", "passthrough"):
        # The data was rendered with the fallback template (the tokenizer has no usable template of its own):
        # save it with the adapter so generation uses the same format.
        loaded.tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return loaded


def train(config: LoraSFTConfig, prepared: Prepared, model, resume, out: Path) -> Trained:
    """Train to the end (or raise TrainingStopped), writing checkpoints, metrics and the manifest into `out`."""
    from . import checkpoints, console, manifest, outputs, tracking, training
    from .pre_lora import metrics_phase

    resume.prepare_output(out)
    manifest.write(out, config, prepared.plan, prepared.train.summary, model, prepared.fingerprint)
    stop = checkpoints.StopRequest()
    guard = checkpoints.guard_callback(out, stop, config.to_dict(), prepared.fingerprint, config.save_total_limit,
                                       loss_scaler=prepared.plan.dtype == "float16")
    schedule = training.save_schedule_callback(config.save_samples, prepared.plan.effective_batch_size,
                                               bool(config.checkpoint_at_epoch or config.accelerate_full_state_at_epoch))
    callbacks = [training.metrics_callback(out / outputs.METRICS_FILE, resumed=resume.checkpoint is not None,
                                           phase=metrics_phase(config, out)),
                 *([schedule] if schedule else []), guard, outputs.discard_replaced_callback(out),
                 *tracking.tracker_callbacks(config), *(config.callbacks or [])]
    eval_dataset = prepared.eval.dataset if prepared.eval is not None else None
    trainer = training.build_trainer(model.model, model.tokenizer, prepared.train.dataset, eval_dataset, config,
                                     prepared.plan, out, callbacks, vision_collator(config, prepared))
    console.replace_progress_callbacks(trainer, console.console_callback(
        console.run_facts(config, prepared.plan, model, prepared.train.summary, out)))
    metrics = training.train_to_the_end(trainer, stop, out, resume, prepared.plan, config.learning_rate,
                                        contexts=[tracking.tracker_runs(config)])
    return Trained(trainer, metrics)


def vision_collator(config: LoraSFTConfig, prepared: Prepared):
    """The batch collator of a vision-language run (the processor per batch), else None (TRL's own)."""
    from .data.vision import VisionCollator

    return VisionCollator(prepared.processor, config.max_seq_len) if prepared.processor is not None else None


def save(config: LoraSFTConfig, prepared: Prepared, model, trained: Trained, out: Path) -> TrainingResult:
    """The final adapter and tokenizer, the merged model on request, and the manifest with the final metrics."""
    from . import card, checkpoints, console, manifest, outputs
    from .training import gathered_adapter_state

    # A sharded model's adapter is gathered by every rank together, then written by rank 0.
    gathered = gathered_adapter_state(trained.trainer.model) if prepared.plan.model_splitting == "fsdp2" else None
    with checkpoints.disk_full_errors(out):
        outputs.save_adapter(trained.trainer.model, model.tokenizer, out, trained.metrics.get("global_step"), gathered)
    outputs.discard_replaced_runs(out)
    if config.save_merged:
        outputs.save_merged(config.model_path, out, merged_dtype(prepared.plan), config.trust_remote_code)
    trained.trainer.accelerator.wait_for_everyone()  # other ranks must not exit while rank 0 is still saving
    manifest.write(out, config, prepared.plan, prepared.train.summary, model, prepared.fingerprint, trained.metrics)
    card.write_run_report(out)
    logger.info(console.end_summary(trained.metrics, console.last_losses(out / outputs.METRICS_FILE), out,
                                    prepared.plan.peak_tflops))
    return outputs.result(out, prepared.plan, prepared.train.summary, trained.metrics, model.model, model.tokenizer,
                          trained.trainer)


def finish_from_checkpoint(config: LoraSFTConfig, prepared: Prepared, checkpoint: Path, out: Path) -> TrainingResult:
    """A resume whose checkpoint already reached max_steps: nothing to train (the Trainer would run one more step);
    the final adapter is the checkpoint's (e.g. the run was stopped after its last checkpoint, before the end)."""
    from . import card, checkpoints, outputs
    from .hardware import is_main_process

    step = checkpoints.checkpoint_step(checkpoint)
    logger.info(f"{checkpoint.name} is at step {step} >= max_steps={config.max_steps}: nothing to train; "
                f"the final adapter is {checkpoint.name}'s")
    if is_main_process():
        checkpoints.copy_adapter(checkpoint, out, step)
        card.write_run_report(out)
        if config.save_merged:
            outputs.save_merged(config.model_path, out, merged_dtype(prepared.plan), config.trust_remote_code)
    return outputs.result(out, prepared.plan, prepared.train.summary, {"global_step": step})


def merged_dtype(plan) -> str:
    """A merged model is 16-bit: float16 for fp16 runs, else bfloat16."""
    return "float16" if plan.dtype == "float16" else "bfloat16"
