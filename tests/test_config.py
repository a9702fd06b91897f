"""Parameter validation: every problem named, before anything heavy is imported or written."""

import dataclasses
import inspect
import time

import pytest

from training_hub import ConfigError, LoraSFTConfig, lora_sft
from training_hub.config import NOT_SUPPORTED_YET, PARAMETER_NAMES
from training_hub.environment import environment_problems

REQUIRED = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="out")


def test_signature_and_config_agree():
    """lora_sft's signature and LoraSFTConfig hold the same names and defaults (one source of truth)."""
    params = inspect.signature(inspect.unwrap(lora_sft)).parameters
    assert list(params) == list(PARAMETER_NAMES)
    for f in dataclasses.fields(LoraSFTConfig):
        default = params[f.name].default
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert default == expected, f.name


def test_reference_defaults():
    c = LoraSFTConfig(**REQUIRED)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.num_epochs, c.learning_rate, c.max_seq_len) == (16, 32, 0.0, 3, 2e-4, 2048)
    assert (c.lr_scheduler, c.warmup_steps, c.weight_decay, c.max_grad_norm, c.save_steps, c.save_total_limit) == (
        "linear", 10, 0.01, 0.3, 500, 3)
    assert c.trust_remote_code is False


def test_unknown_keyword_suggests_closest(tmp_path):
    start = time.perf_counter()
    with pytest.raises(TypeError, match="'lora_rank'.*Did you mean 'lora_r'"):
        lora_sft("m", "d.jsonl", str(tmp_path / "out"), lora_rank=8)
    with pytest.raises(TypeError, match="'num_train_epochs'.*Did you mean 'num_epochs'"):
        lora_sft("m", "d.jsonl", str(tmp_path / "out"), num_train_epochs=1)
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lora_r=0), "lora_r=0: must be a number > 0"),
        (dict(lora_r="8"), "lora_r='8': expected int"),
        (dict(lora_r=True), "lora_r=True: expected int"),
        (dict(learning_rate=-1.0), "learning_rate=-1.0"),
        (dict(lora_dropout=1.5), "lora_dropout=1.5: must be in [0, 1)"),
        (dict(optim="sgdx"), "optim='sgdx': expected 'adamw_torch'"),
        (dict(lr_scheduler="cosinus"), "lr_scheduler='cosinus'"),
        (dict(dataset_type="chat"), "dataset_type='chat'"),
        (dict(bf16=True, fp16=True), "bf16 and fp16 are both True"),
        (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit are both True"),
        (dict(micro_batch_size="big"), "micro_batch_size='big'"),
        (dict(target_modules=[]), "target_modules=[]"),
        (dict(nproc_per_node=0), "nproc_per_node=0: give a number of processes >= 1"),
        (dict(nnodes=2), "nnodes=2: the nodes need a meeting point"),
        (dict(bnb_4bit_quant_type="fp4"), "set without load_in_4bit=True"),
        (dict(callbacks=[object()]), "expected a transformers.TrainerCallback"),
        (dict(eval_steps=5), "evaluation needs eval_data_path"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(eval_split=1.5), "eval_split=1.5"),
        (dict(eval_split=0.1, eval_data_path="e.jsonl"), "not both"),
    ],
)
def test_bad_values_are_named(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        LoraSFTConfig(**REQUIRED, **kwargs)
    assert fragment in str(info.value)


def test_config_validation_is_pure(tmp_path, monkeypatch):
    """A config reads no files and no environment, so a saved one re-validates anywhere; those checks come with
    the environment's, before anything is read or written."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # as under torchrun --nproc-per-node 1
    config = LoraSFTConfig(model_path=str(tmp_path / "nope"), data_path="d.jsonl", ckpt_output_dir="out", nproc_per_node=4)
    problems = environment_problems(config)
    assert "model_path=" in problems[0] and "no such folder" in problems[0]
    assert "started by a launcher (torchrun) with 1 process(es) per node" in problems[1]
    with pytest.raises(ConfigError, match="no such folder"):
        lora_sft(str(tmp_path / "nope"), "d.jsonl", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        LoraSFTConfig(**REQUIRED, lora_r=0, num_epochs=0, max_grad_norm=-1.0)
    assert len(info.value.problems) == 3


@pytest.mark.parametrize("name", sorted(NOT_SUPPORTED_YET))
def test_features_not_built_yet_are_refused_not_ignored(name):
    value = {"lora_adapter": "a", "loftq_config": {}, "resume_from_checkpoint": True, "save_merged": True,
             "enable_model_splitting": True, "checkpoint_at_epoch": True, "accelerate_full_state_at_epoch": True,
             "eval_data_path": "e.jsonl", "eval_steps": 5, "save_samples": 3, "max_tokens_per_gpu": 1000,
             "master_port": 29500, "nnodes": 2, "node_rank": 1}.get(name, "x")
    with pytest.raises(ConfigError, match=f"{name}=.*not supported yet"):
        LoraSFTConfig(**REQUIRED, **{name: value})


def test_existing_run_is_not_overwritten(tmp_path, greeting_jsonl):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"earlier work")
    with pytest.raises(ConfigError, match="already holds a run.*overwrite_output_dir=True"):
        lora_sft("m", str(greeting_jsonl), str(out))
    assert (out / "adapter_model.safetensors").read_bytes() == b"earlier work"
