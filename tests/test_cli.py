"""The `training-hub` command: flags and YAML keys derived from the config, values coerced per field type,
one-line errors with exit codes, and one CLI training run under torchrun."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training_hub import ConfigError, LoraSFTConfig
from training_hub.cli import CLI_PARAMETERS, build_parser, coerce, flag, hub_problem, lora_sft_config, main, parse

REQUIRED = ["--model-path", "m", "--data-path", "d.jsonl", "--ckpt-output-dir", "out"]


def config_from(*argv: str) -> LoraSFTConfig:
    return lora_sft_config(parse(["lora-sft", *argv]))


def errors(capsys, *argv: str, code: int = 2) -> list[str]:
    assert main(list(argv)) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.splitlines()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_every_parameter_is_a_flag_in_both_spellings():
    parser = build_parser()
    for name in CLI_PARAMETERS:
        for spelling in {flag(name), f"--{name}"}:
            assert name in vars(parser.parse_args(["lora-sft", spelling, "none"])), spelling
    with pytest.raises(ConfigError, match="--callbacks: TrainerCallback objects can only be passed to lora_sft from Python"):
        parse(["lora-sft", "--callbacks", "x"])


@pytest.mark.parametrize("name, given, value", [
    ("learning_rate", "1e-4", 1e-4), ("learning_rate", "1.0e-4", 1e-4), ("learning_rate", "2E-5", 2e-5),
    ("lora_r", "16", 16), ("max_steps", "1_000", 1000), ("max_steps", "none", None), ("lora_dropout", ".05", 0.05),
    ("dry_run", "yes", True), ("dry_run", "0", False), ("dry_run", "False", False), ("bf16", "null", None),
    ("micro_batch_size", "auto", "auto"), ("micro_batch_size", "4", 4), ("micro_batch_size", 4.0, 4),
    ("gradient_checkpointing", "offload", "offload"), ("gradient_checkpointing", "off", False),
    ("init_lora_weights", "gaussian", "gaussian"), ("init_lora_weights", "true", True),
    ("resume_from_checkpoint", "true", True), ("resume_from_checkpoint", "auto", "auto"),
    ("resume_from_checkpoint", "out/checkpoint-5", "out/checkpoint-5"),
    ("target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]), ("target_modules", ["q_proj", "v_proj, k_proj"],
                                                                 ["q_proj", "v_proj", "k_proj"]),
    ("rank_pattern", "{q_proj: 8}", {"q_proj": 8}), ("rank_pattern", {"q_proj": "8"}, {"q_proj": 8}),
    ("data_output_dir", "none", "none"),  # a str field: 'none' is its own value (disables the cache)
    ("eval_data_path", "none", None), ("eval_data_path", "eval.jsonl", "eval.jsonl"), ("data_path", "none", "none"),
    ("wandb_run_name", 2024, "2024"), ("rdzv_id", "5", 5), ("nproc_per_node", "gpu", "gpu"),
])
def test_values_are_coerced_to_the_field_type(name, given, value):
    """The same rules for flag text and YAML values (PyYAML reads `1e-4` as a string)."""
    coerced = coerce(name, given)
    assert coerced == value and type(coerced) is type(value)


@pytest.mark.parametrize("name, given, message", [
    ("lora_r", "zero", "expected int"), ("lora_r", "2.5", "expected int"), ("learning_rate", True, "expected float"),
    ("lora_r", True, "expected int"), ("dry_run", "maybe", "expected bool"),
    ("lr_scheduler", "cosin", "(did you mean 'cosine'?)"), ("bnb_4bit_quant_type", "NF4", "'nf4' | 'fp4'"),
    ("rank_pattern", "{q_proj: x}", "expected dict[str, int] | None"), ("micro_batch_size", "big", "int | 'auto'"),
])
def test_values_that_do_not_fit_are_refused(name, given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        coerce(name, given)


def test_booleans_lists_and_spellings_on_the_command_line():
    assert config_from(*REQUIRED, "--dry-run").dry_run is True
    assert config_from(*REQUIRED, "--dry_run", "--no-dry-run").dry_run is False
    assert config_from(*REQUIRED, "--dry-run", "no").dry_run is False
    assert config_from(*REQUIRED, "--no_bf16").bf16 is False
    config = config_from(*REQUIRED, "--target-modules", "q_proj", "--target_modules", "v_proj,k_proj", "--lora_r", "8",
                         "--learning-rate", "1e-4", "--gradient-checkpointing", "--resume-from-checkpoint", "auto")
    assert config.target_modules == ["q_proj", "v_proj", "k_proj"] and config.lora_r == 8
    assert config.learning_rate == 1e-4 and config.gradient_checkpointing is True
    assert config.resume_from_checkpoint == "auto"


def test_yaml_values_are_coerced_and_flags_override_the_file(tmp_path):
    """The done-when case: `learning_rate: 1e-4` in YAML plus `--lora-alpha 8` is the Python call's config."""
    cfg = write(tmp_path / "run.yaml", "model-path: m\ndata_path: d.jsonl\nckpt_output_dir: out\n"
                                       "learning_rate: 1e-4\nlora_alpha: 16\nload_in_4bit: yes\n"
                                       "target_modules: [q_proj, v_proj]\n")
    assert config_from("-c", cfg, "--lora-alpha", "8") == LoraSFTConfig(
        "m", "d.jsonl", "out", learning_rate=1e-4, lora_alpha=8, load_in_4bit=True, target_modules=["q_proj", "v_proj"])


