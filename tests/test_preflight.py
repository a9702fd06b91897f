"""Pre-flight: every problem the run would hit after loading the model is refused before, from the configs and the
files' headers alone. No test here trains; each checks that nothing of the user's was changed or created."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from training_hub import lora_sft
from training_hub.checkpoints import DiskFull, disk_full_errors, mark_complete
from training_hub.config import ConfigError
from training_hub.preflight import checkpoint_file_problems, output_problems

# The tiny models: hidden 64, 2 layers, 4 heads of 16 (q_proj 64 -> 64, v_proj 64 -> 32).
LORA_PREFIX = "base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(tmp_path, model: Path, data: Path, **kwargs) -> str:
    """lora_sft's ConfigError; asserts the run wrote nothing and left the model folder as it was."""
    before = snapshot(model)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as caught:
        lora_sft(str(model), str(data), str(out), backend="peft", max_steps=2, **kwargs)
    assert not out.exists() and snapshot(model) == before
    return str(caught.value)


def copy_model(model: Path, to: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(model, to, ignore=shutil.ignore_patterns(*without))
    return to


def write_adapter(folder: Path, base: str, shapes: dict[str, tuple[int, int]], r: int = 4) -> Path:
    """A LoRA adapter on q_proj/v_proj of both layers whose A/B matrices have the given (in, out) features."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": sorted(shapes),
              "use_rslora": False, "use_dora": False, "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in (0, 1):
        for module, (fan_in, fan_out) in shapes.items():
            tensors[LORA_PREFIX.format(layer=layer, module=module, ab="A")] = torch.zeros(r, fan_in)
            tensors[LORA_PREFIX.format(layer=layer, module=module, ab="B")] = torch.zeros(fan_out, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_target_module_typo_is_refused_with_the_models_projections(tiny_model_factory, greeting_jsonl, tmp_path):
    message = refusal(tmp_path, tiny_model_factory(), greeting_jsonl, target_modules=["q_proj", "v_porj"])
    assert "target_modules=['q_proj', 'v_porj']" in message and "['v_porj'] do not exist" in message
    assert "'v_proj'" in message  # the valid names are listed


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model_factory, greeting_jsonl, tmp_path):
    bare = copy_model(tiny_model_factory(), tmp_path / "bare", without=("tokenizer*", "chat_template*"))
    message = refusal(tmp_path, bare, greeting_jsonl)
    assert f"model_path={str(bare)!r} holds no tokenizer files" in message and "empty tokenizer" in message


def test_a_truncated_base_model_file_is_named_with_the_fix(tiny_model_factory, greeting_jsonl, tmp_path):
    cut = copy_model(tiny_model_factory(), tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    message = refusal(tmp_path, cut, greeting_jsonl)
    assert f"{weights} is damaged" in message and "re-download" in message


def test_an_adapter_of_other_shapes_is_refused_naming_the_module(tiny_model_factory, greeting_jsonl, tmp_path):
    model = tiny_model_factory()
    adapter = write_adapter(tmp_path / "wide", str(model), {"q_proj": (128, 128), "v_proj": (64, 32)})
    before = snapshot(adapter)
    message = refusal(tmp_path, model, greeting_jsonl, lora_adapter=str(adapter))
    assert f"lora_adapter={str(adapter)!r} does not fit Qwen2ForCausalLM" in message
    assert "model.layers.0.self_attn.q_proj.in_features is 64, the adapter's lora_A has 128" in message
    assert snapshot(adapter) == before


def test_an_adapter_of_another_base_with_the_same_shapes_warns_naming_both(tiny_model_factory, greeting_jsonl,
                                                                           tmp_path, caplog):
    model = tiny_model_factory()
    adapter = write_adapter(tmp_path / "other", "someone/other-model", {"q_proj": (64, 64), "v_proj": (64, 32)})
    with caplog.at_level(logging.WARNING, logger="training_hub"):
        lora_sft(str(model), str(greeting_jsonl), str(tmp_path / "out"), backend="peft", lora_adapter=str(adapter),
                 dry_run=True)
    (warning,) = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert "'someone/other-model'" in warning and f"model_path={str(model)!r}" in warning


def test_doubtful_settings_are_warned_about(tiny_model_factory, greeting_jsonl, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training_hub"):
        lora_sft(str(tiny_model_factory()), str(greeting_jsonl), str(tmp_path / "out"), backend="peft", lora_r=128,
                 max_seq_len=8192, warmup_steps=50, max_steps=5, micro_batch_size=64, dry_run=True)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "lora_r=128 is above the model's hidden size 64" in text
    assert "max_seq_len=8192 is above the model's max_position_embeddings=4096" in text
    assert "warmup_steps=50 is longer than the run (about 5 steps)" in text
    assert "the effective batch (64 sequences per step) is larger than the data (48 sequences)" in text


def test_schedulers_that_need_arguments_lora_sft_does_not_take_are_refused_at_once(tmp_path):
    for name in ("cosine_with_min_lr", "warmup_stable_decay"):
        with pytest.raises(ConfigError, match=f"lr_scheduler='{name}': expected 'linear'"):
            lora_sft("m", "d.jsonl", str(tmp_path / "out"), lr_scheduler=name)


def test_max_seq_len_one_is_refused_before_the_model_loads(tiny_model_factory, greeting_jsonl, tmp_path):
    with pytest.raises(ValueError, match="max_seq_len=1"):
        lora_sft(str(tiny_model_factory()), str(greeting_jsonl), str(tmp_path / "out"), backend="peft", max_seq_len=1)
    assert not (tmp_path / "out").exists()


def test_output_folder_must_be_a_writable_folder_with_room(tmp_path):
    assert output_problems(tmp_path / "new" / "out", 1) == []
    (tmp_path / "file").write_text("mine")
    (problem,) = output_problems(tmp_path / "file" / "out", 1)
    assert "is a file, not a folder" in problem and (tmp_path / "file").read_text() == "mine"
    (problem,) = output_problems(tmp_path / "out", 10**18)
    assert f"{tmp_path} has " in problem and "free but the run's checkpoints and adapter need about" in problem
    assert output_problems(Path("/proc/training_hub_out"), 1)[0].startswith("ckpt_output_dir='/proc/training_hub_out': "
                                                                           "cannot write in /proc")


def fake_checkpoint(out: Path, step: int) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.ones(256)}}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text("{}")
    mark_complete(folder, step, {"lora_r": 8}, "data")
    return folder


def test_a_damaged_optimizer_file_in_a_checkpoint_names_it_and_the_older_checkpoint(tmp_path):
    older, newest = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert checkpoint_file_problems(newest) == []
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-300])
    (problem,) = checkpoint_file_problems(newest)
    assert f"{optimizer} is damaged (not a whole torch file" in problem
    assert f"resume_from_checkpoint={str(older)!r}" in problem
    (older / "trainer_state.json").write_text('{"global_step": ')
    assert "trainer_state.json is damaged (not valid JSON" in checkpoint_file_problems(older)[0]


def test_a_full_disk_is_named_with_the_folder_and_the_free_space(tmp_path, monkeypatch):
    with pytest.raises(DiskFull, match=f"No space left on device while writing into {tmp_path}: .* free"):
        with disk_full_errors(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RuntimeError, match="^unexpected pos 69056 vs 68944$"):  # plenty of room: not a full disk
        with disk_full_errors(tmp_path):
            raise RuntimeError("unexpected pos 69056 vs 68944")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(DiskFull, match=r"1.0 MiB free \(RuntimeError: unexpected pos 69056 vs 68944\)"):
        with disk_full_errors(tmp_path / "out"):  # torch.save's way of saying it
            raise RuntimeError("unexpected pos 69056 vs 68944")


def test_real_shaped_random_models_carry_a_vocabulary_of_their_embedding(greeting_jsonl, tmp_path):
    """The GPU tests and benchmarks build random models of real shapes (151,936 embedding rows) with a small trained
    tokenizer: save_random_model pads its vocabulary with unreachable tokens, so the tokenizer check passes and
    encoding is unchanged; the unpadded tokenizer is refused as another model's."""
    from transformers import AutoTokenizer, Qwen2Config

    from training_hub.tiny import build_tokenizer, save_random_model

    tokenizer = build_tokenizer("chatml")
    config = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    model = save_random_model(config, tokenizer, tmp_path / "real-shaped")
    saved = AutoTokenizer.from_pretrained(model)
    chat = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine."}]
    assert len(saved) == 4096 and saved.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    lora_sft(str(model), str(greeting_jsonl), str(tmp_path / "out"), backend="peft", dry_run=True)
    tokenizer.save_pretrained(model)
    assert "has only 404 tokens for the model's 4,096 embedding rows" in refusal(tmp_path, model, greeting_jsonl)
