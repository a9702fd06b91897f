"""Phase 1 of a two-phase run: every parameter of the base trained on `pre_lora_data_path` (plain transformers, the
peft backend's trainer), saved as a complete 16-bit model; phase 2 is the LoRA run with that model as its base.

What phase 1 leaves in ckpt_output_dir/pre_lora/:
    checkpoint-N/                 its resumable checkpoints (full weights + optimizer), deleted once model/ is complete
    training_metrics.jsonl        its own metrics rows (copied into the run's file marked "phase": "pre_lora")
    model/                        the phase-1 model: safetensors, config, tokenizer, and PHASE_ONE_MARKER written last

A run killed in phase 1 resumes phase 1 from its checkpoints; one killed in phase 2 finds model/ complete and
resumes phase 2 only. The marker records the settings and data phase 1 was trained with: a changed phase-1 setting
is refused; a run that no longer passes `pre_lora_data_path` continues on the saved model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .outputs import METRICS_FILE, PHASE_LORA, PHASE_PRE_LORA, PRE_LORA_DIR

logger = logging.getLogger("training_hub")

PHASE_ONE_MODEL = "model"  # inside pre_lora/
PHASE_ONE_MARKER = "training_hub_pre_lora.json"  # inside pre_lora/model/, written last
PHASE_ONE_SETTINGS = ("pre_lora_max_steps", "pre_lora_num_epochs", "pre_lora_learning_rate")

# Settings that shape only phase 2 (the LoRA run): phase 1 runs with their defaults, so changing one of them never
# invalidates a phase-1 checkpoint or model.
PHASE_TWO_ONLY = (
    "backend", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
    "init_lora_weights", "rank_pattern", "alpha_pattern", "dataset_type", "eval_data_path", "eval_steps",
    "eval_split", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
    "bnb_4bit_use_double_quant", "save_merged", "save_samples", "checkpoint_at_epoch",
    "accelerate_full_state_at_epoch", "pre_lora_data_path", *PHASE_ONE_SETTINGS,
)
# What phase 1 does not support yet, each with the reason (refused rather than half honoured).
REFUSED_WITH_PHASE_ONE = {
    "lora_adapter": "an adapter trained on the original base would continue on a changed one",
    "enable_model_splitting": "phase 1 trains in one process on one device; splitting a full fine-tune is not built",
    "nproc_per_node": "phase 1 is tested in one process only",
    "nnodes": "phase 1 is tested in one process only",
    "overwrite_output_dir": "phase 1 writes before phase 2 would move the earlier run aside; delete the folder instead",
    "dry_run": "the dry run's plan and counts are phase 2's only",
    "micro_batch_size": "'auto' sizes the micro batch for LoRA's memory, not a full fine-tune's",
    "wandb_project": "phase 1 is not logged to trackers yet (training_metrics.jsonl has both phases)",
    "wandb_entity": "phase 1 is not logged to trackers yet", "wandb_run_name": "phase 1 is not logged to trackers yet",
    "tensorboard_log_dir": "phase 1 is not logged to trackers yet",
    "mlflow_tracking_uri": "phase 1 is not logged to trackers yet",
    "mlflow_experiment_name": "phase 1 is not logged to trackers yet",
    "mlflow_run_name": "phase 1 is not logged to trackers yet", "report_to": "phase 1 is not logged to trackers yet",
}


def pre_lora_problems(config) -> list[str]:
    """Phase-1 settings that contradict each other or this config (pure: checked with the other parameters)."""
    from .config import LoraSFTConfig

    defaults = LoraSFTConfig.defaults()
    if config.pre_lora_data_path is None:
        set_alone = [n for n in PHASE_ONE_SETTINGS if getattr(config, n) != defaults[n]]
        return [f"{', '.join(set_alone)} set without pre_lora_data_path: they only apply to phase 1 (the full "
                "fine-tune before LoRA); give pre_lora_data_path or leave them at their defaults"] if set_alone else []
    problems = []
    if isinstance(config.pre_lora_data_path, str) and not config.pre_lora_data_path.strip():
        problems.append("pre_lora_data_path='': give the phase-1 data (a file, a folder, a list of dicts or a Dataset) "
                        "or None for no phase 1")
    for name in ("pre_lora_max_steps", "pre_lora_num_epochs", "pre_lora_learning_rate"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            problems.append(f"{name}={value!r}: must be > 0")
    for name, why in REFUSED_WITH_PHASE_ONE.items():
        value = getattr(config, name)
        one_process = name in ("nproc_per_node", "nnodes") and type(value) is int and value == 1
        unsupported = value == "auto" if name == "micro_batch_size" else value != defaults[name] and not one_process
        if unsupported:
            problems.append(f"{name}={value!r} with pre_lora_data_path: not supported ({why})")
    if isinstance(config.resume_from_checkpoint, str) and config.resume_from_checkpoint != "auto":
        problems.append(f"resume_from_checkpoint={config.resume_from_checkpoint!r} with pre_lora_data_path: pass True "
                        "or 'auto' (the phase to resume is found in the output folder)")
    return problems


def phase_one_config(config):
    """The config phase 1 trains with: its data, length and learning rate; phase-2-only settings at their defaults."""
    from .config import LoraSFTConfig

    defaults = LoraSFTConfig.defaults()
    changes = {name: defaults[name] for name in PHASE_TWO_ONLY}
    changes.update(data_path=config.pre_lora_data_path, max_steps=config.pre_lora_max_steps,
                   num_epochs=config.pre_lora_num_epochs, learning_rate=config.pre_lora_learning_rate,
                   backend="peft")  # plain transformers: see docs/two_phase.md for why not Unsloth
    return dataclasses.replace(config, **changes)


def model_folder(out: Path) -> Path:
    return (out / PRE_LORA_DIR / PHASE_ONE_MODEL).resolve()


def read_record(out: Path) -> dict[str, Any] | None:
    """Phase 1's completion record (None when phase 1 is not complete in `out`)."""
    marker = model_folder(out) / PHASE_ONE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def lora_resume_setting(config, out: Path):
    """The `resume_from_checkpoint` phase 2 looks for its checkpoints with: True means "continue this run", which
    may still be in phase 1 (no phase-2 checkpoint yet), so phase 2 may then start fresh."""
    if config.resume_from_checkpoint is True and (out / PRE_LORA_DIR).is_dir():
        return "auto"
    return config.resume_from_checkpoint


