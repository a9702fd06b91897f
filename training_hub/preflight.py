"""Pre-flight: what can be known about a run from the config, the model's config and the files alone, checked
before any model weights are loaded (so a typo costs seconds, not the minutes a large model takes to load).

The model is built on the meta device (module names and shapes, no memory), the base model's and the adapter's
safetensors headers are read without their tensors, and the files of a checkpoint being resumed are checked
for damage. Every problem is collected and raised as one ConfigError; doubtful but possible settings are
logged as warnings.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, LoraSFTConfig
from .outputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS

logger = logging.getLogger("training_hub")

# Files that make a folder hold a tokenizer (fast, sentencepiece, BPE vocab, WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "sentencepiece.bpe.model", "tiktoken.model")
# A tokenizer with fewer tokens than this share of the embedding rows is not the model's own (vocabularies are
# padded to a multiple of 64 or 128 at most; an empty tokenizer built from a folder without its files has ~1).
MIN_VOCAB_SHARE = 0.5
# Bytes per trained LoRA parameter in a checkpoint: the fp32 adapter (4) and Adam's two fp32 moments (8).
CHECKPOINT_BYTES_PER_PARAMETER = 12
FINAL_ADAPTER_BYTES_PER_PARAMETER = 4
CHECKPOINT_OVERHEAD_BYTES = 2 * 2**20  # scheduler, RNG states, trainer_state.json, tokenizer files


@dataclass(frozen=True)
class RunSize:
    """What the run will process and keep, estimated before it starts."""

    steps: int
    effective_batch: int
    training_sequences: int
    lora_parameters: int
    bytes_needed: int


def check(config: LoraSFTConfig, tokenizer: Any, plan: Any, summary: Any, resume_checkpoint: Path | None = None) -> RunSize | None:
    """Raise ConfigError with every problem the run would hit after loading the model; log warnings for settings
    that will work but are probably not meant. `summary` is the tokenized training data's DataSummary.

    Returns the run's estimated size (None when the model could not be built on the meta device)."""
    from transformers import AutoConfig

    from .hardware import is_main_process

    model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    text_config = getattr(model_config, "text_config", None) or model_config
    problems = model_file_problems(config.model_path)
    problems += tokenizer_problems(config.model_path, tokenizer, text_config.vocab_size)
    meta = meta_model(model_config, config.trust_remote_code)
    size = None
    if meta is not None:
        targets, target_problems = resolve_targets(meta, config.target_modules)
        problems += target_problems
        if config.lora_adapter is not None:
            problems += adapter_shape_problems(Path(config.lora_adapter), meta)
        size = run_size(config, plan, summary, meta, targets)
    if is_main_process():
        problems += output_problems(Path(config.ckpt_output_dir), size.bytes_needed if size is not None else 0)
    if resume_checkpoint is not None:
        problems += checkpoint_file_problems(resume_checkpoint)
    if problems:
        raise ConfigError(problems)
    if is_main_process():
        warnings = base_model_warnings(config.lora_adapter, config.model_path) if config.lora_adapter else []
        warnings += setting_warnings(config, text_config, size)
        for warning in warnings:
            logger.warning(warning)
    return size


# ---- the model and its files ------------------------------------------------------------------------------------

def model_file_problems(model_path: str) -> list[str]:
    """Every safetensors file of a local model folder must have a whole header and all the bytes it announces."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return []  # a hub id: the hub's download checks the files
    return [problem for file in sorted(folder.glob("*.safetensors"))
            if (problem := safetensors_problem(file, f"model_path: {file}", "re-download or copy the base model again"))]


def safetensors_problem(file: Path, label: str, fix: str) -> str | None:
    """Why `file` cannot be read as safetensors (truncated, not safetensors), or None. Reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        return f"{label} is damaged ({str(error).strip() or type(error).__name__}; {file.stat().st_size:,} bytes): {fix}"
    return None


