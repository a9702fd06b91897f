"""Starting from an existing adapter (lora_adapter=PATH): its shape is used, conflicts are errors, weights carry over."""

import json
from pathlib import Path

import pytest

from jobs import losses, run_job
from training_hub import ConfigError, LoraSFTConfig
from training_hub.models.adapters import with_adapter_settings



def fake_adapter(folder: Path, **overrides) -> Path:
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"],
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, **overrides}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def config(tmp_path, **kwargs) -> LoraSFTConfig:
    return LoraSFTConfig(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path / "out"), **kwargs)


def test_the_adapters_shape_is_used(tmp_path):
    adapter = fake_adapter(tmp_path / "a")
    resolved = with_adapter_settings(config(tmp_path, lora_adapter=str(adapter)))
    assert (resolved.lora_r, resolved.lora_alpha, resolved.lora_dropout) == (4, 8, 0.05)
    assert resolved.target_modules == ["q_proj", "v_proj"]
    same = with_adapter_settings(config(tmp_path, lora_adapter=str(adapter), lora_r=4, target_modules=["q_proj", "v_proj"]))
    assert (same.lora_r, same.lora_alpha, same.lora_dropout) == (4, 8, 0.05)  # agreeing values; the rest from it


def test_conflicting_values_are_errors(tmp_path):
    adapter = fake_adapter(tmp_path / "a")
    with pytest.raises(ConfigError) as info:
        with_adapter_settings(config(tmp_path, lora_adapter=str(adapter), lora_r=8, target_modules=["o_proj"]))
    assert len(info.value.problems) == 2 and "lora_r=8 but the adapter" in str(info.value)


def test_not_an_adapter(tmp_path):
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        with_adapter_settings(config(tmp_path, lora_adapter=str(tmp_path)))
    prefix = fake_adapter(tmp_path / "p", peft_type="PREFIX_TUNING")
    with pytest.raises(ConfigError, match="only LoRA"):
        with_adapter_settings(config(tmp_path, lora_adapter=str(prefix)))


def first_loss(out: Path) -> float:
    return losses(out)[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["peft", "unsloth"])
def test_training_continues_from_the_adapters_weights(backend, tiny_model_factory, greeting_jsonl, tmp_path):
    from safetensors.torch import load_file

    base = tiny_model_factory("qwen2", "chatml")
    common = dict(model_path=str(base), data_path=str(greeting_jsonl), save_steps=1000, data_output_dir="none", warmup_steps=0)
    first, second = tmp_path / "first", tmp_path / "second"
    run_job(**common, ckpt_output_dir=str(first), backend="peft", lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        max_steps=20, learning_rate=1e-2)
    # one step with a negligible learning rate: the saved adapter must be the one we started from
    run_job(**common, ckpt_output_dir=str(second), backend=backend, lora_adapter=str(first), max_steps=1, learning_rate=1e-12)
    adapter = json.loads((second / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    before, after = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all((before[k] - after[k]).abs().max() < 1e-6 for k in before)
    assert first_loss(second) < 0.8 * first_loss(first)  # the loaded weights are in the forward pass
