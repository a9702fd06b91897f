"""Train, fold the adapter into the base (a plain 16-bit model that vLLM or transformers serve without PEFT),
and generate with both the adapter and the merged model. `save_merged=True` merges at the end of training (into
ckpt_output_dir/merged); `training_hub.merge_adapter(base, adapter, out)` does the same for any saved adapter.

    python examples/merge_and_generate.py
    python examples/merge_and_generate.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200
"""

from _shared import arguments, learning_rate, model_path

import torch

import training_hub
from training_hub.quickstart import bundled_dataset

QUESTION = "What is the opposite of hot?"


def answer(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


args = arguments("merge_and_generate", __doc__)
base = model_path(args)
result = training_hub.lora_sft(model_path=base, data_path=str(bundled_dataset()), ckpt_output_dir=f"{args.output_dir}/adapter",
                               backend=args.backend, max_steps=args.max_steps, learning_rate=learning_rate(args),
                               effective_batch_size=8, max_seq_len=256, logging_steps=max(1, args.max_steps // 10),
                               save_merged=True, overwrite_output_dir=True)

model, tokenizer = training_hub.load(result.adapter_path)  # base + adapter, through PEFT
print(f"adapter: {answer(model, tokenizer)}")

merged = result.output_dir / "merged"
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402  (after training: Unsloth comes first)

merged_model = AutoModelForCausalLM.from_pretrained(merged)
print(f"merged ({merged}): {answer(merged_model, AutoTokenizer.from_pretrained(merged))}")
