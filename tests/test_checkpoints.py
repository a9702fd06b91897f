"""Checkpoints: completion markers, choosing the resume point, exact kill-and-resume, SIGTERM, divergence.

Training runs happen in subprocesses (tests/e2e_job.py): Unsloth patches the whole process.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import JOB, metric_rows, run_job
from training_hub import checkpoints, load, lora_sft
from training_hub.config import ConfigError, LoraSFTConfig
from training_hub.outputs import FINAL_MARKER, folder_problems
from training_hub.resume import find_resume, set_aside



def fake_checkpoint(out: Path, step: int, complete: bool = True, config: dict | None = None) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        checkpoints.mark_complete(folder, step, config or {"lora_r": 8}, "data-fp")
    return folder


# ---- choosing where to resume (no training) ------------------------------------------------------------------

def test_newest_complete_checkpoint_is_chosen_and_incomplete_ones_set_aside(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:
        fake_checkpoint(tmp_path, step, complete)
    point = find_resume(tmp_path, True)
    assert point.checkpoint.name == "checkpoint-4" and point.step == 4
    assert [p.name for p in point.set_aside] == ["checkpoint-6"]
    notices = set_aside(point.set_aside)
    assert "incomplete" in notices[0]
    assert not (tmp_path / "checkpoint-6").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-6.set-aside-")]  # kept, not deleted
    assert find_resume(tmp_path, "auto").checkpoint.name == "checkpoint-4"


def test_resume_true_needs_a_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=True but .* holds no complete checkpoint .*checkpoint-3"):
        find_resume(tmp_path, True)


def test_auto_starts_fresh_without_a_checkpoint_but_never_over_a_finished_adapter(tmp_path):
    assert find_resume(tmp_path / "new", "auto").checkpoint is None
    (tmp_path / "adapter_model.safetensors").write_bytes(b"finished")
    (tmp_path / "training_hub_final.json").write_text("{}")  # the final save completed
    with pytest.raises(ConfigError, match="finished adapter"):
        find_resume(tmp_path, "auto")


def test_explicit_checkpoint_must_exist_and_be_complete(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        find_resume(tmp_path, str(tmp_path / "checkpoint-9"))
    half = fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ConfigError, match="incomplete"):
        find_resume(tmp_path, str(half))
    good = fake_checkpoint(tmp_path, 2)
    newer = fake_checkpoint(tmp_path, 8)
    point = find_resume(tmp_path, str(good))
    assert point.checkpoint == good and set(point.set_aside) == {half, newer}  # newer work is set aside, never overwritten


def test_output_folder_with_a_run_is_refused_unless_resuming_or_overwriting(tmp_path):
    fake_checkpoint(tmp_path, 2)
    settings = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path))
    (problem,) = folder_problems(LoraSFTConfig(**settings))
    assert "resume_from_checkpoint=True" in problem and "overwrite_output_dir=True" in problem
    assert folder_problems(LoraSFTConfig(**settings, resume_from_checkpoint="auto")) == []
    assert folder_problems(LoraSFTConfig(**settings, dry_run=True)) == []  # a dry run writes nothing
    with pytest.raises(ConfigError, match="choose one"):
        lora_sft("m", "d.jsonl", str(tmp_path), overwrite_output_dir=True, resume_from_checkpoint=True)


def test_resume_refuses_other_lora_settings(tmp_path, greeting_jsonl):
    from training_hub.config import LoraSFTConfig

    out = tmp_path / "out"
    config = dict(model_path="m", data_path=str(greeting_jsonl), ckpt_output_dir=str(out), lora_r=8, max_steps=4)
    fake_checkpoint(out, 2, config=LoraSFTConfig(**config).to_dict())
    with pytest.raises(ConfigError, match=r"lora_r: 8 in the checkpoint, 16 now.*Only max_steps"):
        lora_sft(**dict(config, lora_r=16, resume_from_checkpoint=True))
    point = find_resume(out, True)
    longer = LoraSFTConfig(**dict(config, max_steps=10, save_steps=1, resume_from_checkpoint=True)).to_dict()
    assert point.config_problems(longer) == []
    assert "training data differs" in point.data_problems("other")[0]


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "training_metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "train_runtime": 0.1} for s in range(1, 6)] + [{"step": 5, "train_loss": 0.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert checkpoints.truncate_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_torn_last_metrics_line_is_dropped_with_a_notice_and_a_damaged_middle_line_is_named(tmp_path, caplog):
    path = tmp_path / "training_metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # killed mid-write
    with caplog.at_level("WARNING", logger="training_hub"):
        assert checkpoints.truncate_metrics(path, 3) == 1
    assert f"{path}:5 was cut off" in caplog.text
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert checkpoints.resumed_train_loss(path) == 1.0
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=f"{path}:2 is not a JSON metrics row"):
        checkpoints.truncate_metrics(path, 3)
    assert path.read_text().count("\n") == 3  # left as it was


def test_rotation_counts_only_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)
    checkpoints.rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_divergence_rules():
    stop = checkpoints.StopRequest()
    stop.note_loss(2.0, 1)
    stop.note_grad_norm(float("inf"), 1, loss_scaler=True)  # fp16: a skipped step, not divergence
    assert stop.diverged is None
    stop.note_grad_norm(float("nan"), 2, loss_scaler=False)
    assert "gradient norm is nan at step 2" in stop.diverged
    stop = checkpoints.StopRequest()
    stop.note_loss(float("inf"), 7)
    assert stop.diverged == "the training loss is inf at step 7"


def test_zero_gradients_or_exploded_weights_for_five_logged_steps_stop_the_run():
    stop = checkpoints.StopRequest()
    for step in range(1, 5):
        stop.note_grad_norm(0.0, step, loss_scaler=False)
    stop.note_grad_norm(0.3, 5, loss_scaler=False)  # a real gradient resets the count
    for step in range(6, 10):
        stop.note_grad_norm(0.0, step, loss_scaler=False)
    assert stop.diverged is None
    stop.note_grad_norm(0.0, 10, loss_scaler=False)
    assert stop.diverged == ("the gradient norm was exactly 0 for 5 logged steps in a row up to step 10: the adapter "
                             "no longer learns (a flat loss)")
    stop = checkpoints.StopRequest()
    stop.note_weight_scale(0.125, 0)  # at the start
    for step, scale in enumerate([90.0, 1e6, 1e7, 1e8, 1e9, 110.0, 1e6, 1e7, 1e8, 1e9], start=1):
        stop.note_weight_scale(scale, step)  # limit max(1000 x 0.125, 100) = 125: 90 and 110 are under it
    assert stop.diverged is None
    stop.note_weight_scale(1e10, 7)
    assert "the largest adapter weight was above 125 (1000x its 0.125 at the start) for 5 logged steps in a row, " \
           "1e+10 at step 7: the weights exploded" == stop.diverged


def test_the_guard_callback_stops_a_run_whose_gradients_stay_zero(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl

    model = torch.nn.Linear(4, 4)
    stop = checkpoints.StopRequest()
    guard = checkpoints.guard_callback(tmp_path, stop, {}, "fp", None, loss_scaler=False)
    state, control = SimpleNamespace(global_step=0), TrainerControl()
    guard.on_train_begin(None, state, control, model=model)
    for step in range(1, 6):
        state.global_step = step
        guard.on_log(None, state, control, logs={"loss": 6.0, "grad_norm": 0.0}, model=model)
    assert control.should_training_stop and not control.should_save
    message = checkpoints.stopped_message(stop, tmp_path, 1e6, "float32")
    assert message.startswith("Training diverged: the gradient norm was exactly 0 for 5 logged steps")
    assert "learning_rate=1e+06" in message


def test_signal_handlers_are_scoped():
    before = signal.getsignal(signal.SIGTERM)
    stop = checkpoints.StopRequest()
    with checkpoints.stop_on_signals(stop):
        assert signal.getsignal(signal.SIGTERM) is not before
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before  # a second signal acts as it did before training
    assert signal.getsignal(signal.SIGTERM) is before


# ---- end to end, in subprocesses ---------------------------------------------------------------------------

def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metric_rows(out) if "loss" in r]


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def run_settings(base: Path, data: Path, backend: str) -> dict:
    # dropout and accumulation on purpose: exact resume needs the RNG and the sampler position restored
    return dict(model_path=str(base), data_path=str(data), backend=backend, lora_r=4, lora_dropout=0.1, max_steps=8,
                save_steps=3, save_total_limit=2, effective_batch_size=4, micro_batch_size=2, learning_rate=5e-3,
                warmup_steps=2, num_epochs=1, data_output_dir="none")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["peft", "unsloth"])
def test_kill_and_resume_equals_the_uninterrupted_run(backend, tiny_model_factory, greeting_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2", "chatml")
    settings = run_settings(base, greeting_jsonl, backend)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_job(**settings, ckpt_output_dir=str(whole))
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # limit 2
    assert all(checkpoints.is_complete(p) for p in whole.glob("checkpoint-*"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), whole / "checkpoint-6")  # loads alone

    proc = run_job(expect_ok=False, **settings, ckpt_output_dir=str(killed), _kill_after_save_step=3)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints.is_complete(killed / "checkpoint-3") and not (killed / "adapter_model.safetensors").exists()
    half = killed / "checkpoint-6"  # a save cut short by a kill: no marker, truncated weights
    shutil.copytree(killed / "checkpoint-3", half)
    (half / checkpoints.COMPLETE_MARKER).unlink()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    refused = run_job(expect_ok=False, **settings, ckpt_output_dir=str(killed))
    assert refused.returncode != 0 and "already holds a run" in refused.stderr

    resumed = run_job(**settings, ckpt_output_dir=str(killed), resume_from_checkpoint=True)
    assert "set aside checkpoint-6 (incomplete" in resumed.stderr
    assert step_losses(killed) == step_losses(whole)  # same steps, no duplicates, same values
    a, b = adapter_weights(whole), adapter_weights(killed)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert len([r for r in metric_rows(killed) if "train_loss" in r]) == 1

    # killed after the last checkpoint but before the final adapter: resume trains nothing and writes it
    final = (killed / "adapter_model.safetensors").read_bytes()
    (killed / FINAL_MARKER).unlink()  # the final save removes the marker first and writes it last
    (killed / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no complete final adapter"):
        load(killed)
    again = run_job(**settings, ckpt_output_dir=str(killed), resume_from_checkpoint=True)
    assert "nothing to train" in again.stderr
    assert (killed / "adapter_model.safetensors").read_bytes() == final and (killed / FINAL_MARKER).exists()
    assert step_losses(killed) == step_losses(whole)

def sigterm_after_three_logged_steps(command: list[str], settings: dict, out: Path):
    """Start a training job, send it SIGTERM once three steps are logged; returns (process, its stderr)."""
    proc = subprocess.Popen(command + [json.dumps(settings)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "training_metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc, stderr



@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_model_factory, greeting_jsonl, tmp_path):
    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    settings = dict(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft",
                    lora_r=4, max_steps=100000, save_steps=100000, learning_rate=1e-3, data_output_dir="none")
    proc, stderr = sigterm_after_three_logged_steps([sys.executable, str(JOB)], settings, out)
    assert proc.returncode != 0 and "Training stopped by SIGTERM" in stderr and "resume_from_checkpoint=True" in stderr
    (saved,) = out.glob("checkpoint-*")
    step = checkpoints.checkpoint_step(saved)
    assert checkpoints.is_complete(saved) and step >= 3
    assert not (out / "adapter_model.safetensors").exists()  # no "final" adapter for an unfinished run

    run_job(**dict(settings, max_steps=step + 2), resume_from_checkpoint=True)
    steps = [s for s, _ in step_losses(out)]
    assert steps == list(range(1, step + 3))  # continued without gaps or duplicates
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_factory, greeting_jsonl, tmp_path):
    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    proc = run_job(expect_ok=False, model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out),
               backend="peft", lora_r=4, max_steps=20, save_steps=2, learning_rate=1e-3, data_output_dir="none",
               _nan_from_step=6)
    assert proc.returncode != 0
    assert "Training diverged: the training loss is nan at step 6" in proc.stderr
    assert "learning rate too high" in proc.stderr and "checkpoint-4" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    good = adapter_weights(out / "checkpoint-4")
    assert all(v.isfinite().all() for v in good.values())
    assert not (out / "adapter_model.safetensors").exists()


def test_zero_gradients_stop_the_run_a_damaged_checkpoint_is_named_and_a_torn_metrics_line_is_dropped(
        tiny_model_factory, greeting_jsonl, tmp_path):
    base = tiny_model_factory("llama", "chatml")
    out = tmp_path / "out"
    settings = dict(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft",
                    lora_r=4, max_steps=12, save_steps=2, data_output_dir="none")
    proc = run_job(expect_ok=False, **settings, _zero_input_from_step=3)
    assert "Training diverged: the gradient norm was exactly 0 for 5 logged steps in a row up to step 7" in proc.stderr
    assert "checkpoint-6" in proc.stderr and not (out / "adapter_model.safetensors").exists()
    assert [row["grad_norm"] for row in metric_rows(out) if "grad_norm" in row][2:] == [0.0] * 5
    optimizer = out / "checkpoint-6" / "optimizer.pt"
    whole = optimizer.read_bytes()
    optimizer.write_bytes(whole[:-500])  # a damaged file in a complete checkpoint: named before the model loads
    refused = run_job(expect_ok=False, **settings, resume_from_checkpoint=True)
    assert f"resume_from_checkpoint: {optimizer} is damaged (not a whole torch file" in refused.stderr
    assert f"resume_from_checkpoint={str(out / 'checkpoint-4')!r}" in refused.stderr
    assert len(optimizer.read_bytes()) == len(whole) - 500 and "Loading weights" not in refused.stderr
    optimizer.write_bytes(whole)
    metrics = out / "training_metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 8, "loss": 6.09')  # as if killed mid-write
    resumed = run_job(**settings, resume_from_checkpoint=True)
    assert f"{metrics}:9 was cut off" in resumed.stderr
    assert "Loading weights" in resumed.stderr  # what the refused attempt must not have printed
    assert [row["step"] for row in metric_rows(out) if "loss" in row] == list(range(1, 13))
    assert json.loads(resumed.stdout.splitlines()[-1])["metrics"]["global_step"] == 12


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tiny_model_factory, greeting_jsonl, tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step, save one checkpoint with both RNG files."""
    base = tiny_model_factory("qwen2", "chatml")
    out = tmp_path / "out"
    settings = dict(model_path=str(base), data_path=str(greeting_jsonl), ckpt_output_dir=str(out), backend="peft",
                    lora_r=4, max_steps=100000, save_steps=100000, effective_batch_size=8, learning_rate=1e-3,
                    data_output_dir="none")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(JOB)]
    proc, stderr = sigterm_after_three_logged_steps(launch, settings, out)
    assert proc.returncode != 0 and "Training stopped by SIGTERM" in stderr
    (saved,) = out.glob("checkpoint-*")
    assert checkpoints.is_complete(saved)
    assert (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()
    # Resuming a multi-process run exactly: tests/test_distributed.py (kill -9 of one rank, then resume).


def test_a_parameter_added_after_the_checkpoint_resumes_at_its_default(tmp_path):
    import dataclasses

    from training_hub.config import LoraSFTConfig

    config = LoraSFTConfig(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path))
    saved = config.to_dict()
    del saved["train_on_reasoning"]  # a checkpoint written before the parameter existed
    fake_checkpoint(tmp_path, 2, config=saved)
    point = find_resume(tmp_path, True)
    assert point.config_problems(config.to_dict()) == []
    (problem,) = point.config_problems(dataclasses.replace(config, train_on_reasoning=False).to_dict())
    assert "train_on_reasoning: True in the checkpoint, False now" in problem