def test_yaml_problems_are_reported_all_at_once(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", "model_path: m\nlora_rank: 8\nlr_sheduler: cosine\ncallbacks: []\n")
    lines = errors(capsys, "lora-sft", "-c", cfg)
    assert lines == [f"training-hub: error: {cfg}: unknown parameter 'lora_rank' (did you mean 'lora_r'?)",
                     f"training-hub: error: {cfg}: unknown parameter 'lr_sheduler' (did you mean 'lr_scheduler'?)",
                     f"training-hub: error: {cfg}: TrainerCallback objects can only be passed to lora_sft from Python"]
    cfg = write(tmp_path / "run.yaml", "lora_r: 8\nlearning_rate: 1e-4\nlora-r: 16\nlearning_rate: 2\n")
    assert errors(capsys, "lora-sft", "-c", cfg) == [
        f"training-hub: error: {cfg} line 3: 'lora_r' is given twice (first at line 1)",
        f"training-hub: error: {cfg} line 4: 'learning_rate' is given twice (first at line 2)"]
    cfg = write(tmp_path / "run.yaml", "model_path: m\nlora_r: [8\n")
    assert errors(capsys, "lora-sft", "-c", cfg)[0].startswith(f"training-hub: error: {cfg} line 3: not valid YAML")
    cfg = write(tmp_path / "run.yaml", "lora_r: zero\nlearning_rate: true\n")
    assert errors(capsys, "lora-sft", "-c", cfg, "--lora-alpha", "x") == [
        f"training-hub: error: {cfg}: lora_r 'zero': expected int",
        f"training-hub: error: {cfg}: learning_rate True: expected float",
        "training-hub: error: --lora-alpha 'x': expected int",
        *[f"training-hub: error: {n} is required: give {flag(n)} or put it in the --config file"
          for n in ("model_path", "data_path", "ckpt_output_dir")]]
    assert errors(capsys, "lora-sft", "-c", str(tmp_path / "missing.yaml")) == [
        f"training-hub: error: --config {tmp_path / 'missing.yaml'}: no such file"]


def test_bad_flags_give_one_line_each_and_exit_2(capsys):
    assert errors(capsys, "lora-sft", "--lora-rr", "8", "--lerning-rate=1e-3") == [
        "training-hub: error: unknown flag --lora-rr (did you mean --lora-r?)",
        "training-hub: error: unknown flag --lerning-rate (did you mean --learning-rate?)"]
    assert errors(capsys, "lora-sft", "--learning", "1e-3") == [  # no prefix matching: a typo is not a flag
        "training-hub: error: unknown flag --learning (did you mean --learning-rate?)"]
    assert errors(capsys, "lora-sft", *REQUIRED, "--lora-r", "0") == [
        "training-hub: error: lora_r=0: must be a number > 0"]
    assert errors(capsys, "lora-sft", "--lora-r") == ["training-hub: error: argument --lora-r: expected one argument"]
    assert errors(capsys, "lora-sft", *REQUIRED, "--max-tokens-per-gpu", "4096") == [
        "training-hub: error: max_tokens_per_gpu=4096: token-budget batching (use sample_packing with "
        "micro_batch_size: a packed micro batch holds at most micro_batch_size x max_seq_len tokens) is not "
        "supported yet; leave it at None"]
    assert len(errors(capsys, "fine-tune")) == 1


def test_help_lines_come_from_the_parameter_reference(capsys):
    from training_hub.reference import cli_help

    with pytest.raises(SystemExit):
        main(["lora-sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LoRA: --lora-r N " + cli_help("lora_r") in text
    assert "--backend {auto,unsloth,peft}" in text and "--micro-batch-size {N,auto}" in text
    assert "Not supported yet (LoftQ initialisation" in text and "--lora_r N" not in text


def test_the_model_hub_unreachable_is_one_line():
    import httpx
    from huggingface_hub import errors as hub

    def raised_from(cause):
        try:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause
        except OSError as exc:
            return exc

    assert hub_problem(raised_from(hub.LocalEntryNotFoundError("no cache")), "Qwen/Q") == (
        "could not reach the model hub for 'Qwen/Q' (offline?): give a local folder")
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/x"))
    assert "neither a local folder nor a model on the hub" in hub_problem(
        raised_from(hub.RepositoryNotFoundError("404", response=response)), "Qwen/Q")
    assert hub_problem(raised_from(FileNotFoundError("data.jsonl")), "Qwen/Q") is None


def test_other_errors_are_one_line_or_the_traceback_on_request(capsys, monkeypatch):
    from training_hub import cli

    def broken(args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setitem(cli.COMMANDS, "merge", broken)
    assert errors(capsys, "merge", "b", "a", "o", code=1) == [
        "training-hub: error: RuntimeError: CUDA out of memory (--traceback shows where)"]
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(["merge", "b", "a", "o", "--traceback"])


def test_python_m_training_hub_version():
    from training_hub import __version__

    proc = subprocess.run([sys.executable, "-m", "training_hub", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"training-hub {__version__}"


def test_preview_shows_a_row_and_its_tokens(tiny_model_factory, tokenizer_factory, greeting_jsonl, capsys):
    from training_hub import prepare_dataset

    model = str(tiny_model_factory("qwen2", "chatml"))
    assert main(["preview", "--data", str(greeting_jsonl), "--model-path", model, "--row", "3", "--tokens",
                 "--data-output-dir", "none", "--max_seq_len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "48 of 48 rows kept" in out and "--- row 3 " in out and "[[Hello, Dave! Nice to meet you.<|im_end|>]]" in out
    row = prepare_dataset(str(greeting_jsonl), model_path=model, data_output_dir="none").dataset[3]
    table = [line.split()[:3] for line in out.split("  pos      id   label  text\n")[1].strip().splitlines()]
    assert table == [[str(i), str(t), str(label)] for i, (t, label) in enumerate(zip(row["input_ids"], row["labels"]))]
    assert errors(capsys, "preview", "--data", str(greeting_jsonl), "--model", model, "--row", "48",
                  "--data-output-dir", "none") == ["training-hub: error: --row 48: the data has rows 0 to 47"]


@pytest.mark.slow
def test_lora_sft_from_yaml_under_torchrun(tiny_model_factory, greeting_jsonl, tmp_path):
    """`torchrun -m training_hub lora-sft -c run.yaml --lora-alpha 8` with `learning_rate: 1e-4` in the file trains
    with the Python call's config; rank 0 alone prints the adapter line."""
    base, out = tiny_model_factory("qwen2", "chatml"), tmp_path / "out"
    cfg = write(tmp_path / "run.yaml", f"model_path: {base}\ndata_path: {greeting_jsonl}\nckpt_output_dir: {out}\n"
                                       "backend: peft\nlearning_rate: 1e-4\nmax_steps: 2\nsave_steps: 1000\n"
                                       "effective_batch_size: 4\ndata_output_dir: none\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "training_hub", "lora-sft",
           "-c", cfg, "--lora-alpha", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("adapter: ") == 1
    python_call = LoraSFTConfig(str(base), str(greeting_jsonl), str(out), backend="peft", learning_rate=1e-4,
                                lora_alpha=8, max_steps=2, save_steps=1000, effective_batch_size=4,
                                data_output_dir="none")
    manifest = json.loads((out / "run_config.json").read_text())
    assert manifest["config"] == json.loads(json.dumps(python_call.to_dict()))
    assert manifest["plan"]["world_size"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 8, 0.0)


def test_quickstart_refuses_zero_steps_before_writing_its_model(tmp_path):
    from training_hub.config import ConfigError
    from training_hub.quickstart import run_quickstart

    with pytest.raises(ConfigError, match="max_steps=0: the quickstart trains at least one step"):
        run_quickstart(output_dir=str(tmp_path / "qs"), max_steps=0, backend="peft")
    assert not (tmp_path / "qs").exists()
