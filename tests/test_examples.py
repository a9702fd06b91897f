"""Every example runs as written, offline, on the tiny model (a few steps each, plain PEFT backend for speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import metric_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = ["--max-steps", "4", "--backend", "peft"]


def run(command: list[str], tmp_path: Path, **env) -> str:
    environment = {**os.environ, "PYTHON": sys.executable, **env,
                   "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=environment)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def adapter_trained(adapter: Path, steps: int) -> None:
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "loss.png").is_file()
    rows = metric_rows(adapter)
    assert max(r["step"] for r in rows) == steps


@pytest.mark.slow
@pytest.mark.parametrize("script", ["chat_sft.py", "alpaca_sft.py", "qlora_sft.py", "eval_set.py"])
def test_training_examples(script, tmp_path):
    stdout = run([sys.executable, str(EXAMPLES / script), "--output-dir", str(tmp_path / "run"), *STEPS], tmp_path)
    adapter_trained(tmp_path / "run" / "adapter", 4)
    if script == "eval_set.py":
        assert stdout.startswith("eval loss at each evaluation: ")
    if script == "qlora_sft.py":
        config = json.loads((tmp_path / "run" / "adapter" / "run_config.json").read_text())["config"]
        assert config["load_in_4bit"] is True


@pytest.mark.slow
def test_resume_example_continues_the_same_run(tmp_path):
    stdout = run([sys.executable, str(EXAMPLES / "resume.py"), "--output-dir", str(tmp_path / "run"), *STEPS], tmp_path)
    assert "first call: stopped at step 2" in stdout and "continued from checkpoint-2 to step 4" in stdout
    adapter_trained(tmp_path / "run" / "adapter", 4)


@pytest.mark.slow
def test_merge_and_generate_example(tmp_path):
    stdout = run([sys.executable, str(EXAMPLES / "merge_and_generate.py"), "--output-dir", str(tmp_path / "run"), *STEPS],
                 tmp_path)
    assert "adapter: " in stdout and "merged (" in stdout
    assert (tmp_path / "run" / "adapter" / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_cli_yaml_example(tmp_path):
    run(["bash", str(EXAMPLES / "cli_yaml.sh"), "--max_steps", "4", "--backend", "peft", "--eval_steps", "2"], tmp_path,
        OUT=str(tmp_path / "run"))
    adapter_trained(tmp_path / "run" / "adapter", 4)
    config = json.loads((tmp_path / "run" / "adapter" / "run_config.json").read_text())["config"]
    assert config["learning_rate"] == 2e-3 and config["lr_scheduler"] == "cosine"  # from the YAML file


@pytest.mark.slow
def test_torchrun_example_trains_in_two_processes(tmp_path):
    run(["bash", str(EXAMPLES / "torchrun.sh"), *STEPS], tmp_path, OUT=str(tmp_path / "run"))
    adapter_trained(tmp_path / "run" / "adapter", 4)
    assert json.loads((tmp_path / "run" / "adapter" / "run_config.json").read_text())["plan"]["world_size"] == 2
