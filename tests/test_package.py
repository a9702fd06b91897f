"""The package stays light to import, and every parameter is documented once and shown the same everywhere."""

import argparse
import subprocess
import sys
from pathlib import Path

from training_hub.config import PARAMETER_DOCS, PARAMETER_NAMES


def test_import_is_light():
    code = ("import sys, training_hub; heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'unsloth', "
            "'datasets', 'pyarrow') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_parameter_is_documented_once_and_shown_the_same_everywhere():
    """docs/parameters.md, lora_sft's docstring and the CLI's help are all derived from the field docs
    (`python -m training_hub.reference` rewrites the first two)."""

    from training_hub import lora_sft, reference
    from training_hub.cli import build_parser

    assert all(PARAMETER_DOCS[name].strip() for name in PARAMETER_NAMES)
    doc = (Path(__file__).parents[1] / "docs" / "parameters.md").read_text()
    assert reference.docs_block(doc) == reference.markdown(), "run: python -m training_hub.reference"
    assert reference.docstring_block(lora_sft.__doc__) == reference.docstring_args()
    lora_sft_command = build_parser()._subparsers._group_actions[0].choices["lora-sft"]
    shown = {a.dest: a.help for a in lora_sft_command._actions if a.help != argparse.SUPPRESS}  # not the aliases
    assert all(shown[name] == reference.cli_help(name) for name in PARAMETER_NAMES if name != "callbacks")


def test_a_changed_description_shows_in_all_three_views(monkeypatch):
    from training_hub import config, reference

    monkeypatch.setitem(config.PARAMETER_DOCS, "lora_r", "a changed description")
    assert "a changed description" in reference.markdown()
    assert "lora_r (int, 16): a changed description." in reference.docstring_args()
    assert reference.cli_help("lora_r").startswith("a changed description")


def test_progress_lines_go_through_the_training_hub_logger(tiny_model_factory, greeting_jsonl, tmp_path, caplog):
    import logging

    from training_hub import lora_sft

    args = (str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(tmp_path / "out"))
    caplog.set_level(logging.INFO, logger="training_hub")
    lora_sft(*args, backend="peft", dry_run=True, data_output_dir="none")
    assert any("dry run" in r.getMessage() for r in caplog.records if r.name == "training_hub")
    caplog.clear()
    logging.getLogger("training_hub").setLevel(logging.WARNING)
    lora_sft(*args, backend="peft", dry_run=True, data_output_dir="none")
    assert not [r for r in caplog.records if r.name == "training_hub"]
