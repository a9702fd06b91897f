"""A plain `python` script that calls lora_sft, which launches its own workers; prints a JSON summary last.

Usage: python tests/distributed_job.py '{"model_path": ..., "nproc_per_node": 2, ...}'
Test-only keys: "_pid_file": path (each worker appends its pid), "_fail": {"rank", "step", "kill"} (a rank
raises, or SIGKILLs itself after saving that step), "_in_memory": true (data_path is read here and passed as
a list of dicts). No `if __name__ == "__main__"` guard on purpose: the workers must not re-run this script.
"""

import json
import signal
import sys
import time

from distributed_callbacks import FailOnRank, RecordPid

import training_hub

kwargs = json.loads(sys.argv[1])
callbacks = []
if "_pid_file" in kwargs:
    callbacks.append(RecordPid(kwargs.pop("_pid_file")))
if "_fail" in kwargs:
    callbacks.append(FailOnRank(**kwargs.pop("_fail")))
if kwargs.pop("_in_memory", False):
    with open(kwargs["data_path"]) as f:
        kwargs["data_path"] = [json.loads(line) for line in f if line.strip()]
start = time.time()
try:
    result = training_hub.lora_sft(**kwargs, callbacks=callbacks or None)
except Exception as exc:
    print(json.dumps({"error_type": type(exc).__name__, "error": str(exc), "seconds": time.time() - start,
                      "handlers_restored": signal.getsignal(signal.SIGINT) is signal.default_int_handler}))
    sys.exit(1)
model, tokenizer = (None, None) if not result.metrics else result.load_model() if result.model is None else (result.model, None)
print(json.dumps({"metrics": result.metrics, "plan": result.plan, "output_dir": str(result.output_dir),
                  "loaded_model": type(model).__name__, "seconds": time.time() - start,
                  "handlers_restored": signal.getsignal(signal.SIGINT) is signal.default_int_handler}))
