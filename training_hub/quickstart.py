"""`training-hub quickstart`: a whole fine-tune offline, on the CPU, in about a minute.

With no `--model`, it builds a tiny Qwen2-architecture model and a tokenizer with a ChatML template
(nothing is downloaded), trains a LoRA adapter on the bundled "opposites" dataset, shows the loss
falling, and generates with the trained adapter. With `--model` it fine-tunes that model instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

QUESTION = "What is the opposite of hot?"


def bundled_dataset() -> Path:
    return Path(str(resources.files("training_hub") / "resources" / "quickstart.jsonl"))


def build_default_model(folder: Path) -> Path:
    """A Qwen2-architecture model (hidden 256, 2 layers) with a tokenizer trained on the bundled data."""
    from .tiny import save_tiny_model

    corpus = [line for line in bundled_dataset().read_text().splitlines()]
    return save_tiny_model(folder, architecture="qwen2", template="chatml", corpus=corpus, hidden_size=256)


def generate(output_dir: Path, question: str) -> str:
    import torch

    from .api import load

    model, tokenizer = load(output_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_quickstart(model: str | None = None, output_dir: str = "quickstart-output", max_steps: int = 600,
                   backend: str = "auto") -> int:
    """Train on the bundled data (the run logs its progress and summaries) and print a generation. Returns an exit code."""
    from .api import lora_sft
    from .config import ConfigError
    from .console import quiet_third_party
    from .logs import enable_default_output

    if max_steps < 1:  # before the tiny model is written
        raise ConfigError([f"max_steps={max_steps}: the quickstart trains at least one step (default 600)"])
    enable_default_output()  # before Unsloth's import configures the root logger (logging.basicConfig at WARNING)
    out = Path(output_dir)
    if backend != "peft":
        from .models.unsloth import import_unsloth

        with quiet_third_party():
            import_unsloth()  # before the tiny-model builder imports transformers, so Unsloth's patches apply
    model_path = model or str(build_default_model(out / "base-model"))
    print(f"quickstart: model {model_path}, data {bundled_dataset()}, output {out / 'adapter'}")
    result = lora_sft(
        model_path=model_path, data_path=str(bundled_dataset()), ckpt_output_dir=str(out / "adapter"),
        backend=backend, max_steps=max_steps, learning_rate=2e-3 if model is None else 2e-4, lora_r=16,
        lora_alpha=32, effective_batch_size=8, warmup_steps=10, max_seq_len=256,
        logging_steps=max(1, max_steps // 12),  # a dozen progress lines: the console fits on one screen
        save_steps=max_steps, overwrite_output_dir=True,  # a demo folder: rerunning replaces it
    )
    # The loss curve, the throughput and the adapter's place were logged by the run (its end summary, loss.png).
    answer = generate(result.adapter_path, QUESTION)
    print(f"\nuser: {QUESTION}\nassistant (trained adapter): {answer}\n(a question from the training data: the tiny model learns it, it does not generalise)")
    return 0