def meta_model(model_config: Any, trust_remote_code: bool):
    """The causal LM built on the meta device (names and shapes, no weights), or None when this config builds none."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, NotImplementedError) as error:  # e.g. a vision-language config
        logger.debug("pre-flight: no meta model for %s (%s)", type(model_config).__name__, error)
        return None


def resolve_targets(meta, target_modules: list[str] | None) -> tuple[list[str], list[str]]:
    """The module names LoRA will adapt, and the problem when a requested one is not in the model."""
    from .models.targets import check_targets_exist, linear_projection_names

    try:
        if target_modules is None:
            return linear_projection_names(meta), []
        check_targets_exist(meta, list(target_modules))
        return list(target_modules), []
    except ValueError as error:
        return list(target_modules or []), [f"target_modules={target_modules!r}: {error}"]


def tokenizer_problems(model_path: str, tokenizer: Any, vocab_size: int) -> list[str]:
    """A local model folder must hold tokenizer files, and the tokenizer must fit the model's embedding."""
    folder = Path(model_path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return [f"model_path={model_path!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): transformers "
                "would build an empty tokenizer and every row would train as one token. Copy the tokenizer files of "
                "the base model into the folder"]
    size = len(tokenizer)
    if size > vocab_size:
        return [f"the tokenizer of {model_path} has {size:,} tokens but the model's embedding has {vocab_size:,} rows: "
                "ids beyond it cannot be trained (a tokenizer of another model, or added tokens without resizing)"]
    if size < MIN_VOCAB_SHARE * vocab_size:
        return [f"the tokenizer of {model_path} has only {size:,} tokens for the model's {vocab_size:,} embedding rows: "
                "it is not this model's tokenizer (copy the base model's tokenizer files into the folder)"]
    return []


# ---- a LoRA adapter to continue from ----------------------------------------------------------------------------

def adapter_shape_problems(adapter: Path, meta) -> list[str]:
    """Each LoRA weight in the adapter's safetensors header must match the model module it adapts."""
    from safetensors import safe_open

    weights = adapter / ADAPTER_WEIGHTS
    damaged = safetensors_problem(weights, f"lora_adapter: {weights}", "use an older checkpoint of that run")
    if damaged:
        return [damaged]
    modules = dict(meta.named_modules())
    mismatches = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            problem = _lora_weight_problem(key, handle.get_slice(key).get_shape(), modules)
            if problem:
                mismatches.append(problem)
    if not mismatches:
        return []
    more = f" and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
    return [f"lora_adapter={str(adapter)!r} does not fit {type(meta).__name__} ({'; '.join(mismatches[:3])}{more}): it "
            "was trained on a base model of other shapes; give that base as model_path"]


def _lora_weight_problem(key: str, shape: list[int], modules: dict[str, Any]) -> str | None:
    """`base_model.model.<module>.lora_A.weight` [r, in] / `...lora_B.weight` [out, r] against the module."""
    for part, dim, feature in ((".lora_A.", -1, "in_features"), (".lora_B.", 0, "out_features")):
        if part in key:
            name = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(name)
            if module is None:
                return f"{name} is not in the model"
            expected = getattr(module, feature, None)
            if expected is not None and shape[dim] != expected:
                return f"{name}.{feature} is {expected}, the adapter's {part.strip('.')} has {shape[dim]}"
    return None


def same_base(recorded: str | None, given: str) -> bool:
    """Whether the base an adapter records (`base_model_name_or_path`) is `given`: the same path, or the same last
    name (a hub id and a local copy of it: "Qwen/Qwen2.5-1.5B" and "/models/Qwen2.5-1.5B")."""
    if not recorded:
        return True  # nothing recorded: nothing to compare
    if Path(recorded).expanduser().exists() and Path(given).expanduser().exists():
        return Path(recorded).expanduser().resolve() == Path(given).expanduser().resolve()
    return Path(recorded.rstrip("/")).name.lower() == Path(given.rstrip("/")).name.lower()


def recorded_base(adapter: str | Path) -> str | None:
    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def base_model_warnings(adapter: str | Path, model_path: str) -> list[str]:
    recorded = recorded_base(adapter)
    if same_base(recorded, model_path):
        return []
    return [f"lora_adapter={str(adapter)!r} was trained on {recorded!r}, not on model_path={model_path!r}: its weights "
            "fit this model's shapes but were learned for another model's weights"]


# ---- the output folder -----------------------------------------------------------------------------------------

def run_size(config: LoraSFTConfig, plan: Any, summary: Any, meta, targets: list[str]) -> RunSize:
    """Steps, sequences and the disk space the run's checkpoints, final adapter (and merged model) take."""
    lora = lora_parameter_count(meta, targets, config.lora_r, config.use_dora)
    sequences = summary.rows_out
    if plan.sample_packing:
        sequences = max(1, math.ceil(summary.tokens_total / config.max_seq_len))
    batch = plan.effective_batch_size
    steps = config.max_steps or math.ceil(sequences / batch) * config.num_epochs
    saves = steps // config.save_steps + 1  # every save_steps, and at the end
    kept = min(saves, (config.save_total_limit or saves) + 1)  # one more exists while the oldest is rotated out
    needed = kept * (lora * CHECKPOINT_BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD_BYTES)
    needed += lora * FINAL_ADAPTER_BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD_BYTES
    if config.save_merged:
        needed += 2 * sum(p.numel() for p in meta.parameters())  # 16-bit merged weights
    return RunSize(steps, batch, sequences, lora, needed)


def lora_parameter_count(meta, targets: list[str], r: int, use_dora: bool) -> int:
    """r * (in + out) per adapted linear module (+ out for DoRA's magnitude vector)."""
    from .models.targets import LINEAR_CLASS_NAMES

    total = 0
    for path, module in meta.named_modules():
        if type(module).__name__ in LINEAR_CLASS_NAMES and path.split(".")[-1] in targets:
            total += r * (module.in_features + module.out_features) + (module.out_features if use_dora else 0)
    return total


def output_problems(out: Path, bytes_needed: int) -> list[str]:
    """The output folder (or the nearest folder above it that exists) must be writable and have room."""
    from .checkpoints import format_bytes, nearest_existing

    existing = nearest_existing(out)
    if not existing.is_dir():
        return [f"ckpt_output_dir={str(out)!r}: {existing} is a file, not a folder"]
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".training_hub-write-test-"):
            pass
    except OSError as error:
        return [f"ckpt_output_dir={str(out)!r}: cannot write in {existing} ({error.strerror or error}); choose a "
                "folder you can write to"]
    free = shutil.disk_usage(existing).free
    if free < bytes_needed:
        return [f"ckpt_output_dir={str(out)!r}: {existing} has {format_bytes(free)} free but the run's checkpoints and adapter "
                f"need about {format_bytes(bytes_needed)}; free space, lower save_total_limit, or choose another disk"]
    return []


