"""TensorBoard logging (a writer we create, handed to transformers' callback), and the checks before training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training_hub import ConfigError, lora_sft
from training_hub.config import LoraSFTConfig
from training_hub.tracking import tracker_problems

JOB = Path(__file__).with_name("e2e_job.py")


def config(**kw) -> LoraSFTConfig:
    return LoraSFTConfig(model_path="m", data_path="d", ckpt_output_dir="o", **kw)


def test_tensorboard_folder_that_is_a_file_is_refused_before_anything_is_written(tiny_model_factory, greeting_jsonl,
                                                                                  tmp_path):
    not_a_folder = tmp_path / "events.txt"
    not_a_folder.write_text("x")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="tensorboard_log_dir=.*is a file: give a folder"):
        lora_sft(str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(out), backend="peft",
                 tensorboard_log_dir=str(not_a_folder), data_output_dir="none")
    assert not out.exists()


def test_missing_tensorboard_package_is_named_with_the_install_hint(monkeypatch):
    import importlib.util

    from training_hub import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert any('pip install "training-hub[tensorboard]"' in p for p in tracker_problems(config(tensorboard_log_dir="tb")))
    assert tracker_problems(config()) == []


@pytest.mark.slow
def test_tensorboard_gets_the_same_losses_as_the_metrics_file(tiny_model_factory, greeting_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, board = tmp_path / "out", tmp_path / "tb"
    job = dict(model_path=str(tiny_model_factory("qwen2", "chatml")), data_path=str(greeting_jsonl),
               ckpt_output_dir=str(out), backend="peft", max_steps=4, effective_batch_size=8, save_steps=1000,
               tensorboard_log_dir=str(board), data_output_dir="none")
    proc = subprocess.run([sys.executable, str(JOB), json.dumps(job)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    events = EventAccumulator(str(board))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    metrics = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    expected = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(logged) == [1, 2, 3, 4] == sorted(expected)
    assert all(abs(logged[s] - expected[s]) < 1e-5 * max(1.0, abs(expected[s])) for s in logged)
    assert "train/learning_rate" in events.Tags()["scalars"]
    assert not (out / "runs").exists()  # the folder given, not transformers' default under the output dir
