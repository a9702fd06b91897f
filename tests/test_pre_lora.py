"""Two-phase runs (pre_lora.py): the phase-1 settings, its memory estimate, the metrics of both phases, and one shared
end-to-end run of both phases with a kill in each phase and a resume that equals the uninterrupted run.

Training runs happen in subprocesses (tests/e2e_job.py): Unsloth patches the whole process.
"""

import json
import signal
from pathlib import Path

import pytest

from jobs import metric_rows, run_job
from sample_data import NAMES, greeting_conversations, write_jsonl
from training_hub import checkpoints, load, merge_adapter, plot
from training_hub.config import ConfigError, LoraSFTConfig
from training_hub.hardware import Hardware
from training_hub.outputs import folder_problems
from training_hub.plan import ModelShape, make_plan
from training_hub.pre_lora import (PHASE_ONE_MARKER, bf16_weights_warning, memory_estimate_bytes, memory_problems,
                                   phase_one_config, read_record, run_phase_one)


def config(**kwargs) -> LoraSFTConfig:
    return LoraSFTConfig("model", "data.jsonl", "out", **kwargs)


# ---- settings (no training) ---------------------------------------------------------------------------------

def test_phase_one_settings_need_phase_one_data_and_unsupported_combinations_are_refused_by_name():
    with pytest.raises(ConfigError, match="pre_lora_max_steps, pre_lora_learning_rate set without pre_lora_data_path"):
        config(pre_lora_max_steps=5, pre_lora_learning_rate=1e-4)
    with pytest.raises(ConfigError) as refused:
        config(pre_lora_data_path="text.jsonl", pre_lora_max_steps=0, enable_model_splitting=True, nproc_per_node=2,
               overwrite_output_dir=True, micro_batch_size="auto", wandb_project="p", lora_adapter="adapter",
               resume_from_checkpoint="out/checkpoint-3")
    message = str(refused.value)
    for fragment in ("pre_lora_max_steps=0: must be > 0", "enable_model_splitting=True with pre_lora_data_path",
                     "nproc_per_node=2 with pre_lora_data_path", "overwrite_output_dir=True with pre_lora_data_path",
                     "micro_batch_size='auto' with pre_lora_data_path", "wandb_project='p' with pre_lora_data_path",
                     "lora_adapter='adapter' with pre_lora_data_path", "resume_from_checkpoint='out/checkpoint-3'"):
        assert fragment in message
    assert config(pre_lora_data_path="text.jsonl", nproc_per_node=1, micro_batch_size=2).pre_lora_num_epochs == 1


def test_phase_one_trains_its_own_data_length_and_rate_with_the_lora_settings_at_their_defaults():
    two_phase = config(pre_lora_data_path="text.jsonl", pre_lora_max_steps=7, pre_lora_learning_rate=1e-5,
                       lora_r=4, load_in_4bit=True, dataset_type="messages", eval_split=0.1, save_merged=True,
                       backend="unsloth", max_steps=3, learning_rate=1e-3, seed=5, max_seq_len=64)
    phase_one = phase_one_config(two_phase)
    assert (phase_one.data_path, phase_one.max_steps, phase_one.num_epochs, phase_one.learning_rate) == \
        ("text.jsonl", 7, 1, 1e-5)
    assert (phase_one.lora_r, phase_one.load_in_4bit, phase_one.dataset_type, phase_one.eval_split,
            phase_one.save_merged, phase_one.backend, phase_one.pre_lora_data_path) == (16, False, "auto", None, False,
                                                                                        "peft", None)
    assert (phase_one.seed, phase_one.max_seq_len) == (5, 64)  # shared settings stay


