"""Fine-tune with LoRA on every GPU of one or several nodes (docs/distributed.md).

    torchrun --nproc-per-node 8 examples/train_distributed.py --model M --data train.jsonl --out out
    python examples/train_distributed.py --nproc-per-node 8 --model M --data train.jsonl --out out
    python examples/train_distributed.py --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 ...

Under torchrun, leave the launch flags out: torchrun has already started the processes.
"""

import argparse

from training_hub import lora_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--nproc-per-node", default=None, help="a number, 'auto' or 'gpu' (self-launch)")
    parser.add_argument("--nnodes", type=int, default=None)
    parser.add_argument("--node-rank", type=int, default=None)
    parser.add_argument("--rdzv-endpoint", default=None, help="host:port of node 0")
    parser.add_argument("--rdzv-id", default=None)
    args = parser.parse_args()
    nproc = args.nproc_per_node
    result = lora_sft(args.model, args.data, args.out, effective_batch_size=64,
                      nproc_per_node=int(nproc) if nproc and nproc.isdigit() else nproc, nnodes=args.nnodes,
                      node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                      resume_from_checkpoint="auto")
    if result.metrics:  # empty on nodes other than global rank 0's when self-launched
        print(f"train loss {result.metrics['train_loss']:.4f}, adapter in {result.adapter_path}")


if __name__ == "__main__":
    main()
