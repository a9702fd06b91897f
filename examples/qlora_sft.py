"""QLoRA: the base model's weights are loaded in 4 bits (bitsandbytes NF4), the LoRA weights train in 16 bits.

On a GPU this cuts the weights' memory about 3.5x (an 8B model trains in ~6.4 GiB). On a CPU, bitsandbytes'
4-bit kernels work with the plain transformers + PEFT backend, which this example then uses.

    python examples/qlora_sft.py
    python examples/qlora_sft.py --model Qwen/Qwen2.5-7B-Instruct --max-steps 500     # on a GPU
"""

from _shared import arguments, learning_rate, model_path

import torch

import training_hub
from training_hub.quickstart import bundled_dataset

args = arguments("qlora_sft", __doc__)
backend = args.backend if torch.cuda.is_available() or args.backend != "auto" else "peft"
result = training_hub.lora_sft(
    model_path=model_path(args),
    data_path=str(bundled_dataset()),
    ckpt_output_dir=f"{args.output_dir}/adapter",
    backend=backend,
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    max_steps=args.max_steps,
    learning_rate=learning_rate(args),
    effective_batch_size=8,
    max_seq_len=256,
    logging_steps=max(1, args.max_steps // 10),
    overwrite_output_dir=True,
)
print(f"QLoRA adapter in {result.adapter_path} (load it on the 16-bit base, or merge: see merge_and_generate.py)")
