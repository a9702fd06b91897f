"""Supervised fine-tuning on Alpaca data (`instruction`, optional `input`, `output` per line).

The rows are rendered with the model's chat template (instruction and input as the user turn, output as the
assistant turn); the loss is taken on the output only.

    python examples/alpaca_sft.py
    python examples/alpaca_sft.py --model Qwen/Qwen2.5-0.5B-Instruct
"""

from _shared import DATA, arguments, learning_rate, model_path

import training_hub

args = arguments("alpaca_sft", __doc__)
result = training_hub.lora_sft(
    model_path=model_path(args),
    data_path=str(DATA / "opposites_alpaca.jsonl"),
    ckpt_output_dir=f"{args.output_dir}/adapter",
    dataset_type="alpaca",  # detected anyway; stated so that a file in another format is an error, not a guess
    backend=args.backend,
    max_steps=args.max_steps,
    learning_rate=learning_rate(args),
    effective_batch_size=8,
    max_seq_len=256,
    logging_steps=max(1, args.max_steps // 10),
    overwrite_output_dir=True,
)
print(f"trained on {result.data_summary['rows_out']} rows; adapter in {result.adapter_path}")
