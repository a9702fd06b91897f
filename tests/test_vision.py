"""Vision-language LoRA end to end on a tiny LLaVA: one short run (loss falls, the adapter and processor load, the
merged model loads), and the early refusals that write nothing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from jobs import losses, train
from sample_data import color_conversations, write_jsonl
from training_hub import lora_sft
from training_hub.config import ConfigError
from training_hub.data import DataError


@pytest.fixture(scope="module")
def vision_run(tiny_vision_model, color_images, tmp_path_factory):
    """8 steps of LoRA on both towers (finetune_vision_layers=True), merged at the end."""
    tmp = tmp_path_factory.mktemp("vision-run")
    data = write_jsonl(tmp / "colors.jsonl", color_conversations(color_images))
    out = tmp / "out"
    summary = train(model_path=str(tiny_vision_model), data_path=str(data), ckpt_output_dir=str(out), backend="auto",
                    finetune_vision_layers=True, max_steps=8, effective_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_merged=True)
    return dict(out=out, summary=summary)


def test_a_vision_run_trains_on_the_peft_backend_without_packing(vision_run):
    plan, data = vision_run["summary"]["plan"], vision_run["summary"]["data_summary"]
    assert plan["backend"] == "peft" and plan["sample_packing"] is False
    assert plan["micro_batch_size"] * plan["gradient_accumulation_steps"] == 4
    assert any("no sample packing" in note for note in plan["notes"])
    assert data["rows_out"] == 24 and "24 images" in data["template_note"]
    assert not vision_run["summary"]["unsloth_imported"]
    curve = losses(vision_run["out"])
    assert len(curve) == 8 and sum(curve[-2:]) / 2 < 0.7 * sum(curve[:2]) / 2, curve


def test_the_adapter_covers_both_towers_and_loads_with_the_processor(vision_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    import training_hub

    out = vision_run["out"]
    assert AutoProcessor.from_pretrained(out).image_token_id is not None
    model, processor = training_hub.load(out)
    assert isinstance(model, PeftModel) and isinstance(processor, LlavaProcessor)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert any(".vision_tower." in name for name in adapted) and any(".language_model." in name for name in adapted)
    assert not any("multi_modal_projector" in name or "lm_head" in name for name in adapted)
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if ".vision_tower." in name and "lora_B" in name)
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.dtype == torch.bfloat16 and (out / "merged" / "processor_config.json").is_file()


def test_language_only_targets_leave_the_vision_encoder_alone():
    from training_hub.models.vision import vision_targets
    from training_hub.tiny import build_vision_model, build_vision_processor

    model = build_vision_model(build_vision_processor())
    names = [name for name, module in model.named_modules() if type(module).__name__ == "Linear"]
    language = [n for n in names if re.fullmatch(vision_targets(model, language=True, vision=False), n)]
    vision = [n for n in names if re.fullmatch(vision_targets(model, language=False, vision=True), n)]
    assert len(language) == 2 * 7 and all(".language_model.layers." in n for n in language)
    assert len(vision) == 2 * 6 and all(".vision_tower.encoder.layers." in n for n in vision)


def test_qwen2_vl_targets_are_the_linears_of_its_blocks_not_the_patch_embedding():
    # Qwen2-VL's vision tower is `visual`; its patch embedding is a Conv3d named `proj`, like the blocks' attn.proj.
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from training_hub.models.vision import is_vision_language, vision_targets

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]})
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2,
                                                                 hidden_size=32), image_token_id=60, video_token_id=61,
                           vision_start_token_id=62, vision_end_token_id=63)
    model = AutoModelForImageTextToText.from_config(config)
    assert is_vision_language(config.to_dict())
    matched = {n: type(m).__name__ for n, m in model.named_modules()
               if re.fullmatch(vision_targets(model, language=True, vision=True), n)}
    assert set(matched.values()) == {"Linear"}, matched
    assert sorted({n.split(".", 4)[-1] for n in matched if ".visual." in n}) == ["attn.proj", "attn.qkv", "mlp.fc1",
                                                                                  "mlp.fc2"]
    assert sum(".visual.blocks." in n for n in matched) == 2 * 4
    assert sum(".language_model.layers." in n for n in matched) == 2 * 7 and len(matched) == 2 * 4 + 2 * 7


def test_a_vision_plan_keeps_liger_off_and_says_so():
    from dataclasses import replace

    from training_hub.config import LoraSFTConfig
    from training_hub.hardware import Hardware
    from training_hub.models.vision import plan_config, vision_plan
    from training_hub.plan import ModelShape, make_plan

    h200 = Hardware(device="cuda", gpu_name="NVIDIA H200", gpu_count=1, bf16_supported=True, total_memory_gib=139.8,
                    free_memory_gib=139.3, flex_attention_usable=True, liger_kernel_installed=True)
    shape = ModelShape(hidden_size=1536, intermediate_size=8960, num_layers=28, vocab_size=151936,
                       num_parameters=1_500_000_000, tied_embeddings=True)
    config = plan_config(LoraSFTConfig(model_path="m", data_path="d", ckpt_output_dir="o", effective_batch_size=8))
    text_plan = make_plan(config, h200, "peft", shape)
    assert text_plan.liger_kernel and text_plan.attn_implementation == "sdpa"  # unpacked: no FlexAttention
    plan = vision_plan(text_plan)
    assert not plan.liger_kernel and not any(n.startswith("Liger kernels for") for n in plan.notes)
    assert "Liger kernels not applied to a vision-language model" in " ".join(plan.notes)
    assert any("no sample packing" in n for n in plan.notes) and not plan.sample_packing
    assert vision_plan(replace(text_plan, liger_kernel=False, notes=[])).notes[0].startswith("backend peft")


def test_detection_reads_config_json_and_imports_transformers_only_for_a_vision_config(tiny_vision_model,
                                                                                       tiny_model_factory):
    # Unsloth must be imported before transformers: a text model's detection must not import it.
    code = ("import sys; from training_hub.models.vision import detect; "
            "print(detect(sys.argv[1]), 'transformers' in sys.modules, detect(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model_factory("qwen2", "chatml")),
                           str(tiny_vision_model)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "False", "True"], proc.stderr[-2000:]


def call(tmp_path, model_path, data, **kwargs):
    out = tmp_path / "out"
    lora_sft(model_path=str(model_path), data_path=str(data), ckpt_output_dir=str(out), backend="peft", **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(finetune_vision_layers=True), ConfigError,
     r"finetune_vision_layers=True: .* is a text-only model \(its config is not an image-text-to-text architecture\)"),
    (dict(finetune_vision_layers=True, finetune_language_layers=False), ConfigError,
     r"finetune_vision_layers=True: .*\n  - finetune_language_layers=False: .* is a text-only model"),
])
def test_a_text_model_refuses_the_vision_parameters_and_writes_nothing(tmp_path, tiny_model_factory, greeting_jsonl,
                                                                        kwargs, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path, tiny_model_factory("qwen2", "chatml"), greeting_jsonl, **kwargs)
    assert not (tmp_path / "out").exists()


def test_vision_refusals_come_before_loading_and_write_nothing(tmp_path, tiny_vision_model, color_images):
    rows = color_conversations(color_images, n=3)
    rows[2]["messages"][0]["content"][0]["image"] = str(tmp_path / "gone.png")
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    good = write_jsonl(tmp_path / "good.jsonl", rows[:2])
    with pytest.raises(DataError, match=r"bad.jsonl:3: messages\[0\].content\[0\]: the image file '.*gone.png' does "
                                        "not exist"):
        call(tmp_path, tiny_vision_model, bad)
    with pytest.raises(ConfigError, match="backend='unsloth' with a vision-language model: .* is not built yet"):
        lora_sft(model_path=str(tiny_vision_model), data_path=str(good), ckpt_output_dir=str(tmp_path / "out"),
                 backend="unsloth")
    with pytest.raises(ConfigError, match="sample_packing=True with a vision-language model"):
        call(tmp_path, tiny_vision_model, good, sample_packing=True)
    with pytest.raises(ConfigError, match="pre_lora_data_path with a vision-language model"):
        call(tmp_path, tiny_vision_model, good, pre_lora_data_path=str(good), pre_lora_max_steps=1)
    with pytest.raises(ConfigError, match="finetune_vision_layers=False and finetune_language_layers=False"):
        call(tmp_path, tiny_vision_model, good, finetune_language_layers=False)
    with pytest.raises(ConfigError, match="target_modules and finetune_vision_layers are both given"):
        call(tmp_path, tiny_vision_model, good, finetune_vision_layers=True, target_modules=["q_proj"])
    assert not (tmp_path / "out").exists()
