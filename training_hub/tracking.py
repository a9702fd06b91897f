"""Experiment trackers: transformers' own callbacks, with the runs started by us on rank 0.

transformers 5.17 reads the trackers' settings only from environment variables, which a library must not write.
Each of its callbacks also accepts what we hand it instead:
- TensorBoard: `TensorBoardCallback(tb_writer=...)` takes a `SummaryWriter` we make for `tensorboard_log_dir`.
- Weights & Biases: `WandbCallback` logs into an already started `wandb.run` (it calls `wandb.init` only when
  there is none), so we start it with `wandb_project` / `wandb_entity` / `wandb_run_name`. Offline mode, the
  API key and the run folder stay wandb's own settings (`WANDB_MODE=offline`, `wandb login`, `WANDB_DIR`).
- MLflow: `MLflowCallback` logs into an already active run, so we start it on `mlflow_tracking_uri` (e.g.
  `sqlite:///mlflow.db`, no server needed) in `mlflow_experiment_name`, named `mlflow_run_name`.
Other integrations transformers knows (comet_ml, trackio, ...) are reachable through `report_to`, configured
by their own environment variables. The runs end when training does, marked failed when training raised.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterator

from .config import LoraSFTConfig
from .hardware import is_main_process

logger = logging.getLogger("training_hub")

INSTALL_HINTS = {
    "tensorboard": 'pip install "training-hub[tensorboard]" (or pip install tensorboard)',
    "wandb": 'pip install "training-hub[wandb]" (or pip install wandb)',
    "mlflow": 'pip install "training-hub[mlflow]" (or pip install mlflow-skinny sqlalchemy alembic)',
}
# The trackers whose settings are lora_sft parameters; the parameter that turns each one on.
OWN_TRACKERS = {
    "tensorboard": ("tensorboard_log_dir",),
    "wandb": ("wandb_project", "wandb_entity", "wandb_run_name"),
    "mlflow": ("mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name"),
}
# report_to=["tensorboard"] without tensorboard_log_dir logs here, inside the output folder.
DEFAULT_TENSORBOARD_DIR = "runs"


def enabled_trackers(config: LoraSFTConfig) -> list[str]:
    """The trackers this run logs to: ours when one of their parameters is set or they are named in report_to,
    then the other report_to names in the order given."""
    wanted = list(config.report_to or [])
    own = [name for name, params in OWN_TRACKERS.items()
           if name in wanted or any(getattr(config, p) is not None for p in params)]
    return own + [name for name in wanted if name not in OWN_TRACKERS]


def tracker_problems(config: LoraSFTConfig) -> list[str]:
    """What would stop a configured tracker, found before any model is loaded or any file written."""
    problems = _report_to_problems(config.report_to) if config.report_to else []
    if config.tensorboard_log_dir is not None:
        if not str(config.tensorboard_log_dir).strip():
            problems.append("tensorboard_log_dir is empty: give a folder for the event files, or None")
        elif Path(config.tensorboard_log_dir).expanduser().is_file():
            problems.append(f"tensorboard_log_dir={config.tensorboard_log_dir!r} is a file: give a folder")
    for name in ("wandb_project", "wandb_entity", "wandb_run_name", "mlflow_tracking_uri", "mlflow_experiment_name",
                 "mlflow_run_name"):
        if getattr(config, name) is not None and not str(getattr(config, name)).strip():
            problems.append(f"{name} is empty: give a name, or None")
    for name in OWN_TRACKERS:
        if name in enabled_trackers(config) and importlib.util.find_spec(name) is None:
            given = ", ".join(f"{p}={getattr(config, p)!r}" for p in OWN_TRACKERS[name] if getattr(config, p) is not None)
            problems.append(f"{given or f'report_to={config.report_to!r}'}: logging to {name} needs the {name} "
                            f"package: {INSTALL_HINTS[name]}")
    return problems


def _report_to_problems(report_to: list[str]) -> list[str]:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known, installed = list(INTEGRATION_TO_CALLBACK), set(get_available_reporting_integrations())
    problems = []
    for name in report_to:
        if name in ("all", "none"):
            problems.append(f"report_to: {name!r} is not accepted: name the trackers (e.g. ['wandb']), or leave "
                            "report_to unset for none ('all' would log to whatever happens to be installed)")
        elif name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"report_to: {name!r} is not a transformers integration; {hint}known: {', '.join(known)}")
        elif name not in installed and name not in OWN_TRACKERS:  # ours get the install hint in tracker_problems
            problems.append(f"report_to: {name!r} is not installed (or disabled by its environment variable); "
                            f"pip install {name.replace('_', '-')}")
    return problems


def tracker_callbacks(config: LoraSFTConfig) -> list[Any]:
    """TrainerCallbacks that log every logging step to the configured trackers (none on ranks other than 0).

    Each gets what `training_metrics.jsonl` gets (train/loss, train/learning_rate, train/grad_norm, ..., and eval/*
    when evaluating), with the optimizer step as x-axis. Making them starts no run: `tracker_runs` does.
    """
    if not is_main_process():
        return []
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    callbacks = []
    for name in enabled_trackers(config):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            folder = config.tensorboard_log_dir or str(Path(config.ckpt_output_dir) / DEFAULT_TENSORBOARD_DIR)
            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(folder).expanduser()))))
        else:
            callbacks.append(INTEGRATION_TO_CALLBACK[name]())
    return callbacks


@contextlib.contextmanager
def tracker_runs(config: LoraSFTConfig) -> Iterator[None]:
    """Start the wandb and MLflow runs (rank 0) for the duration of training; end them when it ends, as failed
    when it raised, so a crashed run never stays "running" in the tracker."""
    trackers = enabled_trackers(config) if is_main_process() else []
    with contextlib.ExitStack() as stack:
        if "wandb" in trackers:
            stack.enter_context(_wandb_run(config))
        if "mlflow" in trackers:
            stack.enter_context(_mlflow_run(config))
        yield


@contextlib.contextmanager
def _wandb_run(config: LoraSFTConfig) -> Iterator[None]:
    import wandb

    run = wandb.init(project=config.wandb_project, entity=config.wandb_entity, name=config.wandb_run_name,
                     config={"training_hub": config.to_dict()})
    try:
        yield
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


@contextlib.contextmanager
def _mlflow_run(config: LoraSFTConfig) -> Iterator[None]:
    import mlflow

    # The fluent API MLflowCallback logs through reads the process-wide tracking URI (MLflow mirrors it into
    # MLFLOW_TRACKING_URI for subprocesses): set it for this run only, then put back what was there before.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    if config.mlflow_tracking_uri is not None:
        mlflow.set_tracking_uri(config.mlflow_tracking_uri)
    try:
        experiment_id = None
        if config.mlflow_experiment_name is not None:
            experiment = mlflow.get_experiment_by_name(config.mlflow_experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else mlflow.create_experiment(config.mlflow_experiment_name))
        mlflow.start_run(run_name=config.mlflow_run_name, experiment_id=experiment_id)
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        finally:
            mlflow.flush_async_logging()  # MLflowCallback logs asynchronously
            mlflow.end_run(status=status)
    finally:
        if config.mlflow_tracking_uri is not None and previous != config.mlflow_tracking_uri:
            mlflow.set_tracking_uri(previous)