# ---- a checkpoint to resume from --------------------------------------------------------------------------------

def checkpoint_file_problems(checkpoint: Path) -> list[str]:
    """Damaged files in a checkpoint about to be resumed: torch zip archives (optimizer, scheduler, RNG states)
    are checked entry by entry (CRC), the adapter's safetensors header, trainer_state.json as JSON."""
    from .checkpoints import checkpoint_step, is_complete, list_checkpoints

    step = checkpoint_step(checkpoint) or 0
    older = [p for p in list_checkpoints(checkpoint.parent) if is_complete(p) and checkpoint_step(p) < step][-1:]
    fix = (f"resume from an older checkpoint (resume_from_checkpoint={str(older[0])!r})" if older else
           "no older complete checkpoint exists: start a new run (lora_adapter=<this checkpoint> keeps its weights)")
    problems = []
    for file in sorted(checkpoint.iterdir()):
        reason = _damage(file)
        if reason:
            problems.append(f"resume_from_checkpoint: {file} is damaged ({reason}); {fix}")
    return problems


def _damage(file: Path) -> str | None:
    if file.suffix in (".pt", ".pth", ".bin"):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            return f"entry {bad} fails its checksum" if bad else None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"not a whole torch file: {error}"
    if file.suffix == ".safetensors":
        problem = safetensors_problem(file, "", "")
        return problem and problem.split("(", 1)[1].rsplit(")", 1)[0]
    if file.name == "trainer_state.json":
        try:
            json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return f"not valid JSON: {error}"
    return None


# ---- settings that work but are probably not meant --------------------------------------------------------------

def setting_warnings(config: LoraSFTConfig, text_config: Any, size: RunSize | None) -> list[str]:
    warnings = []
    hidden = getattr(text_config, "hidden_size", None)
    if hidden and config.lora_r > hidden:
        warnings.append(f"lora_r={config.lora_r} is above the model's hidden size {hidden}: a LoRA rank cannot exceed "
                        "the smaller side of the matrix it adapts, so the extra rank only costs memory")
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions and config.max_seq_len > positions:
        warnings.append(f"max_seq_len={config.max_seq_len} is above the model's max_position_embeddings={positions}: "
                        "positions beyond it were never trained (unless the model extends them, e.g. rope scaling)")
    if size is not None and config.warmup_steps > size.steps:
        warnings.append(f"warmup_steps={config.warmup_steps} is longer than the run (about {size.steps} steps): the "
                        "learning rate never reaches learning_rate")
    if size is not None and size.effective_batch > size.training_sequences:
        warnings.append(f"the effective batch ({size.effective_batch} sequences per step) is larger than the data "
                        f"({size.training_sequences} sequences): every step repeats rows")
    return warnings