def test_phase_one_memory_is_estimated_and_refused_before_loading_when_the_gpu_cannot_hold_it():
    # Qwen2.5-1.5B's shape: 1.54e9 parameters; bf16 weights and gradients, 8-bit Adam: 6 bytes per parameter.
    shape = ModelShape.from_config(type("C", (), dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                     vocab_size=151936, num_attention_heads=12, num_key_value_heads=2,
                                                     tie_word_embeddings=True))())
    gpu = Hardware(device="cuda", gpu_name="H200", gpu_count=1, bf16_supported=True, total_memory_gib=141,
                   free_memory_gib=140, bitsandbytes_installed=True)
    plan = make_plan(config(pre_lora_data_path="t.jsonl", micro_batch_size=1, gradient_checkpointing=True,
                            max_seq_len=1024), gpu, "peft", shape)
    estimate = memory_estimate_bytes(shape, plan, 1024)
    assert plan.optim == "adamw_8bit" and 6 * shape.num_parameters < estimate < 6 * shape.num_parameters + 2**30
    assert memory_problems(estimate, gpu) == []
    small = Hardware(device="cuda", gpu_name="T4", gpu_count=1, total_memory_gib=16, free_memory_gib=8)
    (problem,) = memory_problems(estimate, small)
    assert f"needs an estimated {estimate / 2**30:.1f} GiB" in problem and "no phase 1 (LoRA alone)" in problem
    assert memory_problems(estimate, Hardware(device="cpu")) == []  # on the CPU it is only reported


def test_phase_one_warns_that_bf16_weights_lose_small_updates_and_fp32_or_fp16_runs_do_not():
    """Measured on the H200: with bf16 weights at lr 2e-5 about a fifth of the elements moved, norms none."""
    warning = bf16_weights_warning("bfloat16", 2e-5)
    assert "no fp32 master copy" in warning and "larger than about 0.01" in warning and "bf16=False" in warning
    assert bf16_weights_warning("float32", 2e-5) is None and bf16_weights_warning("float16", 2e-5) is None


def test_phase_one_loads_the_model_on_the_packed_flex_attention_route_in_a_fresh_process(tiny_model_factory):
    # The plan picks training_hub's FlexAttention kernel for packed batches on a GPU; transformers accepts that
    # attn_implementation only once it is registered, and phase 1 loads the model before anything else could.
    import subprocess
    import sys

    code = ("import dataclasses, sys; from training_hub.config import LoraSFTConfig; "
            "from training_hub.hardware import Hardware; from training_hub.plan import make_plan; "
            "from training_hub.models.attention import FLEX_ATTENTION; from training_hub.pre_lora import load_full_model; "
            "plan = make_plan(LoraSFTConfig('m', 'd', 'o'), Hardware(device='cpu'), 'peft', None); "
            "plan = dataclasses.replace(plan, attn_implementation=FLEX_ATTENTION); "
            "print(load_full_model(sys.argv[1], plan, False).config._attn_implementation)")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model_factory("qwen2", "chatml"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-1:] == ["training_hub_flex"], proc.stderr[-2000:]


def test_a_resumed_phase_two_keeps_phase_one_rows_and_the_plot_draws_the_phases_one_after_the_other(tmp_path):
    path = tmp_path / "training_metrics.jsonl"
    rows = [{"step": s, "loss": 4.0, "phase": "pre_lora"} for s in (1, 2, 3)]
    rows += [{"step": 3, "train_loss": 4.0, "phase": "pre_lora"}]
    rows += [{"step": s, "loss": float(s), "phase": "lora"} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert checkpoints.truncate_metrics(path, 2) == 2  # phase 2's steps 3 and 4
    assert [(r["phase"], r["step"]) for r in metric_rows(tmp_path)] == [("pre_lora", 1), ("pre_lora", 2),
                                                                        ("pre_lora", 3), ("pre_lora", 3),
                                                                        ("lora", 1), ("lora", 2)]
    assert checkpoints.resumed_train_loss(path) == 1.5  # phase 2's own steps only
    drawn = plot._phases(metric_rows(tmp_path))
    assert [(phase, [r["step"] for r in phase_rows]) for phase, phase_rows in drawn] == [
        ("pre_lora", [1, 2, 3, 3]), ("lora", [4, 5])]


# ---- both phases, killed in each, resumed (one shared set of runs) ------------------------------------------

def safetensors_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next(folder.glob("*.safetensors")))


def phase_losses(out: Path, phase: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metric_rows(out) if r.get("phase") == phase and "loss" in r]


