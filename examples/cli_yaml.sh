#!/usr/bin/env bash
# The command line with a YAML file: builds the tiny offline model, then trains with examples/lora_sft.yaml.
# Extra flags override the file, e.g.: bash examples/cli_yaml.sh --max_steps 4 --backend peft
set -euo pipefail
cd "$(dirname "$0")/.."  # the YAML's paths are relative to the repository root
python="${PYTHON:-python}"
out="${OUT:-examples-output/cli_yaml}"
"$python" examples/make_tiny_model.py "$out/tiny-base-model" >/dev/null
"$python" -m training_hub.cli train --config examples/lora_sft.yaml \
  --model_path "$out/tiny-base-model" --ckpt_output_dir "$out/adapter" "$@"
