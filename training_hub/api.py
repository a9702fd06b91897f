"""The public entry points: lora_sft, prepare_dataset, load. The run itself is `recipe.run`."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Literal

from . import config as cfg
from .config import LoraSFTConfig
from .result import TrainingResult


def _suggest_unknown_keywords(func):
    """Turn Python's bare 'unexpected keyword' TypeError into one that names the closest valid parameter."""
    valid = list(inspect.signature(func).parameters)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        cfg.check_parameter_names(func.__name__, kwargs, valid)
        return func(*args, **kwargs)

    return wrapper


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
    finetune_vision_layers: bool = False,
    finetune_language_layers: bool = True,
    dataset_type: cfg.DatasetType = "auto",
    field_messages: str = "messages",
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
    train_on_inputs: bool = False,
    train_on_reasoning: bool = True,
    truncation: cfg.Truncation = "truncate",
    max_seq_len: int = 2048,
    sample_packing: bool | None = None,
    data_output_dir: str | None = None,
    dataloader_num_workers: int = 0,
    eval_data_path: Any = None,
    eval_steps: int | None = None,
    eval_split: float | None = None,
    pre_lora_data_path: Any = None,
    pre_lora_max_steps: int | None = None,
    pre_lora_num_epochs: int = 1,
    pre_lora_learning_rate: float = 2e-5,
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

    Args:
        model_path (str, required): local folder or hub id of a causal LM.
        data_path (Any, required): training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a list of
            dicts or a datasets.Dataset, in any format of docs/data.md (detected).
        ckpt_output_dir (str, required): output folder for the adapter, tokenizer, run_config.json,
            training_metrics.jsonl and checkpoint-N folders (docs/checkpoints.md).
        backend ('auto' | 'unsloth' | 'peft', 'auto'): 'unsloth' (fused kernels), 'peft' (plain transformers +
            PEFT), or 'auto': packed 16-bit LoRA on a GPU with FlexAttention and no FlashAttention trains on the
            peft backend's FlexAttention route (measured faster, docs/benchmarks.md), otherwise Unsloth when it
            imports, else PEFT with a notice; the choice is printed.
        lora_r (int, 16): LoRA rank (> 0).
        lora_alpha (int, 32): LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA).
        lora_dropout (float, 0.0): dropout on the LoRA input, in [0, 1) (0 keeps Unsloth's fast path).
        target_modules (list[str] | None, None): module names to adapt; None: every linear projection inside the
            decoder blocks (q/k/v/o/gate/up/down for Llama/Qwen).
        use_rslora (bool, False): rank-stabilised LoRA scaling (alpha / sqrt(r)).
        use_dora (bool, False): DoRA (weight-decomposed LoRA; vLLM cannot serve DoRA adapters).
        init_lora_weights (bool | 'gaussian', True): PEFT's LoRA initialisation: True, False or 'gaussian'
            (PiSSA/OLoRA/EVA are not offered: they change the base or need a data pass).
        rank_pattern (dict[str, int] | None, None): per-module rank overrides, PEFT semantics (e.g. {'q_proj': 8}).
        alpha_pattern (dict[str, int] | None, None): per-module alpha overrides, PEFT semantics.
        loftq_config (dict[str, Any] | None, None): LoftQ initialisation settings (refused: see below). Not
            supported yet (LoftQ initialisation (its adapter is only right with the quantized base it was fitted to,
            not with the 16-bit base that is saved, merged and served; use load_in_4bit=True)): only the default is
            accepted.
        lora_adapter (str | None, None): a saved PEFT LoRA adapter folder to continue training from; its r, alpha,
            targets and dropout are used.
        finetune_vision_layers (bool, False): vision-language models: adapt the vision encoder's linear layers (a
            text-only model must leave it False).
        finetune_language_layers (bool, True): vision-language models: adapt the language model's linear layers (a
            text-only model must leave it True).
        dataset_type ('auto' | 'messages' | 'chat_template' | 'alpaca' | 'sharegpt' | 'prompt_completion' | 'text' |
            'passthrough', 'auto'): the rows' format; 'auto' detects it from their fields (docs/data.md).
        field_messages (str, 'messages'): column holding the conversation.
        field_instruction (str, 'instruction'): alpaca instruction column.
        field_input (str, 'input'): alpaca input column.
        field_output (str, 'output'): alpaca output column.
        train_on_inputs (bool, False): loss on every token; False: on assistant answers (and their end-of-turn
            token) only.
        train_on_reasoning (bool, True): train on assistant reasoning (reasoning_content) as part of the answer;
            False: render it as context only.
        truncation ('truncate' | 'drop' | 'error', 'truncate'): rows longer than max_seq_len: 'truncate' (keep the
            start), 'drop', or 'error' naming the row.
        max_seq_len (int, 2048): tokens per sequence and per packed bin (>= 2).
        sample_packing (bool | None, None): pack several rows per sequence; None: on with a GPU, off on the CPU
            (True on the CPU needs backend='peft').
        data_output_dir (str | None, None): tokenized-data cache folder (default ~/.cache/training_hub/data; 'none'
            disables it).
        dataloader_num_workers (int, 0): processes collating batches; 0 collates in the training process.
        eval_data_path (Any, None): evaluation data, read and tokenized exactly like data_path; eval_loss is logged.
        eval_steps (int | None, None): evaluate every N steps; None: once per epoch (needs eval_data_path or
            eval_split).
        eval_split (float | None, None): hold out this share of the training rows, in (0, 1), for evaluation.
        pre_lora_data_path (Any, None): phase 1's data (text rows, or any format of docs/data.md): every parameter
            of the base is trained on it first and saved as a 16-bit model in ckpt_output_dir/pre_lora/model, the
            base of the LoRA run; None: no phase 1.
        pre_lora_max_steps (int | None, None): phase 1's optimizer steps; overrides pre_lora_num_epochs.
        pre_lora_num_epochs (int, 1): phase 1's passes over its data (unless pre_lora_max_steps).
        pre_lora_learning_rate (float, 2e-05): phase 1's peak learning rate (a full fine-tune wants a lower one than
            LoRA).
        num_epochs (int, 3): passes over the data (unless max_steps).
        max_steps (int | None, None): optimizer steps; overrides num_epochs.
        effective_batch_size (int | None, None): sequences per optimizer step over all processes; give any two of
            the three batch settings and the third is derived.
        micro_batch_size (int | 'auto' | None, None): sequences per forward pass per process; 'auto': the largest
            that fits; None with nothing else: 2.
        gradient_accumulation_steps (int | None, None): forward passes per optimizer step.
        learning_rate (float, 0.0002): peak learning rate.
        lr_scheduler ('linear' | 'cosine' | 'cosine_with_restarts' | 'polynomial' | 'constant' |
            'constant_with_warmup' | 'inverse_sqrt', 'linear'): transformers learning-rate schedule
            (cosine_with_min_lr and warmup_stable_decay are refused: they need arguments lora_sft does not take).
        warmup_steps (int, 10): linear warm-up steps.
        weight_decay (float, 0.01): AdamW weight decay.
        max_grad_norm (float, 0.3): gradient clipping norm.
        optim ('adamw_torch' | 'adamw_torch_fused' | 'adamw_8bit' | 'adamw_bnb_8bit' | 'paged_adamw_8bit' |
            'paged_adamw_32bit' | 'adafactor' | 'sgd' | 'adagrad' | 'rmsprop' | 'lion_8bit' | 'paged_lion_8bit' |
            None, None): transformers optimizer name; None: adamw_8bit on a GPU with bitsandbytes, else
            adamw_torch_fused.
        gradient_checkpointing (bool | 'auto' | 'offload', 'auto'): 'auto': the cheapest of off / on / offload that
            fits in GPU memory (off on the CPU); 'offload' is Unsloth's offloaded checkpointing.
        seed (int, 42): seeds data order, dropout and the LoRA initialisation.
        bf16 (bool | None, None): bfloat16 training; None: bf16 on GPUs that have it, float32 on the CPU; False:
            float32 unless fp16=True.
        fp16 (bool | None, None): float16 training (GPU only); None: only on GPUs without bf16.
        tf32 (bool | None, None): TF32 matmuls on NVIDIA GPUs.
        flash_attention (bool | None, None): None: FlashAttention 2 when flash_attn is installed, else SDPA (on the
            peft backend, packed GPU batches use FlexAttention: one kernel per layer); True without flash_attn is an
            error.
        load_in_4bit (bool, False): QLoRA: 4-bit (bitsandbytes) base weights.
        load_in_8bit (bool, False): 8-bit base weights (GPU only).
        bnb_4bit_quant_type ('nf4' | 'fp4', 'nf4'): 4-bit data type (with load_in_4bit).
        bnb_4bit_compute_dtype ('bfloat16' | 'float16' | 'float32' | None, None): 4-bit compute dtype; None: the
            training dtype.
        bnb_4bit_use_double_quant (bool, True): quantize the 4-bit quantization constants too.
        max_tokens_per_gpu (int | None, None): token budget per micro batch. Not supported yet (token-budget
            batching (use sample_packing with micro_batch_size: a packed micro batch holds at most micro_batch_size
            x max_seq_len tokens)): only the default is accepted.
        save_steps (int, 500): checkpoint every N optimizer steps and at the end.
        save_total_limit (int | None, 3): complete checkpoints kept (None: all).
        logging_steps (int, 1): log every N steps: one console line (loss, learning rate, gradient norm, tokens/s,
            ETA), one training_metrics.jsonl row, the trackers; loss.png and a README.md model card are written at
            the end.
        overwrite_output_dir (bool, False): replace an earlier run in ckpt_output_dir (not with
            resume_from_checkpoint).
        resume_from_checkpoint (bool | 'auto' | str | None, None): True: continue from the newest complete
            checkpoint; 'auto': that, or start fresh; a path: that checkpoint.
        save_merged (bool, False): also write ckpt_output_dir/merged: the LoRA folded into the 16-bit base.
        save_samples (int | None, None): also checkpoint each time another N training sequences have been seen (step
            x effective batch).
        checkpoint_at_epoch (bool | None, None): also checkpoint at the end of every epoch.
        accelerate_full_state_at_epoch (bool | None, None): also checkpoint the full training state (adapter,
            optimizer, scheduler, RNG) at every epoch end.
        wandb_project (str | None, None): log to Weights & Biases in this project (any wandb_* turns it on; rank 0
            starts and ends the run; offline mode and the key stay wandb's settings; the wandb extra).
        wandb_entity (str | None, None): Weights & Biases entity (team or user).
        wandb_run_name (str | None, None): Weights & Biases run name.
        tensorboard_log_dir (str | None, None): folder for TensorBoard event files (the tensorboard extra).
        mlflow_tracking_uri (str | None, None): log to MLflow at this URI: a server, or sqlite:///path/mlflow.db
            (any mlflow_* turns it on; rank 0 starts the run and ends it FINISHED or FAILED; the mlflow extra).
        mlflow_experiment_name (str | None, None): MLflow experiment (created if missing).
        mlflow_run_name (str | None, None): MLflow run name.
        report_to (list[str] | None, None): other transformers logging integrations by name (e.g. ['comet_ml']);
            wandb, mlflow and tensorboard are set up by their own parameters.
        nproc_per_node (int | 'auto' | 'gpu' | None, None): processes per node: from plain python, N > 1 makes
            lora_sft start N workers itself and return their result; 'auto': every visible GPU (1 on a CPU-only
            machine); 'gpu': every visible GPU; under torchrun it must equal torchrun's (docs/distributed.md).
        nnodes (int | None, None): nodes of a self-launched job (each node runs the same call); needs rdzv_endpoint,
            or master_addr with node_rank.
        node_rank (int | None, None): this node's number, 0..nnodes-1 (node 0 hosts the rendezvous); unset with
            rdzv_endpoint: nodes are numbered on arrival.
        rdzv_id (int | str | None, None): the job's id, the same on every node.
        rdzv_endpoint (str | None, None): 'host:port' where the nodes meet (c10d); not with master_addr/master_port.
        master_addr (str | None, None): the torchrun-style meeting host, with node_rank.
        master_port (int | None, None): the torchrun-style meeting port (default 29500).
        enable_model_splitting (bool, False): for a model larger than one GPU (peft backend): under a launch
            (torchrun, nproc_per_node, nnodes) FSDP2 shards the base, LoRA and optimizer state over the GPU
            processes (each holds 1/N; the adapter is saved whole); one plain process spreads the layers over its
            GPUs (device_map='balanced'). Refused with CPU processes (accelerate runs FSDP on GPUs only), with
            load_in_8bit under a launch, with backend='unsloth', and in one process with fewer than 2 GPUs
            (docs/distributed.md).
        trust_remote_code (bool, False): allow the model's own Python code to run.
        callbacks (list[Any] | None, None): transformers TrainerCallbacks added to the trainer (Python only).
        dry_run (bool, False): validate, read and tokenize the data, print the plan and the steps, epochs and tokens
            the run would take; load no model, write nothing (any ckpt_output_dir will do).

    Returns:
        TrainingResult with model, tokenizer, trainer, paths, final metrics, plan and data summary.

    Raises:
        TypeError: an unknown parameter name (the closest valid one is suggested).
        ValueError (ConfigError / DataError): a bad value or bad data, naming the parameter or file:line.
        TrainingStopped (RuntimeError): SIGTERM/SIGINT (a checkpoint was saved) or divergence (a non-finite
            loss; the last good checkpoint is kept); the message says how to continue.
    """
    config = LoraSFTConfig(**locals())
    from .recipe import run

    return run(config)


def prepare_dataset(
    data_path: Any,
    *,
    model_path: str | None = None,
    tokenizer: Any = None,
    max_seq_len: int = 2048,
    dataset_type: cfg.DatasetType = "auto",
    train_on_inputs: bool = False,
    train_on_reasoning: bool = True,
    truncation: cfg.Truncation = "truncate",
    field_messages: str = "messages",
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
    data_output_dir: str | None = None,
    trust_remote_code: bool = False,
):
    """Validate, normalize and tokenize a dataset exactly as `lora_sft` would, without loading a model.

    Give `model_path` (its tokenizer is loaded; a vision-language model's processor, with image parts in the chats
    accepted) or a `tokenizer` (or processor). The other parameters mean what they mean for `lora_sft`
    (docs/parameters.md). Returns a `TokenizedData` whose `.dataset` has one row per example
    (`input_ids`, `labels` with -100 where no loss is taken) and whose `.summary` counts rows, tokens and
    truncation; `training_hub.data.format_example(ids, labels, tokenizer)` prints an example with the trained
    spans marked.
    """
    from . import data
    from .models.vision import cache_problem, detect

    if (model_path is None) == (tokenizer is None):
        raise ValueError("prepare_dataset needs exactly one of model_path= or tokenizer=")
    problems = data.settings_problems(max_seq_len, truncation)
    if problems:
        raise cfg.ConfigError(problems)
    settings = data.DataSettings(dataset_type=dataset_type, field_messages=field_messages,
                                 field_instruction=field_instruction, field_input=field_input,
                                 field_output=field_output, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                                 train_on_reasoning=train_on_reasoning, truncation=truncation,
                                 data_output_dir=data_output_dir)
    vision = detect(model_path, trust_remote_code) if tokenizer is None else hasattr(tokenizer, "image_processor")
    cache = cache_problem(data_output_dir) if vision else None
    if cache:
        raise cfg.ConfigError([cache])
    loaded = data.load_examples(data_path, **settings.loading(), images=vision)
    if vision:
        from .data.vision import load_processor, tokenize_vision_examples

        processor = tokenizer or load_processor(model_path, trust_remote_code)
        return tokenize_vision_examples(loaded, processor, **{k: v for k, v in settings.tokenizing().items()
                                                              if k != "cache_dir"})
    if tokenizer is None:
        tokenizer = data.load_tokenizer(model_path, trust_remote_code)
    return data.tokenize_examples(loaded, tokenizer, **settings.tokenizing())


def load(ckpt_output_dir: str | Path, device: str | None = None):
    """Load a trained adapter with its base model for generation. Returns (model, tokenizer), or (model,
    processor) for a vision-language model.

    The base model is the one named in the adapter's `adapter_config.json`.
    """
    from peft import PeftModel

    from .models.adapters import read_adapter_config
    from .models.vision import auto_model_class, detect, load_processing_class
    from .outputs import ADAPTER_CONFIG, final_adapter_problem

    path = Path(ckpt_output_dir)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} holds no adapter ({ADAPTER_CONFIG}); point to a lora_sft output folder")
    problem = final_adapter_problem(path)
    if problem is not None:
        raise ValueError(problem)
    base_path = read_adapter_config(path, "ckpt_output_dir")["base_model_name_or_path"]
    vision = detect(base_path, trust_remote_code=False)
    model = PeftModel.from_pretrained(auto_model_class(vision).from_pretrained(base_path), str(path))
    if device is not None:
        model = model.to(device)
    tokenizer = load_processing_class(str(path), vision)
    model.eval()
    return model, tokenizer