def metrics_phase(config, out: Path) -> str | None:
    """The phase name phase-2 metrics rows carry: "lora" when the run's base is its own phase-1 model."""
    return PHASE_LORA if Path(str(config.model_path)).expanduser().resolve() == model_folder(out) else None


def run_phase_one(config, out: Path):
    """Phase 1 (trained, resumed, or found complete); returns phase 2's config, whose base is the phase-1 model.
    Without `pre_lora_data_path` and without a complete phase 1 in `out`, returns `config` unchanged."""
    from .config import ConfigError

    record = read_record(out)
    resuming = config.resume_from_checkpoint not in (None, False)
    if config.pre_lora_data_path is None:
        if record is None and resuming and (out / PRE_LORA_DIR).is_dir():
            raise ConfigError([f"resume_from_checkpoint={config.resume_from_checkpoint!r}: phase 1 in "
                               f"{out / PRE_LORA_DIR} did not finish; resume with the same pre_lora_* settings to "
                               "finish it (LoRA on the original base would silently drop it)"])
        if record is None or not resuming:
            return config
        if record["base_model_path"] != str(config.model_path):
            raise ConfigError([f"model_path={config.model_path!r}: phase 1 in {out / PRE_LORA_DIR} was trained from "
                               f"{record['base_model_path']!r}; resume with that model_path"])
        logger.info(f"phase 1 is complete ({record['steps']} steps): phase 2 trains LoRA on {model_folder(out)}")
        return dataclasses.replace(config, model_path=str(model_folder(out)))
    phase_one = phase_one_config(config)
    if record is not None:
        problems = record_problems(record, phase_one, config.model_path, out)
        if problems:
            raise ConfigError(problems)
        logger.info(f"phase 1 is complete ({record['steps']} steps, same settings and data): not repeated")
    else:
        train_phase_one(phase_one, out)
    logger.info(f"phase 2: LoRA on the phase-1 model {model_folder(out)}")
    return dataclasses.replace(config, model_path=str(model_folder(out)))


def result_settings(phase_one) -> dict[str, Any]:
    """The phase-1 settings its result depends on (saving, logging and where things are read from excluded; the data
    is compared by fingerprint)."""
    from .resume import MAY_CHANGE_ON_RESUME

    ignored = MAY_CHANGE_ON_RESUME - {"max_steps", "num_epochs"}
    return {k: v for k, v in json.loads(json.dumps(phase_one.to_dict(), default=str)).items() if k not in ignored}


# A changed phase-1 setting is named as the user passes it.
PHASE_ONE_NAMES = {"data_path": "pre_lora_data_path", "max_steps": "pre_lora_max_steps",
                   "num_epochs": "pre_lora_num_epochs", "learning_rate": "pre_lora_learning_rate"}


