"""Training with an evaluation set: the eval loss is computed every `eval_steps` and at the end, logged beside the
training loss (training_metrics.jsonl, the console, loss.png, and any tracker).

The eval file holds word pairs that never occur in the training file, so its loss measures generalisation
(the tiny model mostly memorises; a real model's eval loss follows its training loss). To hold out a share of
the training rows instead, pass `eval_split=0.1` and no eval_data_path.

    python examples/eval_set.py
    python examples/eval_set.py --model Qwen/Qwen2.5-0.5B-Instruct
"""

import json

from _shared import DATA, arguments, learning_rate, model_path

import training_hub

args = arguments("eval_set", __doc__)
result = training_hub.lora_sft(
    model_path=model_path(args),
    data_path=str(DATA / "opposites_train.jsonl"),
    eval_data_path=str(DATA / "opposites_eval.jsonl"),
    eval_steps=max(1, args.max_steps // 4),
    ckpt_output_dir=f"{args.output_dir}/adapter",
    backend=args.backend,
    max_steps=args.max_steps,
    learning_rate=learning_rate(args),
    effective_batch_size=8,
    max_seq_len=256,
    logging_steps=max(1, args.max_steps // 10),
    overwrite_output_dir=True,
)
rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
print(f"eval loss at each evaluation: {', '.join(f'{v:.3f}' for v in evals)}; curves in {result.output_dir / 'loss.png'}")
