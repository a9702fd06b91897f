"""End-to-end training on tiny models, each run in its own process (see tests/e2e_job.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs import JOB, losses, metric_rows, train

pytestmark = pytest.mark.slow


def check_adapter(out: Path, base: Path, r: int = 8):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == r and config["peft_type"] == "LORA"
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B weights still zero: nothing trained"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        assert not torch.allclose(model(ids).logits, base_model(ids).logits), "adapter changes nothing"
    return weights


@pytest.mark.parametrize("backend, architecture", [("unsloth", "qwen2"), ("peft", "llama")])
def test_lora_sft_trains_and_writes_a_peft_adapter(backend, architecture, tiny_model_factory, greeting_jsonl, tmp_path):
    base = tiny_model_factory(architecture, "chatml")
    out = tmp_path / "out"
    summary = train(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend=backend,
                    lora_r=8, lora_alpha=16, max_steps=100, learning_rate=5e-3, effective_batch_size=8, logging_steps=10,
                    save_steps=1000, warmup_steps=2)
    assert summary["plan"]["backend"] == backend
    assert summary["unsloth_imported"] == (backend == "unsloth")
    assert summary["plan"]["dtype"] == "float32"
    curve = losses(out)
    assert len(curve) == 10 and curve[-1] < 0.6 * curve[0], curve
    check_adapter(out, base)
    for name in ("tokenizer_config.json", "run_config.json", "training_metrics.jsonl"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "run_config.json").read_text())
    assert manifest["config"]["lora_r"] == 8 and manifest["versions"]["transformers"]
    assert len(manifest["data"]["fingerprint"]) >= 16 and len(manifest["data"]["chat_template_sha256"]) == 64
    assert summary["metrics"]["tokens_per_second"] > 0 and summary["metrics"]["num_tokens"] > 0
    assert not (out / ".final-adapter.tmp").exists()


def test_trainable_parameters_match_the_lora_formula(tiny_model_factory, greeting_jsonl, tmp_path):
    """r x (in + out) summed over every adapted projection, as reported in run_config.json."""
    from transformers import AutoConfig

    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    train(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft", lora_r=4,
          max_steps=1, save_steps=1000)
    c = AutoConfig.from_pretrained(base)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h))
    manifest = json.loads((out / "run_config.json").read_text())
    assert manifest["model"]["trainable_parameters"] == c.num_hidden_layers * per_layer


def test_peft_backend_packs_on_the_cpu_when_asked(tiny_model_factory, greeting_jsonl, tmp_path):
    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    summary = train(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft",
                    sample_packing=True, max_seq_len=128, max_steps=10, learning_rate=3e-3, logging_steps=1,
                    save_steps=1000, warmup_steps=0)
    assert summary["plan"]["sample_packing"] is True
    curve = losses(out)
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("backend", ["unsloth", "peft"])
def test_torchrun_two_processes(backend, tiny_model_factory, greeting_jsonl, tmp_path):
    """`torchrun --nproc-per-node 2 script.py` trains data-parallel (gloo on the CPU); rank 0 alone writes."""
    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    args = dict(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend=backend,
                max_steps=6, effective_batch_size=8, save_steps=1000, logging_steps=2, learning_rate=3e-3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(JOB), json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["plan"]["world_size"] == 2 and summary["plan"]["micro_batch_size"] == 4
    rows = metric_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6], "metrics written by more than one rank"
    assert sum("train_loss" in r for r in rows) == 1
    check_adapter(out, base, r=16)


def test_quickstart_command(tmp_path):
    """The README's main job, shortened: trains offline, prints the loss and a generation, writes an adapter."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "training_hub.cli", "quickstart", "--output-dir", str(out),
                           "--max-steps", "40"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training_hub: step  3/40 | loss " in proc.stderr and "done:\n  time" in proc.stderr
    assert "assistant (trained adapter):" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    curve = losses(out / "adapter")
    assert curve[-1] < curve[0]