def record_problems(record: dict[str, Any], phase_one, base_model_path: str, out: Path) -> list[str]:
    """Why a complete phase 1 is not the one this config asks for (a changed setting or other data)."""
    from . import data

    now = {**result_settings(phase_one), "model_path": str(base_model_path)}
    saved = {**record["settings"], "model_path": record["base_model_path"]}
    changed = [f"{PHASE_ONE_NAMES.get(k, k)}: {saved.get(k)!r} then, {now[k]!r} now" for k in sorted(now)
               if saved.get(k) != now[k]]
    rows = data.load_examples(phase_one.data_path, **data.DataSettings.from_config(phase_one).loading())
    if rows.fingerprint != record["data_rows_fingerprint"]:
        changed.append(f"pre_lora_data_path: other rows than phase 1 was trained on ({record['data_rows_fingerprint']} "
                       f"then, {rows.fingerprint} now)")
    if not changed:
        return []
    return [f"phase 1 in {out / PRE_LORA_DIR} is complete but was trained with other settings "
            f"({'; '.join(changed)}); resume with the same phase-1 settings, leave pre_lora_data_path out to continue "
            "on the saved phase-1 model, or start a new run in another folder"]


# ---- memory -------------------------------------------------------------------------------------------------

def optimizer_bytes_per_parameter(optim: str) -> float:
    """Optimizer state per trained parameter: Adam's two moments in 8 bit or 32 bit; plain SGD and Adafactor's
    factored moments (approximated as none) keep ~0."""
    if "8bit" in optim:
        return 2.0
    if optim in ("sgd", "adafactor"):
        return 0.0
    return 8.0


def memory_estimate_bytes(shape, plan, seq_len: int) -> float:
    """Phase 1's training memory: weights + gradients (in the weights' dtype) + optimizer states + activations of
    one micro batch of `seq_len`-token sequences."""
    from .plan import activation_bytes_per_token

    weight = 2 if load_dtype(plan.dtype) == "bfloat16" else 4
    per_parameter = 2 * weight + optimizer_bytes_per_parameter(plan.optim)
    activations = (activation_bytes_per_token(shape, plan.gradient_checkpointing, plan.backend)
                   * plan.micro_batch_size * seq_len)
    return shape.num_parameters * per_parameter + activations


def memory_problems(estimate: float, hw) -> list[str]:
    """Refuse a phase 1 that cannot fit the GPU's free memory (on the CPU the estimate is only reported)."""
    from .plan import MEMORY_HEADROOM

    if not hw.is_gpu or hw.free_memory_gib is None or estimate <= hw.free_memory_gib * 2**30 * MEMORY_HEADROOM:
        return []
    return [f"pre_lora_data_path: phase 1 trains every parameter and needs an estimated {estimate / 2**30:.1f} GiB "
            f"(weights, gradients, optimizer states, one micro batch), more than {MEMORY_HEADROOM:.0%} of the "
            f"{hw.free_memory_gib:.1f} GiB free; options: a smaller model, optim='adamw_8bit' (or 'adafactor'), "
            "gradient_checkpointing=True, a smaller max_seq_len, or no phase 1 (LoRA alone)"]


def load_dtype(plan_dtype: str) -> str:
    """Weights are bf16 in bf16 runs; fp16 runs keep fp32 weights (mixed precision needs fp32 master weights)."""
    return "bfloat16" if plan_dtype == "bfloat16" else "float32"


def bf16_weights_warning(plan_dtype: str, learning_rate: float) -> str | None:
    """What training bf16 weights in place costs phase 1 (None when its weights are fp32)."""
    if load_dtype(plan_dtype) != "bfloat16":
        return None
    return (f"phase 1 updates its bf16 weights in place (no fp32 master copy): an update smaller than half a bf16 "
            f"step is rounded away, so at pre_lora_learning_rate={learning_rate:g} weights larger than about "
            f"{learning_rate * 512:.2g} barely move and norm weights near 1.0 not at all (docs/two_phase.md); "
            "bf16=False trains in float32 instead")


# ---- training ----------------------------------------------------------------------------------------------

