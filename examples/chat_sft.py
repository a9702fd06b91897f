"""Supervised fine-tuning on chat data (`{"messages": [{"role": ..., "content": ...}, ...]}` per line).

    python examples/chat_sft.py                                  # tiny model, offline
    python examples/chat_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200
"""

from _shared import arguments, learning_rate, model_path

import training_hub
from training_hub.quickstart import bundled_dataset

args = arguments("chat_sft", __doc__)
result = training_hub.lora_sft(
    model_path=model_path(args),
    data_path=str(bundled_dataset()),  # 240 chat rows; loss only on the assistant's tokens
    ckpt_output_dir=f"{args.output_dir}/adapter",
    backend=args.backend,
    max_steps=args.max_steps,
    learning_rate=learning_rate(args),
    lora_r=16,
    lora_alpha=32,
    effective_batch_size=8,
    max_seq_len=256,
    logging_steps=max(1, args.max_steps // 10),
    overwrite_output_dir=True,  # an example folder: running it again replaces it
)
print(f"train loss {result.metrics['train_loss']:.3f}; adapter, loss.png and README.md in {result.adapter_path}")