@pytest.fixture(scope="module")
def two_phase_runs(tiny_model_factory, tmp_path_factory):
    """An uninterrupted two-phase run; the same run killed in phase 1 (after checkpoint 3, then after its last
    checkpoint), killed in phase 2, then resumed without its pre_lora_* settings; and the uninterrupted run with
    Unsloth for phase 2 (6 jobs, ~90 s)."""
    tmp = tmp_path_factory.mktemp("two-phase")
    text = write_jsonl(tmp / "text.jsonl", [{"text": " ".join(NAMES[i % 12:] + NAMES[:i % 12])} for i in range(24)])
    chat = write_jsonl(tmp / "chat.jsonl", greeting_conversations())
    base = tiny_model_factory("qwen2", "chatml")
    phase_one = dict(pre_lora_data_path=str(text), pre_lora_max_steps=6, pre_lora_learning_rate=2e-3)
    settings = dict(model_path=str(base), data_path=str(chat), backend="peft", lora_r=4, lora_dropout=0.1, max_steps=6,
                    save_steps=3, effective_batch_size=4, micro_batch_size=2, learning_rate=5e-3, warmup_steps=2,
                    data_output_dir="none", **phase_one)
    whole, killed = tmp / "whole", tmp / "killed"
    run_job(**settings, ckpt_output_dir=str(whole), save_merged=True)
    in_one = run_job(expect_ok=False, **settings, ckpt_output_dir=str(killed), _kill_after_save_step=3,
                     _kill_in_phase="pre_lora")
    folder_refusal = folder_problems(LoraSFTConfig(**settings, ckpt_output_dir=str(killed)))
    phase_one_checkpoint = sorted(p.name for p in (killed / "pre_lora").glob("checkpoint-*"))
    without = {k: v for k, v in settings.items() if k not in phase_one}
    with pytest.raises(ConfigError, match="phase 1 in .* did not finish"):
        run_phase_one(LoraSFTConfig(**without, ckpt_output_dir=str(killed), resume_from_checkpoint=True), killed)
    # resumed from checkpoint-3, killed again after its last checkpoint, before the phase-1 model was saved
    at_end = run_job(expect_ok=False, **settings, ckpt_output_dir=str(killed), resume_from_checkpoint=True,
                     _kill_after_save_step=6, _kill_in_phase="pre_lora")
    in_two = run_job(expect_ok=False, **settings, ckpt_output_dir=str(killed), resume_from_checkpoint=True,
                     _kill_after_save_step=3, _kill_in_phase="lora")
    resumed = run_job(**without, ckpt_output_dir=str(killed), resume_from_checkpoint=True)
    with_unsloth = run_job(**{**settings, "backend": "unsloth"}, ckpt_output_dir=str(tmp / "unsloth"))
    return dict(base=base, whole=whole, killed=killed, settings=settings, in_one=in_one, at_end=at_end, in_two=in_two,
                resumed=resumed, with_unsloth=with_unsloth, unsloth=tmp / "unsloth", folder_refusal=folder_refusal,
                phase_one_checkpoint=phase_one_checkpoint)