def train_phase_one(phase_one, out: Path) -> None:
    """Train phase 1 (or resume it from its checkpoints), then save the 16-bit model with its completion marker."""
    from transformers import AutoConfig

    from . import hardware, outputs, preflight, recipe
    from .plan import ModelShape
    from .resume import find_resume

    folder = out / PRE_LORA_DIR
    resume = find_resume(folder, phase_one.resume_from_checkpoint)
    recipe.raise_problems(resume.config_problems(phase_one.to_dict()))
    data = recipe.read_data(phase_one)
    prepared = recipe.plan_and_tokenize(phase_one, data, "peft")
    preflight.check(phase_one, prepared.tokenizer, prepared.plan, prepared.train.summary, resume.checkpoint)
    recipe.raise_problems(resume.data_problems(prepared.fingerprint))
    shape = ModelShape.from_config(AutoConfig.from_pretrained(phase_one.model_path,
                                                              trust_remote_code=phase_one.trust_remote_code))
    estimate = memory_estimate_bytes(shape, prepared.plan, phase_one.max_seq_len)
    recipe.raise_problems(memory_problems(estimate, hardware.detect()))
    warning = bf16_weights_warning(prepared.plan.dtype, phase_one.learning_rate)
    if warning is not None:
        logger.warning(warning)
    logger.info(f"phase 1: full fine-tune of {phase_one.model_path} on {data.train.source}; estimated memory "
                f"{estimate / 2**30:.2f} GiB (weights, gradients, {prepared.plan.optim} states, one micro batch)")
    done = resume.reached(phase_one.max_steps)  # killed after its last checkpoint, before the model was saved
    if done:
        logger.info(f"{resume.checkpoint} is at step {resume.step}: nothing to train; the phase-1 model is its weights")
    model = load_full_model(str(resume.checkpoint if done else phase_one.model_path), prepared.plan,
                            phase_one.trust_remote_code)
    with outputs.claimed(out, False):
        folder.mkdir(exist_ok=True)
        resume.prepare_output(folder)
        metrics = {} if done else fit(phase_one, prepared, model, resume, folder)
        if hardware.is_main_process():
            finish(out, phase_one, prepared, model, data.train.fingerprint, metrics, estimate)
    # Phase 2 plans its micro batch from the GPU's free memory: give back what phase 1's model, trainer and
    # optimizer held (reference cycles included) and the allocator's cached blocks.
    del model
    gc.collect()
    if prepared.plan.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def load_full_model(path: str, plan, trust_remote_code: bool):
    """The whole model, every parameter trainable, in the dtype phase 1 trains in."""
    from transformers import AutoModelForCausalLM

    from .models.attention import loadable_attention
    from .models.common import device_map, torch_dtype

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(load_dtype(plan.dtype)),
                                                attn_implementation=loadable_attention(plan.attn_implementation),
                                                device_map=device_map(plan), trust_remote_code=trust_remote_code)


def fit(phase_one, prepared, model, resume, folder: Path) -> dict[str, Any]:
    """Run the Trainer over phase 1's data with checkpoints, metrics and the stop guard in `folder`."""
    from . import checkpoints, console, training

    stop = checkpoints.StopRequest()
    guard = checkpoints.guard_callback(folder, stop, phase_one.to_dict(), prepared.fingerprint,
                                       phase_one.save_total_limit, loss_scaler=prepared.plan.dtype == "float16")
    callbacks = [training.metrics_callback(folder / METRICS_FILE, resumed=resume.checkpoint is not None), guard,
                 *(phase_one.callbacks or [])]
    trainer = training.build_trainer(model, prepared.tokenizer, prepared.train.dataset, None, phase_one, prepared.plan,
                                     folder, callbacks)
    console.replace_progress_callbacks(trainer, console.console_callback())  # step lines, no start summary
    return training.train_to_the_end(trainer, stop, folder, resume, prepared.plan, phase_one.learning_rate)


def finish(out: Path, phase_one, prepared, model, rows_fingerprint: str, metrics: dict[str, Any],
           estimate: float) -> None:
    """Phase 1's rows into the run's metrics file, the 16-bit model into pre_lora/model (a temporary folder renamed,
    the marker last), then its checkpoints removed (the model replaces them for every later resume)."""
    from . import recipe
    from .checkpoints import list_checkpoints, read_metric_rows, resumed_train_loss
    from .files import write_atomic
    from .models.common import torch_dtype

    folder = out / PRE_LORA_DIR
    rows = [{**row, "phase": PHASE_PRE_LORA} for row in read_metric_rows(folder / METRICS_FILE)]
    write_atomic(out / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    target, tmp = model_folder(out), folder / f".{PHASE_ONE_MODEL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = recipe.merged_dtype(prepared.plan)  # 16-bit, as a merged model
    model.to(torch_dtype(dtype)).save_pretrained(tmp, safe_serialization=True)
    prepared.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    losses = [row["loss"] for row in rows if isinstance(row.get("loss"), (int, float))]
    record = {"base_model_path": str(phase_one.model_path), "dtype": dtype,
              "settings": result_settings(phase_one), "data_rows_fingerprint": rows_fingerprint,
              "data_fingerprint": prepared.fingerprint, "data": prepared.train.summary.to_dict(),
              "steps": max([row.get("step", 0) for row in rows], default=0),
              "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "train_loss": resumed_train_loss(folder / METRICS_FILE),
              "num_tokens": metrics.get("num_tokens"), "tokens_per_second": metrics.get("tokens_per_second"),
              "peak_memory_gib": metrics.get("peak_memory_gib"), "memory_estimate_gib": estimate / 2**30}
    write_atomic(target / PHASE_ONE_MARKER, json.dumps(record, indent=2, default=str))
    for checkpoint in list_checkpoints(folder):
        shutil.rmtree(checkpoint)
    logger.info(f"phase 1 done: {record['steps']} steps, loss {record['first_loss'] or float('nan'):.4f} -> "
                f"{record['last_loss'] or float('nan'):.4f}; {dtype} model in {target}")
