"""GPU throughput benchmark: training_hub's `lora_sft` against plain PEFT and the public training-hub's setup.

One command builds (or reuses) a random-init model of a real shape, writes one pre-tokenized data file and
runs every row in its own subprocess on the same data (Unsloth patches the whole process it is imported
in, so the plain PEFT row never shares one with it), then prints a markdown table:

    python benchmarks/throughput.py --shape llama-3.1-8b --mode lora --out DIR
    python benchmarks/throughput.py --shape llama-3.1-8b --mode qlora --rows a,c,lowmem --out DIR
    python benchmarks/throughput.py --tiny --out /tmp/bench-tiny     # CPU smoke run of every code path

Rows (sequence length 2048, 8 sequences per optimizer step, LoRA r=16 alpha=32 on the 7 projections,
lr 2e-4, `--warmup` + `--steps` optimizer steps; `--mode qlora` loads the base in 4-bit in every row):

* a: ``lora_sft(effective_batch_size=8)``: training_hub's automatic choices (backend, packing,
  checkpointing and micro batch from free memory, adamw_8bit); lever ``a-unsloth`` pins Unsloth, ``a-flex``
  the peft backend's packed FlexAttention route;
* b: ``lora_sft(backend="peft", micro_batch_size=2, gradient_accumulation_steps=4,
  gradient_checkpointing=True, sample_packing=True)`` on SDPA without Liger: what a user of plain
  transformers + PEFT picks;
* c: the public training-hub's configuration of the same Unsloth kernels, written directly
  (FastLanguageModel, offloaded "unsloth" checkpointing, micro batch 2 x accumulation 4, TRL SFTTrainer);
* lowmem (QLoRA only): ``lora_sft(load_in_4bit=True, gradient_checkpointing="offload", micro_batch_size=1,
  effective_batch_size=8)``: the documented low-memory setting.

Lever rows (``LEVERS``) repeat row a or c with one thing changed, to measure each default rather than assume
it: e.g. ``--rows a,a-cudnn,c,c-flash`` swaps the SDPA backend choice between (a) and (c), and ``a-flex`` runs (a)
on the peft backend's packed FlexAttention route (one kernel per layer, Liger kernels). ``a#2`` runs a row
a second time in the same call. ``--profile`` writes a torch.profiler summary of the last two warm-up steps of
every row to DIR/logs/ROW.profile.txt (the measured steps are not profiled).

Measurement, the same for every row: a TrainerCallback takes ``time.perf_counter()`` at every
``on_step_end`` after ``torch.cuda.synchronize()``; tokens/s = non-padding tokens of the steps after the
warm-up (``state.num_input_tokens_seen`` with ``include_num_input_tokens_seen="non_padding"``, difference
between the last warm-up step and the last step) / their wall time. Peak memory is
``torch.cuda.max_memory_allocated()`` (and ``max_memory_reserved()``) of the row's process, loading included.

Results go to DIR/results.md and DIR/results.json (rewritten after each row, so a cut-off run keeps the
rows it finished); each row's log is DIR/logs/ROW.log. The model (kept for the next run with the same
shape), the data and the adapters go to --work (default DIR): on a machine whose output folder is copied
back, point --work elsewhere (an 8B model is 16 GB).

The default row order is a, c, (lowmem,) b: the slowest row last, so a run cut short loses the least.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training_hub.plan import ModelShape  # noqa: E402  (light: no torch; the FLOPs formula runs use)

ROW_MARK = "@@THROUGHPUT_ROW "
PREPARE_MARK = "@@THROUGHPUT_PREPARE "
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LEARNING_RATE = 16, 32, 2e-4

SHAPES = {
    "qwen2.5-1.5b": dict(architecture="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "llama-3.1-8b": dict(architecture="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # --tiny: a hidden-64 Qwen2 whose vocabulary is the tokenizer's (vocab_size None).
    "tiny": dict(architecture="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False,
                 rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6),
}

ROW_TITLES = {
    "a": "(a) lora_sft defaults",
    "b": "(b) lora_sft peft, mb 2 x ga 4, ckpt, packing",
    "c": "(c) public training-hub config (Unsloth direct)",
    "lowmem": "(lowmem) lora_sft QLoRA, offload, mb 1",
}

# Lever rows: row a (or c) with one thing changed, each in its own process like every row: each
# lever is measured, not assumed. `env` is set before Unsloth is imported (these are Unsloth's own switches);
# `plan_constants` replace one of plan.py's rules; `sdpa_backends` scope torch's SDPA choice for row (c).
LEVERS = {
    # (a) on Unsloth: the default for packed 16-bit LoRA until the FlexAttention route measured faster.
    "a-unsloth": dict(base="a", overrides={"backend": "unsloth"}, title="(a) on Unsloth (per-document SDPA)"),
    "a-unpacked": dict(base="a", overrides={"sample_packing": False}, title="(a) with sample_packing=False"),
    "a-adamw": dict(base="a", overrides={"optim": "adamw_torch_fused"}, title="(a) with optim adamw_torch_fused"),
    "a-workers": dict(base="a", overrides={"dataloader_num_workers": 4}, title="(a) with 4 dataloader workers"),
    "a-nocompile": dict(base="a", overrides={"backend": "unsloth"}, env={"UNSLOTH_BLOCK_COMPILE": "0"}, title="(a) without Unsloth's per-block compile"),
    "a-nochunkce": dict(base="a", overrides={"backend": "unsloth"}, env={"UNSLOTH_CHUNKED_CE": "0"}, title="(a) without Unsloth's chunked cross-entropy"),
    "a-ckpt": dict(base="a", overrides={"gradient_checkpointing": True}, title="(a) with gradient checkpointing on"),
    # training_hub trains packed Unsloth batches on flash / memory-efficient SDPA (plan.PACKED_SDPA_BACKENDS);
    # these two rows swap that choice between (a) and (c).
    "a-cudnn": dict(base="a", overrides={"backend": "unsloth"}, plan_constants={"PACKED_SDPA_BACKENDS": None},
                    title="(a) with torch's own SDPA choice (cuDNN included; the default before 2026-11-23)"),
    "c-flash": dict(base="c", sdpa_backends=["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
                    title="(c) trained under flash / memory-efficient SDPA like (a)"),
    # The packed FlexAttention route: plain transformers + PEFT, one FlexAttention kernel per layer with a document
    # mask, packed rows padded to one length, Liger's RMSNorm / SwiGLU / RoPE (plan.PACKED_FLEX_ATTENTION,
    # plan.LIGER_KERNELS); Unsloth is not imported in these rows.
    "a-flex": dict(base="a", overrides={"backend": "peft"},
                   title="(a) on the peft backend: FlexAttention packed, static length, Liger"),
    "a-flex-noliger": dict(base="a", overrides={"backend": "peft"}, plan_constants={"LIGER_KERNELS": False},
                           title="(a) on the peft backend: FlexAttention packed, static length, no Liger"),
    # The micro batch the plan picks against the one it picked before its peft-route memory ratio (8B on the H200:
    # 4 x 2 now, 8 x 1 before), and the plan's choice on an 80 GB GPU: the row's process may use 79.2 GiB of the
    # GPU (torch's per-process memory fraction) and the plan is shown that much, as on an H100 80GB.
    "a-mb8": dict(base="a", overrides={"micro_batch_size": 8, "gradient_checkpointing": False},
                  title="(a) with micro_batch_size=8, checkpointing off"),
    "a-80g": dict(base="a", gpu_memory_gib=79.2, title="(a) as planned for and capped to an 80 GB GPU"),
    "a-flex-ckpt": dict(base="a", overrides={"backend": "peft", "gradient_checkpointing": True},
                        title="(a) on the peft backend: FlexAttention, Liger, gradient checkpointing on"),
    # Unsloth's own switch for packed attention: one SDPA call per layer with a dense (T, T) mask instead of one
    # call per document (its FlexAttention path is off in its code, and it drops `attn_implementation`).
    "a-densemask": dict(base="a", overrides={"backend": "unsloth"}, env={"UNSLOTH_SDPA_PACKED_SEGMENTS": "0"},
                        title="(a) with Unsloth's packed attention as one SDPA call with a dense mask"),
}
# Row (b) is what a user of plain transformers + PEFT gets: SDPA, no Liger. The peft backend's own packed route
# (FlexAttention, Liger) is measured in the a-flex rows.
BASE_PLAN_CONSTANTS = {"b": {"PACKED_FLEX_ATTENTION": False, "LIGER_KERNELS": False}}
for _name, _lever in LEVERS.items():
    ROW_TITLES[_name] = _lever["title"]

# Goals per (shape, mode): (text, kind, target); check_goals reads the value of each kind from the rows.
GOAL_TEXT = {
    ("llama-3.1-8b", "lora"): [("(a) >= 14,000 tokens/s", "a_min", 14000), ("(a) >= 2.0x (c)", "a_vs_c", 2.0),
                               ("(a) >= 4x (b)", "a_vs_b", 4.0)],
    ("llama-3.1-8b", "qlora"): [("(a) >= 12,000 tokens/s", "a_min", 12000), ("lowmem peak <= 6.5 GiB", "lowmem_max_gib", 6.5)],
    ("qwen2.5-1.5b", "lora"): [("(a) >= 30,000 tokens/s", "a_min", 30000)],
}


# --------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------------------------

# Model FLOPs per trained token come from training_hub.plan.ModelShape.flops_per_token, the same
# formula every training run prints its MFU with:
#
#     FLOPs/token = k * N + k * (2 * n_layers * ctx * hidden)
#
# * N = non-embedding parameters + LM head (ModelShape.matmul_parameters); a forward pass costs 2N per token.
# * k = 4 without recomputation: forward (2N) + backward with respect to the activations only (2N); the frozen
#   base weights of LoRA get no weight gradients, and the LoRA matrices are negligible. k = 6 with gradient
#   checkpointing (plain or offloaded): one more forward pass per layer.
# * ctx = mean attended context per token: packed documents attend causally within themselves only, so a token
#   of a document of length L sees ~L / 2 earlier tokens; ctx = mean document length / 2. 2 * n_layers * ctx *
#   hidden is the forward cost of QK^T and AV, scaled by the same k. (Attention's backward costs twice its
#   forward, so this counts attention a little low; at ctx ~300 attention is ~1% of these shapes' FLOPs.)
#
# MFU = tokens/s * FLOPs/token / peak, where peak is the bf16 matmul rate measured on the same GPU in the same
# run (8192 x 8192 matrices). Counting FLOPs the model needs (not those a kernel spends on masked blocks) is
# what makes the rows comparable.

def recomputes(plan: dict) -> bool:
    return plan.get("gradient_checkpointing", "off") != "off"


# --------------------------------------------------------------------------------------------------------
# Preparation (own subprocess): model, tokenizer, data, bf16 matmul peak
# --------------------------------------------------------------------------------------------------------

def model_config(shape: dict, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    fields = {k: v for k, v in shape.items() if k not in ("architecture", "rope_theta")}
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    fields.update(rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return (Qwen2Config if shape["architecture"] == "qwen2" else LlamaConfig)(**fields)


def build_model(model_dir: Path, shape_name: str, device: str) -> float:
    """Random-init bf16 model of the shape, built on `device`, saved (safetensors) with the tiny ChatML tokenizer."""
    import shutil

    from training_hub.tiny import build_tokenizer, save_random_model

    marker = model_dir / "benchmark_shape.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape_name:
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(model_dir, ignore_errors=True)
    tokenizer = build_tokenizer("chatml")
    save_random_model(model_config(SHAPES[shape_name], tokenizer), tokenizer, model_dir, device=device)
    marker.write_text(json.dumps({"shape": shape_name}))
    return time.perf_counter() - start


def write_data(path: Path, vocab: int, seq: int, batch: int, total_steps: int, seed: int = 0) -> dict:
    """Passthrough rows of 300-900 tokens (scaled to `seq`/2048), first ~30% of each row masked with -100;
    enough for `total_steps` x `batch` packed sequences of `seq` tokens, x1.2."""
    lo, hi = max(4, seq * 300 // 2048), max(8, seq * 900 // 2048)
    need = total_steps * batch * seq * 1.2
    rng = random.Random(seed)
    rows, tokens = [], 0
    while tokens < need or len(rows) < total_steps * batch * 1.2:  # also enough rows when not packed
        n = rng.randint(lo, hi)
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        masked = int(0.3 * n)
        rows.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
        tokens += n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "tokens": tokens, "mean_row_tokens": tokens / len(rows), "row_tokens": [lo, hi]}


def matmul_peak_tflops(device: str, size: int, iterations: int) -> float:
    """bf16 matmul rate of `size` x `size` matrices: `iterations` timed after 2 x `iterations` warm-up ones
    (clocks ramp up), best of 3."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2 * iterations):
        torch.matmul(a, b)
    sync()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * iterations / best / 1e12


