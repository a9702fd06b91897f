"""What a run prints: a start summary, one progress bar and one line per logging step, an end summary.

transformers prints each logging step as a raw dict (`{'loss': '1.5', 'grad_norm': '1.134', ...}`); its
`ProgressCallback`/`PrinterCallback` are replaced by `console_callback`, which writes formatted lines through
the "training_hub" logger (rank 0 only) and draws one tqdm bar when stderr is a terminal. Third-party messages
about work already done, or about kernels that do not matter for the run, are silenced by `quiet_third_party`
for the duration of a run only (levels and switches are put back afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from .hardware import is_main_process

logger = logging.getLogger("training_hub")

# Loggers that speak once when Unsloth/torchao/bitsandbytes are imported, about kernels a LoRA run does not use:
# torchao: "Detected no triton" and "Failed to load .../torchao/_C_mxfp8...so" (its CUDA-only extension libraries);
# torch.utils._pytree: "<enum ...> is an Enum subclass ... register_constant() ... deprecated" (torchao registers
#     its enums; a message for torchao's developers);
# bitsandbytes.backends.cpu.ops: "Failed to load CPU gemm_4bit_forward from kernels-community" (an optional CPU
#     kernel package; 4-bit still works without it).
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence, for the duration of the block only, third-party output about work training_hub already did or
    about kernels the run does not use:

    - the loggers in QUIET_LOGGERS (raised to ERROR; the levels are restored afterwards);
    - the progress bars of `datasets`: "Saving the dataset" when the tokenized data is cached, and TRL's
      "Truncating train dataset" / "Dropping fully masked examples", a no-op on data that training_hub already
      tokenized, truncated and filtered (switched back on afterwards only if they were on). transformers' own
      bars ("Loading weights") stay: they show work in progress;
    - the `torch.jit.script_method` deprecation warning raised by libraries' import-time code (not actionable).

    Nothing here imports transformers, so Unsloth can still be imported first inside the block.
    """
    import datasets

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars = datasets.is_progress_bar_enabled()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*deprecated", category=DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ---- formatting --------------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """1:02:03 / 2:03 / 3s."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def step_line(step: int, total: int, logs: dict[str, Any], tokens_per_second: float | None, eta_seconds: float | None) -> str:
    """One training step's line: `step 120/600 | loss 1.2345 | lr 1.90e-03 | grad 0.831 | 4,497 tok/s | ETA 2:31`."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}"]
    if "loss" in logs:
        parts.append(f"loss {_number(logs['loss'], '.4f')}")
    if "learning_rate" in logs:
        parts.append(f"lr {_number(logs['learning_rate'], '.2e')}")
    if "grad_norm" in logs:
        parts.append(f"grad {_number(logs['grad_norm'], '.3f')}")
    if tokens_per_second is not None:
        parts.append(f"{tokens_per_second:,.0f} tok/s")
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


def eval_line(step: int, total: int, logs: dict[str, Any]) -> str:
    shown = [f"{k.removeprefix('eval_')} {_number(v, '.4f')}" for k, v in logs.items()
             if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")]
    return f"eval at step {step}/{total}: " + ", ".join(shown)


def planned_steps(rows: int, effective_batch_size: int, num_epochs: int, max_steps: int | None) -> tuple[int, float]:
    """(optimizer steps, epochs) a run will take: max_steps when given, else num_epochs over `rows` batches
    (a partial last batch still makes a step, as the Trainer counts)."""
    per_epoch = max(1, math.ceil(rows / max(1, effective_batch_size)))
    if max_steps is not None:
        return max_steps, max_steps / per_epoch
    return per_epoch * num_epochs, float(num_epochs)


def start_summary(facts: dict[str, Any]) -> str:
    """The block printed when training starts. `facts` keys: model, architecture, backend, device, dtype,
    quantization, lora (r, alpha, dropout, targets, rslora, dora), trainable, total, data (DataSummary dict),
    packing, max_seq_len, micro, accumulation, world, effective, steps, epochs, output."""
    f, lora, data = facts, facts["lora"], facts["data"]
    share = 100 * f["trainable"] / max(1, f["total"])
    variant = "".join(s for s, on in ((", rsLoRA", lora.get("rslora")), (", DoRA", lora.get("dora"))) if on)
    supervised = 100 * data["supervised_tokens_total"] / max(1, data["tokens_total"])
    lines = [
        f"model    {f['model']} ({f['architecture']}), backend {f['backend']}, {f['dtype']} on {f['device']}",
        f"weights  {f['quantization'] or 'not quantized'}",
        f"LoRA     r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}{variant} on "
        f"{', '.join(lora['targets'])}; {f['trainable']:,} of {f['total']:,} parameters trainable ({share:.2f}%)",
        f"data     {data['rows_out']:,} rows ({data['format']}), {data['tokens_total']:,} tokens, {supervised:.1f}% with "
        f"loss; max_seq_len {f['max_seq_len']:,}, packing {'on' if f['packing'] else 'off'}",
        f"batch    {f['effective']} = micro {f['micro']} x accumulation {f['accumulation']} x {f['world']} process(es)",
        f"steps    {f['steps']:,} ({f['epochs']:.2f} epochs)",
        f"output   {f['output']}",
    ]
    return "training:\n" + "\n".join("  " + line for line in lines)


def end_summary(metrics: dict[str, Any], last_losses: dict[str, float], output_dir: Path,
                peak_tflops: float | None = None) -> str:
    """The block printed when training ends: time, throughput, (GPU) MFU and peak memory, losses, the adapter."""
    speed = f"{metrics.get('tokens_per_second', 0):,.0f} tokens/s"
    if "mfu" in metrics:
        speed += f", MFU {metrics['mfu']:.1%}" + (f" of {peak_tflops:.0f} TFLOP/s" if peak_tflops else "")
    if "peak_memory_gib" in metrics:
        speed += f", peak memory {metrics['peak_memory_gib']:.1f} GiB"
    losses = [f"train loss {metrics['train_loss']:.4f} (mean over the run)"] if "train_loss" in metrics else []
    losses += [f"last {name.replace('_', ' ')} {value:.4f}" for name, value in last_losses.items()]
    lines = [
        f"time     {format_duration(metrics.get('train_runtime', 0.0))} for {metrics.get('global_step', 0):,} steps; {speed}",
        f"losses   {', '.join(losses) or 'none logged'}",
        f"adapter  {output_dir} (loss.png, README.md, training_metrics.jsonl beside it)",
        f"load it  model, tokenizer = training_hub.load({str(output_dir)!r})",
    ]
    return "done:\n" + "\n".join("  " + line for line in lines)


def last_losses(metrics_path: Path) -> dict[str, float]:
    """The last logged training and evaluation loss in a metrics file."""
    from .checkpoints import read_metric_rows

    found: dict[str, float] = {}
    for row in read_metric_rows(metrics_path):
        for key, name in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if isinstance(row.get(key), (int, float)):
                found[name] = row[key]
    return found


# ---- the callback ------------------------------------------------------------------------------------------

class _Rate:
    """Tokens per second over the last logging interval (not the running average), and the ETA from the steps
    done in this process so far."""

    def __init__(self) -> None:
        self.start = self.last_time = time.perf_counter()
        self.first_step = self.last_tokens = 0

    def begin(self, step: int, tokens: int) -> None:
        self.start = self.last_time = time.perf_counter()
        self.first_step, self.last_tokens = step, tokens

    def update(self, step: int, total: int, tokens: int) -> tuple[float | None, float | None]:
        now = time.perf_counter()
        rate = (tokens - self.last_tokens) / (now - self.last_time) if tokens and now > self.last_time else None
        done = step - self.first_step
        eta = (now - self.start) / done * (total - step) if done > 0 else None
        self.last_time, self.last_tokens = now, tokens
        return rate, eta


def console_callback(start_facts: dict[str, Any] | None = None):
    """A TrainerCallback drawing one progress bar (on a terminal) and logging one line per logging step,
    an eval line per evaluation, and `start_summary(start_facts + steps)` when training begins (rank 0 only)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None
            self.rate = _Rate()

        def say(self, line: str) -> None:
            """Log `line` above the bar: the bar is erased, the line printed, the bar drawn again (what tqdm.write
            does, here for whatever handlers the "training_hub" logger has)."""
            if self.bar is not None and not self.bar.disable:
                self.bar.clear()
            logger.info(line)
            if self.bar is not None and not self.bar.disable:
                self.bar.refresh()

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if not is_main_process():
                return
            if start_facts is not None:
                per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps) if train_dataloader else 0
                epochs = state.max_steps / per_epoch if per_epoch else float(state.num_train_epochs)
                logger.info(start_summary({**start_facts, "steps": state.max_steps, "epochs": epochs}))
            # disable=None: no bar when stderr is not a terminal (log files get the lines only)
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, disable=None, dynamic_ncols=True,
                            unit="step", leave=False)
            self.rate.begin(state.global_step, int(state.num_input_tokens_seen or 0))

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not is_main_process() or not logs:
                return
            if "loss" in logs:
                rate, eta = self.rate.update(state.global_step, state.max_steps, int(state.num_input_tokens_seen or 0))
                self.say(step_line(state.global_step, state.max_steps, logs, rate, eta))
            elif any(k.startswith("eval_") for k in logs):
                self.say(eval_line(state.global_step, state.max_steps, logs))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ConsoleCallback()


