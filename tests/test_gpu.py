"""End-to-end training on a GPU: Unsloth LoRA, Unsloth QLoRA, plain PEFT LoRA, and FSDP2 model splitting.

The base is a random-init model of Qwen2.5-0.5B's shape (bf16, built on the GPU) with the tiny ChatML
tokenizer; the data are conftest's greeting conversations. Each training run is its own process
(tests/e2e_job.py): Unsloth patches the whole process it is imported in. Each test prints one JSON line
with its figures, so run with -s to record them:

    python -m pytest tests/test_gpu.py -m gpu -s -q

Skipped without a CUDA GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sample_data import greeting_conversations, write_jsonl
from jobs import losses, train, train_under_torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 20
# Qwen2.5-0.5B's shape; the weights are random, throughput and memory do not depend on their values.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6)
SHAPE = QWEN25_05B


def build_base(out: Path, tokenizer, shape: dict | None = None, device: str | None = None) -> Path:
    """Random-init bf16 Qwen2 of `shape`, built directly on `device`, saved with `tokenizer`."""
    from transformers import Qwen2Config

    from training_hub.tiny import save_random_model

    shape = shape or SHAPE
    # As in training_hub.tiny: 1/sqrt(hidden) instead of 0.02, so that what the LoRA learns shows in the loss.
    config = Qwen2Config(**shape, initializer_range=shape["hidden_size"] ** -0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_random_model(config, tokenizer, out, device=device or DEVICE)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("qwen2.5-0.5b-shape"), tokenizer_factory("chatml"))


@pytest.fixture(scope="module")
def greetings(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("greetings") / "greetings.jsonl", greeting_conversations(64))


def run_training(base: Path, data: Path, out: Path, **kwargs) -> tuple[dict, list[float]]:
    summary = train(model_path=str(base), data_path=str(data), ckpt_output_dir=str(out), lora_r=16, lora_alpha=32,
                    max_steps=STEPS, learning_rate=1e-3, warmup_steps=2, effective_batch_size=8, max_seq_len=256,
                    logging_steps=1, save_steps=1000, **kwargs)
    curve = losses(out)
    assert len(curve) == STEPS, curve
    assert all(math.isfinite(x) for x in curve), curve
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first, f"loss did not fall: {curve}"
    assert summary["metrics"]["global_step"] == STEPS
    return summary, curve


def check_adapter_and_generate(out: Path, base: Path, device: str | None = None) -> str:
    """The adapter is a LoRA of r=16 on the 7 projections, loads with PeftModel onto the bf16 base, changes the
    logits, and generates 8 tokens. Returns the generated text."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or DEVICE
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32, config
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS), config["target_modules"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device})
    model = PeftModel.from_pretrained(model, out)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Greet Alice."}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad():
        adapted = model(**inputs).logits.float()
        with model.disable_adapter():
            plain = model(**inputs).logits.float()
        assert torch.isfinite(adapted).all()
        assert not torch.allclose(adapted, plain), "the adapter changes nothing"
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape[1] == prompt_length + 8, generated.shape
    text = tokenizer.decode(generated[0, prompt_length:])
    del model
    torch.cuda.empty_cache()
    return text


def report(test: str, summary: dict, curve: list[float], generated: str) -> None:
    metrics, plan = summary["metrics"], summary["plan"]
    print("\n" + json.dumps({
        "test": test, "gpu": torch.cuda.get_device_name(),
        "tokens_per_s": metrics.get("tokens_per_second"), "peak_memory_gib": metrics.get("peak_memory_gib"),
        "train_runtime_s": metrics.get("train_runtime"), "steps": metrics.get("global_step"),
        "loss_first": curve[0], "loss_last": curve[-1],
        "plan": {k: plan.get(k) for k in ("backend", "dtype", "micro_batch_size", "gradient_accumulation_steps",
                                          "sample_packing", "gradient_checkpointing", "optim", "attn_implementation",
                                          "packed_length", "liger_kernel")},
        "generated": generated}), flush=True)


def expected_dtype() -> str:
    return "bfloat16" if DEVICE == "cuda" else "float32"


