"""Run under `torchrun --nproc-per-node 2` on the CPU (gloo): what two ranks of one node check without training.

1. Tokenizing once per node: the recipe's own read_data + plan_and_tokenize with a data cache; the local main
   process tokenizes first, the other reads its cache.
2. The parts of the FSDP2 route that run here. accelerate turns FSDP on only for GPU processes, so the Trainer's
   sharded route cannot train on the CPU. This shards a tiny PEFT model with PyTorch's own `fully_shard` (each
   decoder layer, then the root, as accelerate does), gathers the adapter with `training.gathered_adapter_state`
   and saves it as the sharded route does, and checks that accelerate still gives CPU processes plain DDP (the
   reason the CPU route is refused).
Usage: torchrun --standalone --nproc-per-node 2 tests/two_rank_job.py MODEL_DIR DATA_FILE OUT_DIR
Each rank prints one JSON line.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from training_hub import recipe
    from training_hub.config import LoraSFTConfig
    from training_hub.training import decoder_layer_classes, gathered_adapter_state

    model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    config = LoraSFTConfig(model_dir, data, str(out / "run"), backend="peft", data_output_dir=str(out / "cache"))
    prepared = recipe.plan_and_tokenize(config, recipe.read_data(config), "peft")  # starts the gloo process group
    if not dist.is_initialized():  # (it does; this keeps the checks below running when it does not)
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    frozen_total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    layers = decoder_layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters() if not p.requires_grad)
    gathered = gathered_adapter_state(model)
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=gathered, safe_serialization=True)
    dist.barrier()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    print(json.dumps({
        "rank": rank, "tokenized_from_cache": prepared.train.from_cache, "layers": layers, "frozen_share": local / frozen_total, "gathered_keys": len(gathered),
        "gathered_equal": bool(gathered) and all(torch.equal(gathered[k], before[k]) for k in before),
        "accelerate_cpu_distributed_type": str(accelerator.distributed_type),
        "accelerate_cpu_fsdp": accelerator.distributed_type == DistributedType.FSDP,
        "lora": {k: v.tolist() for k, v in before.items()} if rank == 0 else None}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