def replace_progress_callbacks(trainer, callback) -> None:
    """Swap transformers' dict printing and progress bar (whichever it added) for `callback`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    try:
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
    except ImportError:  # the notebook callback needs IPython
        pass
    trainer.add_callback(callback)


def run_facts(config, plan, loaded_model, summary, output_dir: Path) -> dict[str, Any]:
    """The start summary's facts (all but the step counts, which the Trainer knows when training begins)."""
    architectures = getattr(getattr(loaded_model.model, "config", None), "architectures", None) or ["?"]
    quantization = (f"4-bit {config.bnb_4bit_quant_type} (QLoRA)" if config.load_in_4bit
                    else "8-bit" if config.load_in_8bit else None)
    return dict(
        model=config.model_path, architecture=architectures[0], backend=plan.backend,
        device={"cpu": "CPU", "cuda": "GPU"}.get(plan.device, plan.device), dtype=plan.dtype,
        quantization=quantization, trainable=loaded_model.trainable_parameters, total=loaded_model.total_parameters,
        lora=dict(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                  targets=loaded_model.target_modules, rslora=config.use_rslora, dora=config.use_dora),
        data=summary.to_dict(), packing=plan.sample_packing, max_seq_len=config.max_seq_len,
        micro=plan.micro_batch_size, accumulation=plan.gradient_accumulation_steps, world=plan.world_size,
        effective=plan.effective_batch_size, output=str(output_dir),
    )


def dry_run_summary(config, plan, summary) -> str:
    """What a dry run reports: the steps, epochs and tokens the run would take (nothing is trained or written)."""
    rows = summary.rows_out
    if plan.sample_packing:  # packed rows fill sequences of max_seq_len tokens almost completely
        rows = math.ceil(summary.tokens_total / max(1, config.max_seq_len))
    steps, epochs = planned_steps(rows, plan.effective_batch_size, config.num_epochs, config.max_steps)
    per_epoch = max(1, math.ceil(rows / max(1, plan.effective_batch_size)))
    unit = f"{rows:,} packed sequences of <= {config.max_seq_len:,} tokens" if plan.sample_packing else f"{rows:,} rows"
    return (f"dry run: {steps:,} optimizer steps = {epochs:.2f} epochs of {per_epoch:,} steps ({unit}, {plan.effective_batch_size} "
            f"per step); {summary.tokens_total:,} tokens per epoch, {round(summary.tokens_total * epochs):,} in all "
            f"({summary.supervised_tokens_total:,} with loss per epoch). Nothing trained, nothing written")