def test_unsloth_lora_trains_loads_and_generates(base_model, greetings, tmp_path):
    out = tmp_path / "unsloth-lora"
    summary, curve = run_training(base_model, greetings, out, backend="unsloth")
    assert summary["plan"]["backend"] == "unsloth" and summary["unsloth_imported"]
    assert summary["plan"]["dtype"] == expected_dtype()
    generated = check_adapter_and_generate(out, base_model)
    report("unsloth_lora", summary, curve, generated)


def test_unsloth_qlora_trains_loads_and_generates(base_model, greetings, tmp_path):
    out = tmp_path / "unsloth-qlora"
    summary, curve = run_training(base_model, greetings, out, backend="unsloth", load_in_4bit=True)
    assert summary["plan"]["backend"] == "unsloth" and summary["unsloth_imported"]
    assert summary["plan"]["dtype"] == expected_dtype()
    manifest = json.loads((out / "run_config.json").read_text())
    assert manifest["config"]["load_in_4bit"] is True and manifest["plan"]["dtype"] == expected_dtype()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    generated = check_adapter_and_generate(out, base_model)
    report("unsloth_qlora", summary, curve, generated)


def test_peft_lora_trains_loads_and_generates(base_model, greetings, tmp_path):
    """On a GPU the peft backend trains packed batches on the FlexAttention route, rows padded to one length."""
    from training_hub.models.attention import FLEX_ATTENTION, static_packed_length

    out = tmp_path / "peft-lora"
    summary, curve = run_training(base_model, greetings, out, backend="peft")
    plan = summary["plan"]
    assert plan["backend"] == "peft" and not summary["unsloth_imported"]
    assert plan["attn_implementation"] == FLEX_ATTENTION, plan["notes"]
    assert plan["packed_length"] == static_packed_length(plan["micro_batch_size"], 256)
    assert summary["plan"]["dtype"] == expected_dtype()
    generated = check_adapter_and_generate(out, base_model)
    report("peft_lora", summary, curve, generated)


