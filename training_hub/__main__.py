"""`python -m training_hub COMMAND ...`, the form torchrun launches: `torchrun --nproc-per-node 2 -m training_hub lora-sft ...`."""

import sys

from .cli import main

sys.exit(main())
