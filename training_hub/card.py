"""README.md in the output folder: a model card that says what was trained, on what, how, with what result, and
how to load it — in place of the blank template PEFT's `save_pretrained` writes.

Everything comes from the folder itself (run_config.json, training_metrics.jsonl), so the card can be rewritten
at any time: `write_model_card(ckpt_output_dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_atomic
from .outputs import MANIFEST_FILE, METRICS_FILE, MODEL_CARD



def write_model_card(output_dir: str | Path) -> Path:
    """Write output_dir/README.md from the run's manifest and metrics. Returns its path."""

    out = Path(output_dir)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    path = out / MODEL_CARD
    write_atomic(path, model_card(manifest, out))
    return path


def _table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _what(config: dict[str, Any], data: dict[str, Any], model: dict[str, Any]) -> list[tuple[str, str]]:
    variant = " ".join(v for v, on in (("rsLoRA", config.get("use_rslora")), ("DoRA", config.get("use_dora"))) if on)
    share = 100 * model["trainable_parameters"] / max(1, model["total_parameters"])
    quant = ("4-bit " + config["bnb_4bit_quant_type"] + (", double quantization" if config["bnb_4bit_use_double_quant"] else "")
             if config["load_in_4bit"] else "8-bit" if config["load_in_8bit"] else "not quantized")
    supervised = 100 * data["supervised_tokens_total"] / max(1, data["tokens_total"])
    rows = [
        ("base model", f"`{config['model_path']}`"),
        ("adapter", f"LoRA r {config['lora_r']}, alpha {config['lora_alpha']}, dropout {config['lora_dropout']}"
                    f"{' (' + variant + ')' if variant else ''} on {', '.join(f'`{m}`' for m in model['target_modules'])}"),
        ("trainable parameters", f"{model['trainable_parameters']:,} of {model['total_parameters']:,} ({share:.2f}%)"),
        ("base weights while training", quant),
        ("training data", f"`{config['data_path']}`: {data['rows_out']:,} of {data['rows_in']:,} rows kept (format "
                          f"{data['format']}; {data['template_note']}), {data['tokens_total']:,} tokens, {supervised:.1f}% "
                          f"with loss ({'all tokens' if config['train_on_inputs'] else 'assistant tokens only'})"),
        ("data fingerprint", f"`{data.get('fingerprint')}` (chat template sha256 `{(data.get('chat_template_sha256') or '')[:16]}`)"),
    ]
    if config.get("eval_data_path") or config.get("eval_split"):
        rows.append(("evaluation data", f"`{config['eval_data_path']}`" if config.get("eval_data_path")
                     else f"{config['eval_split']:.0%} of the training rows, held out"))
    return rows


def _phase_one(record: dict[str, Any] | None) -> list[tuple[str, str]]:
    """A two-phase run's first phase: the full fine-tune whose result is this adapter's base."""
    if not record:
        return []
    settings, data = record["settings"], record.get("data") or {}
    losses = (f"; loss {record['first_loss']:.4f} -> {record['last_loss']:.4f}"
              if isinstance(record.get("first_loss"), (int, float)) and isinstance(record.get("last_loss"), (int, float))
              else "")
    return [("phase 1 (before the LoRA)", f"every parameter of `{record['base_model_path']}` trained on "
             f"`{settings.get('data_path')}` ({data.get('tokens_total', 0):,} tokens), {record['steps']} steps at "
             f"learning rate {settings.get('learning_rate'):g}{losses}; saved as a {record['dtype']} model in "
             "`pre_lora/model`, the base model above")]


def _how(config: dict[str, Any], plan: dict[str, Any]) -> list[tuple[str, str]]:
    length = f"{config['max_steps']} steps" if config.get("max_steps") else f"{config['num_epochs']} epochs"
    return [
        ("length", length),
        ("learning rate", f"{config['learning_rate']:g}, {config['lr_scheduler']} schedule, {config['warmup_steps']} warmup steps"),
        ("batch", f"{plan['effective_batch_size']} sequences per step = micro {plan['micro_batch_size']} x accumulation "
                  f"{plan['gradient_accumulation_steps']} x {plan['world_size']} process(es)"),
        ("sequence length", f"{config['max_seq_len']:,} tokens, packing {'on' if plan['sample_packing'] else 'off'}"),
        ("optimizer", f"{plan['optim']}, weight decay {config['weight_decay']}, gradient clipping {config['max_grad_norm']}"),
        ("precision", f"{plan['dtype']} on {plan['device']}, backend {plan['backend']}"),
        ("seed", str(config["seed"])),
    ]


def _results(metrics: dict[str, Any] | None, last: dict[str, float]) -> list[tuple[str, str]]:
    metrics = metrics or {}
    rows = []
    if isinstance(metrics.get("train_loss"), (int, float)):
        rows.append(("train loss (mean over the run)", f"{metrics['train_loss']:.4f}"))
    rows += [(f"last logged {name.replace('_', ' ')}", f"{value:.4f}") for name, value in last.items()]
    if metrics.get("global_step"):
        rows.append(("steps", f"{metrics['global_step']:,}" + (f" ({metrics['num_tokens']:,} tokens)" if metrics.get("num_tokens") else "")))
    if metrics.get("train_runtime"):
        rows.append(("time", f"{metrics['train_runtime']:.0f} s, {metrics.get('tokens_per_second', 0):,.0f} tokens/s"))
    return rows or [("results", "no metrics recorded")]


def model_card(manifest: dict[str, Any], out: Path) -> str:
    """The card's Markdown, from a run_config.json manifest."""
    from .console import last_losses

    config, plan, data, model = manifest["config"], manifest["plan"], manifest["data"], manifest["model"]
    versions = manifest.get("versions", {})
    tags = ["lora", "sft", "training_hub"] + (["qlora"] if config["load_in_4bit"] else [])
    return f"""---
base_model: {json.dumps(config['model_path'])}
library_name: peft
tags: {json.dumps(tags)}
---

# LoRA adapter for `{config['model_path']}`

Fine-tuned with training_hub {versions.get('training-hub') or ''} (`lora_sft`, supervised fine-tuning). The full
configuration, the run plan, the package versions and the hardware are in `run_config.json`; every logged step is
in `training_metrics.jsonl`.

## What was trained

{_table(_what(config, data, model) + _phase_one(manifest.get('pre_lora')))}

## How

{_table(_how(config, plan))}

## Results

{_table(_results(manifest.get('metrics'), last_losses(out / METRICS_FILE)))}

![loss curve](loss.png)

## Use it

```python
import training_hub
model, tokenizer = training_hub.load("{out}")  # the base model named in adapter_config.json, with this adapter
```

or with PEFT alone: `peft.AutoPeftModelForCausalLM.from_pretrained("{out}")`. A merged 16-bit model:
`training_hub.merge_adapter("{config['model_path']}", "{out}", "merged")`.
"""


def write_run_report(output_dir: str | Path) -> None:
    """At the end of a run (rank 0): loss.png and the model card, both drawn from the folder's own files."""
    from .hardware import is_main_process
    from .plot import plot_loss

    if is_main_process():
        plot_loss(output_dir)
        write_model_card(output_dir)
