"""Shared fixtures: tiny tokenizers with real chat templates and tiny Qwen2/Llama models on disk.

Everything is built offline in about a second and cached for the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import logging
from pathlib import Path

import pytest

# The test machines have no model hub: a model name that is not a folder would otherwise wait for the network's
# retries (about 23 s a lookup) before failing. Set before huggingface_hub is imported; subprocesses inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jobs import metric_rows  # noqa: E402
from sample_data import COLORS, NAMES, greeting_conversations, write_color_images, write_jsonl  # noqa: E402
from training_hub.tiny import build_tokenizer, save_tiny_model, save_tiny_vision_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_factory():
    """Return a function template_name -> tokenizer (cached per template)."""
    cache: dict = {}

    def make(template: str | None = "chatml"):
        if template not in cache:
            cache[template] = build_tokenizer(template=template, corpus=[" ".join(NAMES)])
        return cache[template]

    return make


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Return a function (architecture, template) -> path of a saved tiny model (cached)."""
    cache: dict = {}

    def make(architecture: str = "qwen2", template: str | None = "chatml") -> Path:
        key = (architecture, template)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{architecture}-{template}")
            cache[key] = save_tiny_model(out, architecture=architecture, template=template, corpus=[" ".join(NAMES)])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_vision_model(tmp_path_factory) -> Path:
    """A tiny LLaVA (Llama text model + CLIP vision encoder) with its processor, saved once per session."""
    return save_tiny_vision_model(tmp_path_factory.mktemp("tiny-llava"), corpus=[" ".join(COLORS)])


@pytest.fixture(scope="session")
def color_images(tmp_path_factory) -> dict[str, Path]:
    return write_color_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def greeting_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "greetings.jsonl", greeting_conversations())


@pytest.fixture(scope="session")
def surface_run(tiny_model_factory, tmp_path_factory):
    """One tiny training run (5 steps = 1 epoch of 38 rows, an eval split) that exercises what users see: it logs to
    TensorBoard, wandb (offline) and MLflow (sqlite) at once, saves by samples and at the epoch end, and leaves its
    console output in "stderr". Shared by the tracker, report and training tests."""
    tmp = tmp_path_factory.mktemp("surface")
    out, board, db = tmp / "out", tmp / "tb", tmp / "mlflow.db"
    data = write_jsonl(tmp / "greetings.jsonl", greeting_conversations())
    job = dict(model_path=str(tiny_model_factory("qwen2", "chatml")), data_path=str(data), ckpt_output_dir=str(out),
               backend="peft", num_epochs=1, effective_batch_size=8, eval_split=0.2, eval_steps=2, save_steps=1000,
               save_samples=16, checkpoint_at_epoch=True, save_total_limit=None, data_output_dir="none",
               tensorboard_log_dir=str(board), wandb_project="thub-test", wandb_run_name="tiny",
               mlflow_tracking_uri=f"sqlite:///{db}", mlflow_experiment_name="thub-test", mlflow_run_name="tiny")
    # wandb's own settings, given to the child process only: no network, the run folder under tmp.
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("e2e_job.py")), json.dumps(job)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = metric_rows(out)
    return dict(out=out, board=board, db=db, wandb_dir=tmp / "wandb", metrics=metrics, stderr=proc.stderr)


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, attached to the "training_hub" logger itself: once lora_sft has given that logger its own
    stderr handler, its records no longer propagate to the root, where caplog listens."""
    logger = logging.getLogger("training_hub")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # each record reaches caplog once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate
