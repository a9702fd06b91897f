"""Data-parallel training on several GPUs (or CPU processes): the same script under torchrun. Each process trains a
full copy on its share of every batch; effective_batch_size counts all processes; only rank 0 writes and prints.

    bash examples/torchrun.sh                                     # 2 CPU processes, tiny model
    torchrun --nproc-per-node 8 examples/torchrun_sft.py --model Qwen/Qwen2.5-7B-Instruct --max-steps 500

Every rank must see the same --model folder (torchrun.sh builds the tiny one once, before launching).
"""

from _shared import arguments, learning_rate

import training_hub
from training_hub.quickstart import bundled_dataset

args = arguments("torchrun_sft", __doc__)
if not args.model:
    raise SystemExit("torchrun_sft.py: give --model (torchrun.sh builds the tiny model and passes it)")
result = training_hub.lora_sft(
    model_path=args.model,
    data_path=str(bundled_dataset()),
    ckpt_output_dir=f"{args.output_dir}/adapter",
    backend=args.backend,
    max_steps=args.max_steps,
    learning_rate=learning_rate(args),
    effective_batch_size=8,  # = micro batch x accumulation x processes
    max_seq_len=256,
    logging_steps=max(1, args.max_steps // 10),
    overwrite_output_dir=True,
)
if result.model is not None and result.trainer.is_world_process_zero():
    print(f"{result.plan['world_size']} processes; adapter in {result.adapter_path}")