@pytest.mark.slow
def test_phase_one_trains_every_base_weight_and_phase_two_only_the_adapter_on_it(two_phase_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    whole, base = two_phase_runs["whole"], two_phase_runs["base"]
    phase_one_model = whole / "pre_lora" / "model"
    losses = [loss for _, loss in phase_losses(whole, "pre_lora")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # phase-1 loss falls on its text
    before, after = safetensors_weights(base), safetensors_weights(phase_one_model)
    assert before.keys() == after.keys() and all(t.dtype.itemsize == 2 for t in after.values())  # 16-bit
    unchanged = [k for k in before if (before[k].float() - after[k].float()).abs().max() == 0]
    assert unchanged == []  # every base weight changed in phase 1
    assert {"config.json", "tokenizer.json", PHASE_ONE_MARKER} <= {p.name for p in phase_one_model.iterdir()}
    assert not list((whole / "pre_lora").glob("checkpoint-*"))  # the model replaces phase 1's checkpoints

    adapter = json.loads((whole / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(phase_one_model.resolve())
    assert all("lora_" in k for k in safetensors_weights(whole / "checkpoint-6"))  # phase 2 trains the adapter only
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(phase_one_model), whole)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all((frozen[k].float() - after[k].float()).abs().max() == 0 for k in after if k in frozen)
    model, _ = load(whole)  # the adapter names its base: no further arguments
    assert type(model).__name__ == "PeftModelForCausalLM"
    merged = merge_adapter(adapter["base_model_name_or_path"], whole, whole.parent / "merged-again")
    assert (merged / "config.json").is_file() and (whole / "merged" / "config.json").is_file()  # save_merged too

    rows = metric_rows(whole)
    phases = [r["phase"] for r in rows]
    assert phases == sorted(phases, key=["pre_lora", "lora"].index) and set(phases) == {"pre_lora", "lora"}
    record = json.loads((whole / "run_config.json").read_text())["pre_lora"]
    assert record["steps"] == 6 and record["base_model_path"] == str(base) and record["dtype"] == "bfloat16"
    assert record["last_loss"] == losses[-1] and record["data_rows_fingerprint"] and record["data_fingerprint"]
    assert record["settings"]["learning_rate"] == 2e-3 and record["memory_estimate_gib"] > 0
    assert (whole / "loss.png").is_file()
    card = (whole / "README.md").read_text()  # the model card names phase 1 and its result as the base
    assert f"every parameter of `{base}` trained on" in card and "6 steps at learning rate 0.002" in card
    assert f"-> {losses[-1]:.4f}" in card and "saved as a bfloat16 model in `pre_lora/model`" in card


@pytest.mark.slow
def test_a_kill_in_each_phase_resumes_that_phase_and_equals_the_uninterrupted_run(two_phase_runs):
    runs = two_phase_runs
    whole, killed = runs["whole"], runs["killed"]
    assert runs["in_one"].returncode == -signal.SIGKILL and runs["phase_one_checkpoint"] == ["checkpoint-3"]
    assert any("already holds a run" in p for p in runs["folder_refusal"])  # the killed phase 1 is a run to resume
    assert runs["at_end"].returncode == -signal.SIGKILL
    assert "resuming from" in runs["at_end"].stderr and "pre_lora/checkpoint-3" in runs["at_end"].stderr
    assert runs["in_two"].returncode == -signal.SIGKILL
    assert "pre_lora/checkpoint-6 is at step 6: nothing to train" in runs["in_two"].stderr
    assert "phase 1 is complete" in runs["resumed"].stderr and "checkpoint-3 (step 3)" in runs["resumed"].stderr
    assert "phase 1: full fine-tune" not in runs["resumed"].stderr  # phase 1 not repeated

    for phase in ("pre_lora", "lora"):
        a, b = phase_losses(whole, phase), phase_losses(killed, phase)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
        assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(a, b))
    for folder in (Path("pre_lora/model"), Path(".")):
        a, b = safetensors_weights(whole / folder), safetensors_weights(killed / folder)
        assert a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() <= 1e-6 for k in a)
    assert read_record(killed)["steps"] == 6


@pytest.mark.slow
def test_a_changed_phase_one_setting_is_refused_once_phase_one_is_complete(two_phase_runs):
    settings = {**two_phase_runs["settings"], "ckpt_output_dir": str(two_phase_runs["killed"])}
    with pytest.raises(ConfigError, match=r"pre_lora_learning_rate: 0.002 then, 0.001 now"):
        run_phase_one(LoraSFTConfig(**{**settings, "pre_lora_learning_rate": 1e-3}, resume_from_checkpoint=True),
                      two_phase_runs["killed"])
    same = run_phase_one(LoraSFTConfig(**settings, resume_from_checkpoint=True), two_phase_runs["killed"])
    assert same.model_path == str((two_phase_runs["killed"] / "pre_lora" / "model").resolve())


@pytest.mark.slow
def test_with_unsloth_for_phase_two_phase_one_still_trains_plain_transformers_alike(two_phase_runs):
    summary = json.loads(two_phase_runs["with_unsloth"].stdout.strip().splitlines()[-1])
    assert summary["plan"]["backend"] == "unsloth" and summary["unsloth_imported"]
    assert phase_losses(two_phase_runs["unsloth"], "pre_lora") == phase_losses(two_phase_runs["whole"], "pre_lora")
    assert json.loads((two_phase_runs["unsloth"] / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((two_phase_runs["unsloth"] / "pre_lora" / "model").resolve())
