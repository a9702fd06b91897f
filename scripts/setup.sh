#!/usr/bin/env bash
# Creates .venv with training_hub and its CPU training stack, as it must be installed on this machine
# kind (see README "Installing"): torch pinned to the local CPU build, Unsloth 2026.10.9 (the only
# release that trains on a CPU) installed with --no-deps because the registry's certifi lags behind
# what it declares, no torchvision/triton/xformers. Safe to run twice: it does nothing when the venv
# is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TRAINING_HUB_VENV:-.venv}
stamp="$venv/.training_hub_setup_v4"
if [ -f "$stamp" ]; then exit 0; fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# The distribution was renamed training-hub-lora (the index's training-hub is the reference package, which
# provides the same `training_hub` module): remove a package installed under the old name first.
"$venv/bin/python" -m pip uninstall -q -y training-hub 2>/dev/null || true
"$venv/bin/python" -m pip install -q -c scripts/constraints-cpu.txt -e ".[unsloth-deps,dev,tensorboard,wandb,mlflow,vision]"
"$venv/bin/python" -m pip install -q --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9 cut_cross_entropy==25.1.1
"$venv/bin/python" - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision", "triton") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"setup: {bad} got installed; they break Unsloth on a CPU-only torch. Remove them.")
PY
touch "$stamp"
