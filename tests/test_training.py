"""training.py: the trainer class every run uses."""

from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("device, backend, splitting", [("cpu", "peft", None), ("cuda", "peft", None),
                                                        ("cuda", "peft", "fsdp2")])
def test_trls_model_card_is_never_written(device, backend, splitting):
    """TRL writes README.md at every checkpoint through the public create_model_card (it failed a run once with
    NameError 'wandb', and would overwrite a README.md of the user's); ours does nothing and needs no trainer."""
    from training_hub.training import trainer_class

    cls = trainer_class(SimpleNamespace(device=device, backend=backend, model_splitting=splitting))
    assert cls.create_model_card(None, model_name="run") is None  # TRL's would fail on a trainer of None
