"""The `training-hub` command. Its `train` options are derived from LoraSFTConfig, field for field.

    training-hub quickstart [--model PATH_OR_ID] [--output-dir DIR]
    training-hub train --config run.yaml [--lora_r 32 ...]     (flags override the YAML file)
    training-hub preview --data train.jsonl --model PATH [--num-examples 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .checkpoints import TrainingStopped
from .config import PARAMETER_NAMES, ConfigError, LoraSFTConfig, check_parameter_names
from .reference import cli_help

# Parameters that only make sense from Python.
PYTHON_ONLY = {"callbacks"}


def parse_value(text: str) -> Any:
    """Command-line values are read as YAML scalars/lists: 16 -> int, true -> bool, [q_proj, v_proj] -> list."""
    import yaml

    return yaml.safe_load(text)


def _unique_key_loader(path: str):
    """A yaml.SafeLoader that refuses a mapping naming a key twice (PyYAML keeps the last value silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError([f"--config {path}:{line}: {key!r} is given twice (first on line {seen[key]}); keep one"])
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def read_config_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"--config {path}: no such file"])
    try:
        values = yaml.load(p.read_text(), Loader=_unique_key_loader(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"--config {path}: not valid YAML ({exc})"]) from exc
    if not isinstance(values, dict):
        raise ConfigError([f"--config {path}: expected a mapping of parameter: value"])
    try:
        check_parameter_names("config file " + path, values, [n for n in PARAMETER_NAMES if n not in PYTHON_ONLY])
    except TypeError as exc:
        raise ConfigError([str(exc).replace("got an unexpected keyword argument", "has an unknown parameter")]) from exc
    return values


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="fine-tune from a YAML file and/or flags (every lora_sft parameter)")
    train.add_argument("--config", help="YAML file of lora_sft parameters")
    for f in dataclasses.fields(LoraSFTConfig):
        if f.name not in PYTHON_ONLY:
            train.add_argument(f"--{f.name}", type=parse_value, default=argparse.SUPPRESS, help=cli_help(f.name))


def run_train(args: argparse.Namespace) -> int:
    from .recipe import run

    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in PARAMETER_NAMES})
    missing = [n for n in ("model_path", "data_path", "ckpt_output_dir") if n not in values]
    if missing:
        raise ConfigError([f"{n} is required (in --config or as --{n})" for n in missing])
    result = run(LoraSFTConfig(**values))
    print(f"adapter: {result.adapter_path}")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from .api import prepare_dataset
    from .data import format_example, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    prepared = prepare_dataset(args.data, tokenizer=tokenizer, max_seq_len=args.max_seq_len,
                               dataset_type=args.dataset_type, train_on_inputs=args.train_on_inputs)
    print(prepared.summary)
    for i in range(min(args.num_examples, len(prepared.dataset))):
        row = prepared.dataset[i]
        print(f"\n--- example {i} (trained text between [[ and ]]) ---")
        print(format_example(row["input_ids"], row["labels"], tokenizer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training-hub", description="LoRA/QLoRA fine-tuning in one call.")
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="train a tiny model offline on bundled data (about a minute on a CPU)")
    quick.add_argument("--model", help="a model folder or hub id to fine-tune instead of the built-in tiny model")
    quick.add_argument("--output-dir", default="quickstart-output")
    quick.add_argument("--max-steps", type=int, default=600)
    quick.add_argument("--backend", choices=["auto", "unsloth", "peft"], default="auto")
    add_train_parser(sub)
    preview = sub.add_parser("preview", help="show how a dataset is tokenized and which tokens carry loss")
    preview.add_argument("--data", required=True)
    preview.add_argument("--model", required=True, help="model folder or hub id whose tokenizer to use")
    preview.add_argument("--max-seq-len", type=int, default=2048)
    preview.add_argument("--dataset-type", default="auto")
    preview.add_argument("--train-on-inputs", action="store_true")
    preview.add_argument("--num-examples", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            from .quickstart import run_quickstart

            return run_quickstart(args.model, args.output_dir, args.max_steps, args.backend)
        if args.command == "train":
            return run_train(args)
        return run_preview(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # ConfigError and DataError are ValueErrors
        print(f"training-hub: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # SIGTERM/SIGINT (a checkpoint was saved) or divergence
        print(f"training-hub: stopped: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
