"""Run one lora_sft job in a fresh process and print a JSON summary on the last line.

End-to-end tests call this through subprocess because `import unsloth` patches the whole process
(TrainingArguments, SFTTrainer): a plain-PEFT run must never share a process with an Unsloth run.
Usage: python tests/e2e_job.py '{"model_path": ..., "data_path": ..., "ckpt_output_dir": ..., ...}'
"""

import json
import sys


def main() -> None:
    kwargs = json.loads(sys.argv[1])
    import training_hub

    result = training_hub.lora_sft(**kwargs)
    print(json.dumps({"metrics": result.metrics, "plan": result.plan, "data_summary": result.data_summary,
                      "unsloth_imported": "unsloth" in sys.modules}))


if __name__ == "__main__":
    main()
