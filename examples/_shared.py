"""What every example shares: its command-line flags and the built-in tiny model (built offline, no download).

Each example runs as is on a CPU in a minute or two with the tiny model; `--model` fine-tunes a real one instead
(a local folder or a hub id), `--max-steps` sets the length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def arguments(name: str, description: str, max_steps: int = 60) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="model folder or hub id to fine-tune (default: a tiny model built offline)")
    parser.add_argument("--output-dir", default=f"examples-output/{name}", help="where the run writes (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, help="default: 2e-3 for the tiny model, 2e-4 for --model")
    parser.add_argument("--backend", choices=["auto", "unsloth", "peft"], default="auto")
    return parser.parse_args()


def model_path(args: argparse.Namespace) -> str:
    """`--model`, or the tiny Qwen2-architecture model the quickstart uses (built once per output folder)."""
    if args.model:
        return args.model
    from training_hub.quickstart import build_default_model

    folder = Path(args.output_dir) / "tiny-base-model"
    if not (folder / "config.json").is_file():
        build_default_model(folder)
    return str(folder)


def learning_rate(args: argparse.Namespace) -> float:
    """--learning-rate, else: the tiny random model needs a high rate to learn in a few steps; a real model the
    usual LoRA rate."""
    if args.learning_rate is not None:
        return args.learning_rate
    return 2e-4 if args.model else 2e-3
