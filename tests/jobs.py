"""What the end-to-end tests share: one lora_sft job in a fresh process (tests/e2e_job.py; `import unsloth`
patches the process it is imported in) and readers of what the job wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("e2e_job.py")
JOB_TIMEOUT_S = 600


def run_job(expect_ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `lora_sft(**kwargs)` in a new process (test-only keys: see e2e_job.py); assert it succeeded unless told."""
    proc = subprocess.run([sys.executable, str(JOB), json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train(**kwargs) -> dict:
    """Run a job that must succeed; returns its summary (metrics, plan, data_summary, unsloth_imported)."""
    return json.loads(run_job(**kwargs).stdout.strip().splitlines()[-1])


def train_under_torchrun(nproc: int = 1, **kwargs) -> dict:
    """Run `lora_sft(**kwargs)` in a torchrun launch of `nproc` processes (e2e_job.py in each) that must succeed;
    returns the summary printed last."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(JOB),
               json.dumps(kwargs)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metric_rows(out) if "loss" in row]
