"""TensorBoard logging (a writer we create, handed to transformers' callback), and the checks before training."""

import pytest

from training_hub import ConfigError, lora_sft
from training_hub.config import LoraSFTConfig
from training_hub.tracking import tracker_problems


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


def logged_losses(metrics: list[dict], key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics if key in m}


def assert_same(logged: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(logged) == sorted(expected) and expected
    assert all(abs(logged[s] - expected[s]) < 1e-5 * max(1.0, abs(expected[s])) for s in logged)


@pytest.mark.slow
def test_tensorboard_gets_the_same_losses_as_the_metrics_file(surface_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(surface_run["board"]))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    assert_same(logged, logged_losses(surface_run["metrics"]))
    assert_same({e.step: e.value for e in events.Scalars("eval/loss")}, logged_losses(surface_run["metrics"], "eval_loss"))
    assert "train/learning_rate" in events.Tags()["scalars"]
    assert not (surface_run["out"] / "runs").exists()  # the folder given, not the default under the output dir


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_losses_as_the_metrics_file(surface_run):
    from wandb_records import history

    (run_folder,) = surface_run["wandb_dir"].glob("offline-run-*")
    rows = history(run_folder)
    logged = {r["train/global_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert_same(logged, logged_losses(surface_run["metrics"]))
    evals = {r["train/global_step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert_same(evals, logged_losses(surface_run["metrics"], "eval_loss"))
    assert all("_runtime" in r for r in rows)  # wandb's own bookkeeping: these are real history records


@pytest.mark.slow
def test_mlflow_sqlite_run_holds_the_same_losses_and_is_finished(surface_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{surface_run['db']}")
    experiment = client.get_experiment_by_name("thub-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert_same(logged, logged_losses(surface_run["metrics"]))
    assert_same({m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")},
                logged_losses(surface_run["metrics"], "eval_loss"))


def test_report_to_names_are_checked_against_transformers_integrations():
    problems = tracker_problems(config(report_to=["wandbb", "all", "clearml"]))
    assert any("'wandbb' is not a transformers integration; did you mean 'wandb'?" in p for p in problems)
    assert any("'all' is not accepted" in p for p in problems)
    assert any("'clearml' is not installed" in p for p in problems)
    assert tracker_problems(config(report_to=["wandb", "mlflow", "tensorboard"])) == []


def test_enabled_trackers_come_from_parameters_and_report_to():
    from training_hub.tracking import enabled_trackers

    assert enabled_trackers(config()) == []
    assert enabled_trackers(config(wandb_run_name="x", report_to=["comet_ml", "mlflow"])) == ["wandb", "mlflow", "comet_ml"]
    assert enabled_trackers(config(mlflow_tracking_uri="sqlite:///x.db", tensorboard_log_dir="tb")) == ["tensorboard", "mlflow"]


def test_wandb_and_mlflow_runs_end_as_failed_when_training_raises(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from training_hub.tracking import tracker_runs
    from wandb_records import records

    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb's own settings, for this test process only
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker_runs(config(wandb_project="p", mlflow_tracking_uri=uri, mlflow_run_name="crashed")):
            assert mlflow.active_run() is not None
            raise RuntimeError("boom")
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == before  # the process-wide URI is put back
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.run_name == "crashed" and run.info.status == "FAILED"
    import wandb

    assert wandb.run is None
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    from wandb.proto import wandb_internal_pb2

    exits = []
    for blob in records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "exit":
            exits.append(record.exit.exit_code)
    assert exits == [1]
