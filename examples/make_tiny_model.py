"""Build the tiny offline model the examples use into a folder (for the shell examples): python examples/make_tiny_model.py DIR"""

import sys
from pathlib import Path

from training_hub.quickstart import build_default_model

folder = Path(sys.argv[1])
if not (folder / "config.json").is_file():
    build_default_model(folder)
print(folder)
