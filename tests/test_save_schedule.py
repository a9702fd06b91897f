"""Extra checkpoints by samples seen and at epoch ends (training.save_schedule_callback)."""

import pytest

from training_hub.training import save_schedule_callback


def test_no_schedule_callback_when_none_is_asked_for():
    assert save_schedule_callback(None, 8, at_epoch_end=False) is None


def test_save_samples_saves_each_time_another_n_sequences_were_seen():
    from types import SimpleNamespace

    schedule = save_schedule_callback(save_samples=20, effective_batch_size=8, at_epoch_end=False)
    saved = []
    for step in range(1, 11):
        control = SimpleNamespace(should_save=False)
        schedule.on_step_end(None, SimpleNamespace(global_step=step), control)
        saved += [step] if control.should_save else []
    assert saved == [3, 5, 8, 10]  # 24, 40, 64, 80 sequences seen: past 20, 40, 60, 80


@pytest.mark.slow
def test_checkpoints_by_samples_and_at_the_epoch_end(surface_run):
    from training_hub.checkpoints import is_complete, list_checkpoints

    # save_samples=16 with 8 sequences per step: steps 2 and 4; the epoch (38 rows, 5 steps) ends at step 5.
    found = list_checkpoints(surface_run["out"])
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert all(is_complete(p) and (p / "optimizer.pt").is_file() for p in found)
