"""Merged export: merged logits equal base + adapter; QLoRA merges into the 16-bit base; the output is never half-written."""

import json
from pathlib import Path

import pytest
import torch

from jobs import run_job
from training_hub import merge_adapter
from training_hub.export import vllm_warnings



def make_adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A LoRA adapter with random (non-zero) B, saved by PEFT: what merge_adapter must handle from any source."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def logits(model, ids=((5, 6, 7, 8, 9, 10),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


def test_merged_logits_equal_base_plus_adapter(tiny_model_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2", "chatml")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = merge_adapter(str(base), adapter, tmp_path / "merged", dtype="float32")
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin")) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged), logits(reference), atol=1e-5)
    assert not torch.allclose(logits(merged), logits(AutoModelForCausalLM.from_pretrained(base)), atol=1e-3)


def test_merge_refuses_to_overwrite_and_is_safe_to_repeat(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2", "chatml")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = merge_adapter(str(base), adapter, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # 16-bit by default
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_adapter(str(base), adapter, out)
    first = (out / "model.safetensors").read_bytes()
    merge_adapter(str(base), adapter, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == first
    with pytest.raises(ValueError, match="adapter_path=.*no adapter_config.json"):
        merge_adapter(str(base), tmp_path, tmp_path / "other")


def test_vllm_warnings():
    assert vllm_warnings({"use_dora": False, "modules_to_save": None}) == []
    assert "DoRA" in vllm_warnings({"use_dora": True})[0]
    assert "modules_to_save" in vllm_warnings({"modules_to_save": ["lm_head"]})[0]


@pytest.mark.slow
def test_save_merged_after_qlora_training_merges_into_the_16bit_base(tiny_model_factory, greeting_jsonl, tmp_path):
    """QLoRA (bitsandbytes 4-bit on the CPU) -> merged bf16 model whose weights are W16 + scale * B @ A."""
    from safetensors.torch import load_file

    base = tiny_model_factory("llama", "chatml")
    out = tmp_path / "out"
    run_job(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft",
            load_in_4bit=True, lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], max_steps=4,
            learning_rate=1e-2, save_steps=1000, save_merged=True, data_output_dir="none")
    merged_dir = out / "merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = load_file(merged_dir / "model.safetensors")
    original = load_file(base / "model.safetensors")
    lora = load_file(out / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    expected = original[f"{name}.weight"].float() + (8 / 4) * b.float() @ a.float()
    assert merged[f"{name}.weight"].dtype == torch.bfloat16
    assert torch.allclose(merged[f"{name}.weight"].float(), expected, atol=1e-2, rtol=1e-2)  # bf16 rounding
    assert (b.abs().sum() > 0) and not torch.equal(merged[f"{name}.weight"], original[f"{name}.weight"].bfloat16())
    assert (merged_dir / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_save_merged_from_an_unsloth_run(tiny_model_factory, greeting_jsonl, tmp_path):
    """The merge runs in a fresh process (no Unsloth patches); its logits match base + the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    proc = run_job(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="unsloth",
                   lora_r=4, max_steps=4, learning_rate=1e-2, save_steps=1000, save_merged=True, data_output_dir="none")
    assert "merged bfloat16 model in" in proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert torch.allclose(logits(merged), logits(reference), atol=5e-2)  # merged weights are rounded to bf16
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base))
    assert (base_logits - logits(reference)).abs().max() > 0.3  # what training changed is far above the rounding


def test_merge_refuses_outputs_that_are_inside_or_hold_its_inputs_and_writes_nothing(tiny_model_factory, tmp_path):
    from training_hub.config import ConfigError

    base = tiny_model_factory("qwen2", "chatml")
    run = tmp_path / "run"
    adapter = make_adapter(base, run / "checkpoint-2")
    (run / "notes.md").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out, fragment in [(adapter, "is inside adapter_path"), (run, "holds adapter_path"),
                          (adapter / "sub", "is inside adapter_path"), (base / "merged", "is inside base_model_path")]:
        with pytest.raises(ConfigError, match=fragment):
            merge_adapter(str(base), adapter, out, overwrite=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (base / "merged").exists()
    assert (merge_adapter(str(base), adapter, adapter / "merged") / "model.safetensors").exists()  # save_merged's place


def test_merge_refuses_a_base_of_other_shapes_or_another_base_unless_allowed(tiny_model_factory, tmp_path):
    import shutil

    from training_hub.config import ConfigError
    from training_hub.tiny import save_tiny_model

    base = tiny_model_factory("qwen2", "chatml")
    adapter = make_adapter(base, tmp_path / "adapter")
    narrow = save_tiny_model(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(ConfigError, match=r"does not fit Qwen2ForCausalLM \(model.layers.0.mlp.down_proj.in_features "
                                          r"is 64, the adapter's lora_A has 128; .* and 9 more\)"):
        merge_adapter(str(narrow), adapter, tmp_path / "merged", allow_other_base=True)
    twin = shutil.copytree(base, tmp_path / "twin")  # same shapes, another model as far as the adapter knows
    with pytest.raises(ConfigError, match=f"was trained on '{base}', not on base_model_path='{twin}'.*allow_other_base=True"):
        merge_adapter(str(twin), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert (merge_adapter(str(twin), adapter, tmp_path / "merged", allow_other_base=True) / "model.safetensors").exists()
