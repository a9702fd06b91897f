"""The output folder is the run's or it is refused: nothing of the user's is overwritten, deleted or mixed in."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import run_job
from training_hub import ConfigError, LoraSFTConfig, lora_sft
from training_hub import outputs
from training_hub.outputs import FINAL_MARKER, LOCK_FILE, folder_problems



def config(out: Path, **kwargs) -> LoraSFTConfig:
    return LoraSFTConfig(**{"model_path": "m", "data_path": "d.jsonl", "ckpt_output_dir": str(out), **kwargs})


def earlier_run(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "run_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"earlier adapter")
    (out / "checkpoint-4").mkdir()
    (out / "notes.txt").write_text("the user's notes")


def test_the_base_model_the_adapter_and_the_data_are_never_written_into(tmp_path):
    model, data = tmp_path / "model", tmp_path / "out" / "train.jsonl"
    model.mkdir()
    data.parent.mkdir()
    data.write_text("{}\n")
    for out in (model, model / "adapter"):
        (problem,) = folder_problems(config(out, model_path=str(model)))
        assert "inside model_path (the base model)" in problem
    (problem,) = folder_problems(config(tmp_path / "out", data_path=str(data)))
    assert "holds data_path" in problem and "train.jsonl" in problem
    (problem,) = folder_problems(config(model / "x", lora_adapter=str(model)))
    assert "inside lora_adapter" in problem


def test_files_a_run_would_overwrite_are_named_and_others_ignored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert folder_problems(config(out)) == []  # a folder of unrelated files is fine
    (out / "README.md").write_text("mine")
    (out / "tokenizer.json").write_text("{}")
    (problem,) = folder_problems(config(out, overwrite_output_dir=True))
    assert "did not write" in problem and "README.md, tokenizer.json" in problem


def test_a_running_run_locks_its_folder_and_a_dead_ones_lock_is_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    (problem,) = folder_problems(config(out))
    assert f"pid {os.getpid()}" in problem and "in use by another run" in problem
    with pytest.raises(ConfigError, match="in use by another run"):
        outputs.take_lock(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    assert folder_problems(config(out)) == []
    with outputs.claimed(out, overwrite_output_dir=False):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_overwriting_moves_only_the_earlier_runs_files_aside(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    with outputs.claimed(out, overwrite_output_dir=True):
        (aside,) = [p for p in out.iterdir() if p.name.startswith(outputs.REPLACED_PREFIX)]
        assert sorted(p.name for p in aside.iterdir()) == ["adapter_model.safetensors", "checkpoint-4", "run_config.json"]
        assert (out / "notes.txt").read_text() == "the user's notes"
        outputs.discard_replaced_runs(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_failed_overwrite_keeps_the_earlier_run(tiny_model_factory, greeting_jsonl, tmp_path):
    """A mistake in the new run (here a target module that does not exist) loses nothing of the old one."""
    out = tmp_path / "out"
    earlier_run(out)
    before = {p.name for p in out.iterdir()}
    with pytest.raises(ValueError, match="q_projx"):
        lora_sft(str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(out), backend="peft",
                 overwrite_output_dir=True, target_modules=["q_projx"], max_steps=1, data_output_dir="none")
    assert {p.name for p in out.iterdir()} == before
    assert (out / "adapter_model.safetensors").read_bytes() == b"earlier adapter"


@pytest.mark.slow
def test_overwrite_keeps_the_users_files_and_replaces_the_run(tiny_model_factory, greeting_jsonl, tmp_path):
    """One run over an earlier one: the user's file stays, the old run is gone once replaced, the lock is
    released and the final adapter is marked complete (an interrupted final save: test_checkpoints)."""
    out = tmp_path / "out"
    earlier_run(out)
    settings = dict(model_path=str(tiny_model_factory("qwen2", "chatml")), data_path=str(greeting_jsonl),
                    ckpt_output_dir=str(out), backend="peft", max_steps=2, save_steps=1, effective_batch_size=8,
                    data_output_dir="none", overwrite_output_dir=True)
    proc = run_job(**settings)
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and FINAL_MARKER in names and LOCK_FILE not in names
    assert not any(n.startswith(outputs.REPLACED_PREFIX) for n in names) and "checkpoint-4" not in names
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert (out / "adapter_model.safetensors").read_bytes() != b"earlier adapter"
    assert "are in .replaced-" in proc.stderr