def prepare(bench: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(bench["model_path"])
    build_s = build_model(model_dir, bench["shape"], device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = write_data(Path(bench["data_path"]), len(tokenizer), bench["seq"], bench["batch"],
                      bench["warmup"] + bench["steps"])
    size, iterations = (8192, 50) if not bench["tiny"] else (1024, 5)
    peak = matmul_peak_tflops(device, size, iterations)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    return {"device": device, "gpu_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "gpu_count": torch.cuda.device_count(), "build_seconds": build_s, "peak_tflops": peak,
            "matmul": f"{size}x{size} bf16, {iterations} iterations", "data": data, "shape": asdict(shape)}


# --------------------------------------------------------------------------------------------------------
# One row (own subprocess)
# --------------------------------------------------------------------------------------------------------

PROFILED_STEPS = 2


def write_profile(prof, path: Path, wall_seconds: float) -> None:
    """The top operators by GPU and by CPU time, and how busy the GPU was, for the profiled steps."""
    averages = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in averages)
    lines = [f"profiled {PROFILED_STEPS} optimizer steps (inside the warm-up): wall {wall_seconds:.3f} s, "
             f"GPU kernel time {device_us / 1e6:.3f} s ({device_us / 1e6 / wall_seconds:.0%} of wall)", ""]
    for key in ("self_device_time_total", "self_cpu_time_total"):
        lines += [f"== by {key}", averages.table(sort_by=key, row_limit=40, max_name_column_width=90), ""]
    path.write_text("\n".join(lines))


def make_timer(cuda: bool, profile_path: Path | None = None, warmup: int = 0):
    """A TrainerCallback with a timestamp and token counts at every optimizer step. Import after Unsloth.

    With `profile_path`, the last PROFILED_STEPS warm-up steps run under torch.profiler (so the measured
    steps are not slowed) and its summary is written there."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[dict] = []
            self.load_peak = (0, 0)
            self._hook_tensor = None

        def _count(self, module, args, kwargs):
            if not module.training:
                return
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            n = mask.sum() if mask is not None else (ids.numel() if ids is not None else 0)
            self._hook_tensor = n if self._hook_tensor is None else self._hook_tensor + n

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                model.register_forward_pre_hook(self._count, with_kwargs=True)
            if cuda:
                torch.cuda.synchronize()
                self.load_peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            self.marks.append(self._mark(state))

        def on_step_begin(self, args, state, control, **kwargs):
            if profile_path is not None and state.global_step == warmup - PROFILED_STEPS:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()
                self.profile_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(self._mark(state))
            if getattr(self, "profiler", None) is not None and state.global_step == warmup:
                wall = time.perf_counter() - self.profile_start
                self.profiler.__exit__(None, None, None)
                write_profile(self.profiler, profile_path, wall)
                self.profiler = None
                self.marks[-1] = self._mark(state)  # the next step's time starts after the profile is written

        def _mark(self, state) -> dict:
            now = time.perf_counter()
            hook = int(self._hook_tensor) if self._hook_tensor is not None else 0
            return {"step": state.global_step, "t": now, "tokens": int(state.num_input_tokens_seen or 0),
                    "hook_tokens": hook}

    return StepTimer()


def measure(timer, warmup: int) -> dict:
    by_step = {m["step"]: m for m in timer.marks}
    if warmup not in by_step or not timer.marks or timer.marks[-1]["step"] <= warmup:
        return {"error": f"training stopped before step {warmup + 1} (steps seen: {sorted(by_step)})"}
    first, last = by_step[warmup], timer.marks[-1]
    seconds = last["t"] - first["t"]
    tokens = last["tokens"] - first["tokens"]
    hook_tokens = last["hook_tokens"] - first["hook_tokens"]
    source = "state.num_input_tokens_seen"
    if tokens <= 0:  # the trainer did not count: fall back to the forward hook's count
        tokens, source = hook_tokens, "forward hook"
    steps = last["step"] - first["step"]
    times = [b["t"] - a["t"] for a, b in zip(timer.marks, timer.marks[1:]) if b["step"] > warmup]
    return {"tokens_per_s": tokens / seconds if seconds > 0 else None, "measured_steps": steps,
            "measured_seconds": seconds, "measured_tokens": tokens, "hook_tokens": hook_tokens, "token_source": source,
            "tokens_per_step": tokens / max(1, steps), "step_seconds_min_max": [min(times), max(times)] if times else None,
            "step_seconds": [round(t, 4) for t in times]}


def lora_sft_row(name: str, bench: dict, timer, overrides: dict | None = None, run_name: str | None = None) -> dict:
    import training_hub

    qlora = bench["mode"] == "qlora"
    total = bench["warmup"] + bench["steps"]
    common = dict(model_path=bench["model_path"], data_path=bench["data_path"],
                  ckpt_output_dir=str(Path(bench["work"]) / "runs" / (run_name or name)), max_seq_len=bench["seq"],
                  lora_r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=PROJECTIONS, learning_rate=LEARNING_RATE,
                  max_steps=total, save_steps=total + 1000, logging_steps=1, overwrite_output_dir=True,
                  callbacks=[timer])
    if qlora:
        common["load_in_4bit"] = True
    if name == "a":
        extra = dict(backend="auto", effective_batch_size=bench["batch"])
    elif name == "b":
        extra = dict(backend="peft", micro_batch_size=2, gradient_accumulation_steps=bench["batch"] // 2,
                     gradient_checkpointing=True, sample_packing=True)
    elif name == "lowmem":
        extra = dict(backend="unsloth", gradient_checkpointing="offload", micro_batch_size=1,
                     effective_batch_size=bench["batch"])
    else:
        raise ValueError(name)
    result = training_hub.lora_sft(**{**common, **extra, **(overrides or {})})
    keep = ("backend", "dtype", "micro_batch_size", "gradient_accumulation_steps", "effective_batch_size",
            "sample_packing", "gradient_checkpointing", "optim", "attn_implementation", "packed_length", "liger_kernel",
            "notes")
    return {"plan": {k: result.plan.get(k) for k in keep},
            "lora_sft_tokens_per_s": result.metrics.get("tokens_per_second"),
            "train_loss": result.metrics.get("train_loss")}


def public_hub_row(bench: dict, timer, cuda: bool, run_name: str = "c") -> dict:
    """Row (c): the public training-hub's Unsloth configuration, written directly."""
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers/TRL/PEFT

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    qlora = bench["mode"] == "qlora"
    model, tokenizer = FastLanguageModel.from_pretrained(bench["model_path"], max_seq_length=bench["seq"], dtype=None,
                                                         load_in_4bit=qlora)
    model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=PROJECTIONS,
                                             lora_dropout=0, use_gradient_checkpointing="unsloth", random_state=3407)
    rows = [json.loads(line) for line in Path(bench["data_path"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # On the CPU (--tiny smoke run only) Unsloth turns packing off and 8-bit AdamW needs a GPU.
    args = SFTConfig(
        output_dir=str(Path(bench["work"]) / "runs" / run_name), per_device_train_batch_size=2,
        gradient_accumulation_steps=bench["batch"] // 2, packing=cuda, packing_strategy="bfd", max_length=bench["seq"],
        bf16=cuda or dtype == torch.bfloat16, optim="adamw_8bit" if cuda else "adamw_torch",
        learning_rate=LEARNING_RATE, weight_decay=0.01, max_grad_norm=0.3, warmup_steps=10, lr_scheduler_type="linear",
        dataloader_pin_memory=False, max_steps=bench["warmup"] + bench["steps"], report_to="none", logging_steps=1,
        save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args, callbacks=[timer])
    output = trainer.train()
    return {"plan": {"backend": "unsloth (direct)", "dtype": str(dtype).replace("torch.", ""), "micro_batch_size": 2,
                     "gradient_accumulation_steps": bench["batch"] // 2, "effective_batch_size": bench["batch"],
                     "sample_packing": bool(trainer.args.packing),
                     "gradient_checkpointing": "offload", "optim": args.optim if isinstance(args.optim, str) else
                     getattr(args.optim, "value", str(args.optim))},
            "train_loss": output.metrics.get("train_loss")}


def cap_gpu_memory(gib: float) -> None:
    """Make this row's process behave as on a GPU of `gib` GiB: torch's allocator refuses more (an out-of-memory
    error, as there), and the plan reads that total (less what is in use) as the free memory."""
    from dataclasses import replace

    import torch

    from training_hub import hardware

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total))
    detect = hardware.detect

    def capped() -> hardware.Hardware:
        hw = detect()
        used = hw.total_memory_gib - hw.free_memory_gib
        return replace(hw, total_memory_gib=gib, free_memory_gib=max(0.0, gib - used))

    hardware.detect = capped  # a lever on training_hub's own hardware reading, like plan_constants


def row_kind(name: str) -> str:
    """`a#2` is a second run of row a (e.g. to see whether the order of rows matters)."""
    return name.split("#")[0]


def row_backend(base: str, bench: dict, overrides: dict) -> str:
    """The backend a row trains with, known before anything imports transformers (Unsloth must come first)."""
    if base in ("c", "lowmem"):
        return "unsloth"
    requested = overrides.get("backend", "peft" if base == "b" else "auto")
    if requested != "auto":
        return requested
    from training_hub import hardware
    from training_hub.config import LoraSFTConfig
    from training_hub.plan import auto_backend

    config = LoraSFTConfig(model_path=bench["model_path"], data_path=bench["data_path"], ckpt_output_dir=bench["work"],
                           load_in_4bit=bench["mode"] == "qlora", **{k: v for k, v in overrides.items() if k != "backend"})
    return auto_backend(config, hardware.detect())[0] or "unsloth"


def run_row(name: str, bench: dict) -> dict:
    report: dict = {"name": name}
    kind = row_kind(name)
    lever = LEVERS.get(kind, {})
    base = lever.get("base", kind)
    os.environ.update(lever.get("env", {}))
    if lever:
        report["lever"] = {k: lever.get(k) for k in ("base", "env", "overrides", "sdpa_backends", "plan_constants",
                                                      "gpu_memory_gib")
                           if lever.get(k)}
    from training_hub import plan as plan_module  # light: no torch

    constants = {**BASE_PLAN_CONSTANTS.get(base, {}), **lever.get("plan_constants", {})}
    for constant, value in constants.items():  # a lever on one of plan.py's rules
        setattr(plan_module, constant, value)
    if row_backend(base, bench, lever.get("overrides", {})) == "unsloth":
        from training_hub.models.unsloth import import_unsloth

        reason = import_unsloth()  # before transformers, so that Unsloth's patches apply in full
        if reason is not None:
            report["error"] = f"Unsloth could not be imported: {reason}"
            return report
    import torch

    from training_hub.training import sdpa_backends

    cuda = torch.cuda.is_available()
    if cuda and lever.get("gpu_memory_gib"):
        cap_gpu_memory(lever["gpu_memory_gib"])
    timer = None
    try:
        profile_path = Path(bench["out"]) / "logs" / f"{name}.profile.txt" if bench.get("profile") else None
        timer = make_timer(cuda, profile_path, bench["warmup"])
        with sdpa_backends(lever.get("sdpa_backends")):
            if base == "c":
                report.update(public_hub_row(bench, timer, cuda, run_name=name))
            else:
                report.update(lora_sft_row(base, bench, timer, lever.get("overrides"), run_name=name))
        measured = measure(timer, bench["warmup"])
        report.update(measured)
    except Exception as exc:  # an OOM or a failure is reported in the table; the other rows still run
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    if cuda:
        report["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if timer is not None:
            report["load_peak_alloc_gib"] = timer.load_peak[0] / 2**30
    else:
        report["peak_alloc_gib"] = report["peak_reserved_gib"] = None
    report["unsloth_in_process"] = "unsloth" in sys.modules
    report["xformers_in_process"] = sys.modules.get("xformers") is not None
    if base == "c" and "plan" in report:  # Unsloth picks the kernel: xformers when importable, else SDPA
        report["plan"]["notes"] = [f"attention: {'xformers' if report['xformers_in_process'] else 'SDPA'}"]
    return report


# --------------------------------------------------------------------------------------------------------
# Orchestration (parent process: never imports torch, unsloth or transformers)
# --------------------------------------------------------------------------------------------------------

def run_child(args: list[str], log_path: Path, mark: str, timeout: float | None,
              script: Path | None = None) -> tuple[dict | None, str]:
    """Run `script` (default: this file) with `args` in a fresh Python, its output to `log_path`; returns the JSON
    printed after `mark` (None when it printed none: then the reason and the log's last lines)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    pythonpath = env.get("PYTHONPATH", "")
    if str(REPO) not in pythonpath.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(REPO)) if p)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(script or Path(__file__).resolve()), *args], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log_path.read_text(errors="replace")
    found = [line[len(mark):] for line in text.splitlines() if line.startswith(mark)]
    if found:
        return json.loads(found[-1]), text
    why = f"timed out after {timeout:.0f} s" if code is None else f"process exited with code {code}"
    tail = [line for line in text.splitlines() if line.strip()][-3:]
    return None, f"{why}: {' | '.join(tail)[-400:]}"


def add_derived(rows: list[dict], prep: dict) -> None:
    mean_doc = prep["data"]["mean_row_tokens"]
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        tps = row.get("tokens_per_s")
        if not tps or row.get("error"):
            continue
        fpt = ModelShape(**prep["shape"]).flops_per_token(mean_doc / 2, recomputes(row.get("plan", {})))
        row["flops_per_token"] = fpt
        row["mfu"] = tps * fpt / (prep["peak_tflops"] * 1e12)
        for ref in ("b", "c"):
            other = by_name.get(ref, {}).get("tokens_per_s")
            if other and not by_name[ref].get("error"):
                row[f"vs_{ref}"] = tps / other


def check_goals(bench: dict, rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows if not r.get("error")}
    a = by_name.get("a", {})
    goals = []
    for text, kind, target in GOAL_TEXT.get((bench["shape"], bench["mode"]), []):
        value = {"a_min": a.get("tokens_per_s"), "a_vs_c": a.get("vs_c"), "a_vs_b": a.get("vs_b"),
                 "lowmem_max_gib": by_name.get("lowmem", {}).get("peak_alloc_gib")}[kind]
        ok = None if value is None else (value <= target if kind.endswith("max_gib") else value >= target)
        goals.append({"goal": text, "value": value, "met": ok})
    if "a" in by_name and "c" in by_name:
        goals.append({"goal": "(a) not slower than (c)", "value": a.get("vs_c"),
                      "met": None if a.get("vs_c") is None else a["vs_c"] >= 1.0})
    return goals


def plan_text(plan: dict) -> str:
    if not plan:
        return ""
    ckpt = plan.get("gradient_checkpointing")
    parts = [f"{plan.get('backend')}", f"mb {plan.get('micro_batch_size')} x ga {plan.get('gradient_accumulation_steps')}",
             f"ckpt {ckpt}", "packed" if plan.get("sample_packing") else "unpacked", str(plan.get("optim")),
             str(plan.get("dtype"))]
    attention = next((n for n in plan.get("notes") or [] if n.startswith("attention:")), None)
    if attention:
        parts.append("xformers" if attention.startswith("attention: xformers") else
                     "FlashAttention 2" if "FlashAttention 2" in attention else
                     f"FlexAttention, rows of {plan.get('packed_length')}" if "FlexAttention" in attention else
                     "SDPA flash/efficient" if "flash / memory-efficient" in attention else "SDPA")
    if plan.get("liger_kernel"):
        parts.append("Liger")
    return ", ".join(parts)


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render(bench: dict, prep: dict | None, rows: list[dict], goals: list[dict], vers: dict) -> str:
    lines = [f"# Throughput: {bench['shape']}, {bench['mode']}", ""]
    if prep:
        lines += [f"- date: {bench['date']}", f"- device: {prep['gpu_name']} (x{prep['gpu_count']} visible, one used)",
                  f"- bf16 matmul peak measured: {prep['peak_tflops']:.1f} TFLOP/s ({prep['matmul']})"]
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
              f"- seq {bench['seq']}, {bench['batch']} sequences per optimizer step, {bench['warmup']} warm-up + "
              f"{bench['steps']} measured steps, LoRA r={LORA_R} alpha={LORA_ALPHA} on {len(PROJECTIONS)} projections, "
              f"lr {LEARNING_RATE}" + (", base in 4-bit (every row)" if bench["mode"] == "qlora" else "")]
    if prep:
        d = prep["data"]
        lines.append(f"- data: {d['rows']} pre-tokenized rows of {d['row_tokens'][0]}-{d['row_tokens'][1]} tokens "
                     f"(mean {d['mean_row_tokens']:.0f}), {d['tokens']:,} tokens, ~30% of each masked")
        n = ModelShape(**prep["shape"]).matmul_parameters
        lines.append(f"- MFU: FLOPs/token = k*N + k*2*layers*ctx*hidden, N = {n:,} "
                     f"(non-embedding + LM head), ctx = mean document / 2, k = 4 (6 with checkpointing)")
    lines += ["", "| row | tokens/s | peak GiB (alloc / reserved) | MFU | vs (c) | vs (b) | plan |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        title = ROW_TITLES.get(row_kind(row["name"]), row["name"]) + (" (run " + row["name"].split("#")[1] + ")"
                                                                    if "#" in row["name"] else "")
        if row.get("error"):
            peak = fmt(row.get("peak_alloc_gib"), ".1f")
            status = "skipped" if row["error"].startswith("skipped") else "failed"
            lines.append(f"| {title} | {status} | {peak} | - | - | - | {row['error'][:160]} |")
            continue
        peak = f"{fmt(row.get('peak_alloc_gib'), '.2f')} / {fmt(row.get('peak_reserved_gib'), '.2f')}"
        lines.append(f"| {title} | {fmt(row.get('tokens_per_s'), ',.0f')} | {peak} | {fmt(row.get('mfu'), '.1%')} | "
                     f"{fmt(row.get('vs_c'), '.2f', 'x')} | {fmt(row.get('vs_b'), '.2f', 'x')} | "
                     f"{plan_text(row.get('plan', {}))} |")
    if goals:
        lines += ["", "Goals:"]
        for g in goals:
            status = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
            value = "-" if g["value"] is None else f"{g['value']:,.2f}"
            lines.append(f"- {g['goal']}: {value} -> {status}")
    return "\n".join(lines) + "\n"


def write_results(out: Path, bench: dict, prep: dict | None, rows: list[dict], vers: dict) -> str:
    if prep:
        add_derived(rows, prep)
    goals = check_goals(bench, rows)
    text = render(bench, prep, rows, goals, vers)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"bench": bench, "prepare": prep, "versions": vers, "rows": rows,
                                                  "goals": goals}, indent=2, default=str))
    return text


def main_parent(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out
    work.mkdir(parents=True, exist_ok=True)
    shape = "tiny" if args.tiny else args.shape
    seq = args.seq or (128 if args.tiny else 2048)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 5)
    if warmup < 1 or steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the timing starts at the end of the warm-up)")
    default_rows = "a,c,lowmem,b" if args.mode == "qlora" else "a,c,b"  # the slowest row last
    names = [r.strip() for r in (args.rows or default_rows).split(",") if r.strip()]
    unknown = [r for r in names if row_kind(r) not in ROW_TITLES]
    if unknown or ("lowmem" in names and args.mode != "qlora"):
        raise SystemExit(f"--rows: unknown {unknown} (valid: {list(ROW_TITLES)}; lowmem needs --mode qlora)")
    bench = {"shape": shape, "mode": args.mode, "seq": seq, "steps": steps, "warmup": warmup, "batch": args.batch,
             "tiny": args.tiny, "profile": args.profile, "out": str(out), "work": str(work), "model_path": str(work / "model"),
             "data_path": str(work / "data.jsonl"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    from training_hub.manifest import package_versions  # light: no torch

    vers = {k: v for k, v in package_versions().items() if k != "training-hub-lora"}
    start = time.perf_counter()
    print(f"throughput: preparing model {shape} and data in {work} ...", flush=True)
    prep, detail = run_child(["--run-prepare", "--out", str(out)], out / "logs" / "prepare.log", PREPARE_MARK, None)
    if prep is None:
        print(f"throughput: preparation failed ({detail}); see {out / 'logs' / 'prepare.log'}", flush=True)
        return 1
    print(f"throughput: {prep['gpu_name']}, model {'built in ' + format(prep['build_seconds'], '.1f') + ' s' if prep['build_seconds'] else 'reused'}, "
          f"{prep['data']['rows']} rows, matmul peak {prep['peak_tflops']:.1f} TFLOP/s "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)
    rows: list[dict] = []
    for name in names:
        if row_kind(name) == "lowmem" and prep["device"] != "cuda":
            rows.append({"name": name, "error": "skipped: the low-memory QLoRA row needs a GPU"})
            continue
        row_start = time.perf_counter()
        report, detail = run_child(["--run-row", name, "--out", str(out)], out / "logs" / f"{name}.log", ROW_MARK,
                                   args.row_timeout or None)
        report = report or {"name": name, "error": detail}
        report["wall_seconds"] = time.perf_counter() - row_start
        rows.append(report)
        status = report.get("error") or (f"{report.get('tokens_per_s', 0):,.0f} tokens/s, peak "
                                         f"{fmt(report.get('peak_alloc_gib'), '.2f')} GiB")
        print(f"throughput: row {name}: {status} [{report['wall_seconds']:.0f} s; log {out / 'logs' / (name + '.log')}]",
              flush=True)
        write_results(out, bench, prep, rows, vers)
    text = write_results(out, bench, prep, rows, vers)
    print(f"\n{text}\nthroughput: {out / 'results.md'} and results.json written "
          f"[total {time.perf_counter() - start:.0f} s]", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--rows", help="comma-separated rows: a, b, c, lowmem (qlora only) and the lever rows "
                        f"{', '.join(LEVERS)} (default: a,c,b; a,c,lowmem,b in qlora)")
    parser.add_argument("--steps", type=int, help="measured optimizer steps (default 30; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="warm-up optimizer steps, not timed (default 5; 2 with --tiny)")
    parser.add_argument("--seq", type=int, help="max_seq_len (default 2048; 128 with --tiny)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    parser.add_argument("--out", required=True, help="folder for model, data, logs and results")
    parser.add_argument("--work", help="folder for the model, data and adapters (default: --out); keep the "
                        "multi-GiB model out of a folder whose files are copied back")
    parser.add_argument("--tiny", action="store_true", help="smoke run: hidden-64 model, seq 128, 2+3 steps")
    parser.add_argument("--profile", action="store_true", help=f"profile the last {PROFILED_STEPS} warm-up steps of "
                        "each row with torch.profiler (logs/ROW.profile.txt); the measured steps are not profiled")
    parser.add_argument("--row-timeout", type=float, default=0, help="seconds per row before it is killed (0: none)")
    parser.add_argument("--run-row", help=argparse.SUPPRESS)
    parser.add_argument("--run-prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % 2:
        parser.error("--batch must be even (rows b and c use micro batch 2)")
    if args.run_prepare or args.run_row:
        bench = json.loads((Path(args.out) / "bench.json").read_text())
        if args.run_prepare:
            print(PREPARE_MARK + json.dumps(prepare(bench)), flush=True)
        else:
            print(ROW_MARK + json.dumps(run_row(args.run_row, bench), default=str), flush=True)
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