def test_unsloth_qlora_merged_model_matches_base_plus_adapter(base_model, greetings, tmp_path):
    """QLoRA on the GPU, then save_merged=True: the merged weights are W16 + (alpha/r) B A in bf16 (merged into the
    16-bit base, not re-quantized), and the merged model's logits equal the 16-bit base with the adapter applied,
    up to the bf16 rounding of the merged weights (both computed in fp32 here)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "unsloth-qlora-merged"
    summary, curve = run_training(base_model, greetings, out, backend="unsloth", load_in_4bit=True, save_merged=True)
    merged_dir = out / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged_w = {k: v for f in merged_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    base_w = {k: v for f in base_model.glob("*.safetensors") for k, v in load_file(f).items()}
    lora = load_file(out / "adapter_model.safetensors")
    name = "model.layers.3.mlp.down_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"].float(), lora[f"base_model.model.{name}.lora_B.weight"].float()
    expected = base_w[f"{name}.weight"].float() + (32 / 16) * b @ a
    weight_gap = (merged_w[f"{name}.weight"].float() - expected).abs().max().item()
    assert merged_w[f"{name}.weight"].dtype == torch.bfloat16 and weight_gap < 1e-2 * expected.abs().max().item()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]], device=DEVICE)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map={"": DEVICE})
        merged_logits = merged(ids).logits
        del merged
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, device_map={"": DEVICE})
        adapted = PeftModel.from_pretrained(base, out)
        adapted_logits = adapted(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
    gap = (merged_logits - adapted_logits).abs().max().item()
    effect = (adapted_logits - base_logits).abs().max().item()
    print("\n" + json.dumps({"test": "unsloth_qlora_merge", "gpu": torch.cuda.get_device_name(),
                             "max_weight_gap": weight_gap, "max_logit_gap_merged_vs_adapter": gap,
                             "max_adapter_effect_on_logits": effect, "max_abs_logit": adapted_logits.abs().max().item(),
                             "loss_first": curve[0], "loss_last": curve[-1]}), flush=True)
    assert effect > 0.05, "the adapter barely changes the logits: the comparison would prove nothing"
    assert gap < 0.25 * effect, (gap, effect)


def test_flex_packed_loss_and_gradients_equal_unpacked(tmp_path, tokenizer_factory):
    """The packed FlexAttention route, compiled, forward and backward in bf16: five documents packed into one row by
    TRL's padding-free collator and padded to the static length give the loss, logits and q_proj gradient of the
    same documents run one by one through SDPA. The heads are 12 query / 2 key-value (Qwen2.5-1.5B's grouping)."""
    from test_attention import load_pair, packed_vs_unpacked, random_documents

    from training_hub.models.attention import static_packed_length

    tokenizer = tokenizer_factory("chatml")
    shape = dict(SHAPE, hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=len(tokenizer))
    flex_model, sdpa_model = load_pair(build_base(tmp_path / "base", tokenizer, shape), DEVICE, torch.bfloat16)
    lengths = [300, 700, 129, 5, 64]
    length = static_packed_length(2, 640)
    assert length == 1280 > sum(lengths)
    result = packed_vs_unpacked(flex_model, sdpa_model, random_documents(len(tokenizer), lengths), tokenizer.pad_token_id,
                                length, backward=True)
    print("\n" + json.dumps({"test": "flex_packed_vs_unpacked", "gpu": torch.cuda.get_device_name(), **result}), flush=True)
    assert abs(result["packed_loss"] - result["unpacked_loss"]) < 1e-2 * result["unpacked_loss"], result
    assert result["max_logit_gap"] < 5e-2 * result["max_abs_logit"], result
    assert result["grad_rel_gap"] < 5e-2, result


FSDP_STEPS, FSDP_RESUMED_STEPS = 10, 14


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_fsdp2_model_splitting_under_torchrun_saves_a_peft_adapter_and_resumes(base_model, greetings, tmp_path,
                                                                               load_in_4bit):
    """enable_model_splitting under `torchrun --nproc-per-node 1`: the FSDP2 route over one process (it saves no
    memory there, but runs the whole sharded path: wrap, train, the adapter gathered and saved, resume). The
    adapter is a normal PEFT adapter of full shapes; a second launch with more steps resumes from the last
    checkpoint and goes on from its loss, not from the start."""
    from safetensors.torch import load_file

    out = tmp_path / ("fsdp2-qlora" if load_in_4bit else "fsdp2-lora")
    settings = dict(model_path=str(base_model), data_path=str(greetings), ckpt_output_dir=str(out), backend="peft",
                    enable_model_splitting=True, load_in_4bit=load_in_4bit, lora_r=16, lora_alpha=32,
                    learning_rate=1e-3, warmup_steps=2, effective_batch_size=8, max_seq_len=256, logging_steps=1,
                    save_steps=5, data_output_dir="none")
    summary = train_under_torchrun(**settings, max_steps=FSDP_STEPS)
    plan = summary["plan"]
    assert plan["model_splitting"] == "fsdp2" and plan["world_size"] == 1 and plan["backend"] == "peft", plan
    assert any("FSDP2" in note for note in plan["notes"]) and plan["optim"] == "adamw_torch", plan["notes"]
    curve = losses(out)
    assert len(curve) == FSDP_STEPS and all(math.isfinite(x) for x in curve), curve
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, f"loss did not fall: {curve}"
    weights = load_file(out / "adapter_model.safetensors")
    q_a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    down_b = weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert tuple(q_a.shape) == (16, SHAPE["hidden_size"]) and tuple(down_b.shape) == (SHAPE["hidden_size"], 16)
    assert len(weights) == 2 * len(PROJECTIONS) * SHAPE["num_hidden_layers"], sorted(weights)[:4]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (out / "checkpoint-10" / "pytorch_model_fsdp.bin").is_file()  # accelerate's resume state
    generated = check_adapter_and_generate(out, base_model)

    resumed = train_under_torchrun(**settings, max_steps=FSDP_RESUMED_STEPS, resume_from_checkpoint=True)
    assert resumed["metrics"]["global_step"] == FSDP_RESUMED_STEPS
    after = losses(out)
    assert len(after) == FSDP_RESUMED_STEPS and after[:FSDP_STEPS] == curve, after
    assert sum(after[FSDP_STEPS:]) / 4 < sum(curve[:3]) / 3, f"the resumed steps start over: {after}"
    report(f"fsdp2_{'qlora' if load_in_4bit else 'lora'}_torchrun_1", summary, curve, generated)
