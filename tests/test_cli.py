"""The `training-hub` command: options derived from the config, one-line errors."""

from training_hub.cli import build_parser, main
from training_hub.config import PARAMETER_NAMES


def test_cli_train_has_every_parameter():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions}
    assert set(PARAMETER_NAMES) - {"callbacks"} <= flags


def test_cli_rejects_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: m\ndata_path: d.jsonl\nckpt_output_dir: out\nlora_rank: 8\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'lora_rank'" in err and "Did you mean 'lora_r'" in err


def test_cli_values_are_typed(tmp_path, capsys):
    assert main(["train", "--model_path", "m", "--data_path", "d.jsonl", "--ckpt_output_dir", str(tmp_path / "o"),
                 "--lora_r", "zero"]) == 2
    assert "lora_r='zero': expected int" in capsys.readouterr().err


def test_cli_preview_marks_the_trained_text(tiny_model_factory, greeting_jsonl, capsys):
    assert main(["preview", "--data", str(greeting_jsonl), "--model", str(tiny_model_factory("qwen2", "chatml")),
                 "--num-examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "48 of 48 rows kept" in out and "[[Hello, Alice! Nice to meet you.<|im_end|>]]" in out


def test_cli_refuses_a_config_key_given_twice(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: m\ndata_path: d.jsonl\nlora_r: 8\nckpt_output_dir: out\nlora_r: 64\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"{cfg}:5: 'lora_r' is given twice (first on line 3)" in capsys.readouterr().err
