#!/usr/bin/env bash
# Two data-parallel processes on this machine (CPU: gloo; GPUs: NCCL), with the tiny offline model.
# Extra flags go to torchrun_sft.py, e.g.: bash examples/torchrun.sh --max-steps 20 --backend peft
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-examples-output/torchrun_sft}"
python="${PYTHON:-python}"
model="$("$python" "$here/make_tiny_model.py" "$out/tiny-base-model" | tail -1)"
"$python" -m torch.distributed.run --nproc-per-node "${NPROC:-2}" "$here/torchrun_sft.py" --model "$model" \
  --learning-rate 2e-3 --output-dir "$out" "$@"
