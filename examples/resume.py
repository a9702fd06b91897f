"""Resuming: a run continues from its newest complete checkpoint (adapter, optimizer, scheduler, RNG, data order),
ending where an uninterrupted run would. Here the first call trains half the steps; the second continues the same
run in the same folder to the full length. After a crash, a SIGTERM or Ctrl-C it is the same second call.

    python examples/resume.py
    python examples/resume.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200
"""

from _shared import arguments, learning_rate, model_path

import training_hub
from training_hub.quickstart import bundled_dataset

args = arguments("resume", __doc__)
half = max(1, args.max_steps // 2)
settings = dict(model_path=model_path(args), data_path=str(bundled_dataset()), ckpt_output_dir=f"{args.output_dir}/adapter",
                backend=args.backend, learning_rate=learning_rate(args), effective_batch_size=8, max_seq_len=256,
                save_steps=half, logging_steps=max(1, args.max_steps // 10))

first = training_hub.lora_sft(**settings, max_steps=half, overwrite_output_dir=True)
print(f"first call: stopped at step {first.metrics['global_step']}")
# Only the length and the save/log settings may change on resume; anything else is refused with the reason.
second = training_hub.lora_sft(**settings, max_steps=args.max_steps, resume_from_checkpoint=True)
print(f"second call: continued from checkpoint-{half} to step {second.metrics['global_step']}; "
      f"train loss over the whole run {second.metrics['train_loss']:.3f}")
