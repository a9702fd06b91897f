"""Small learnable datasets shared by the tests (importable as `sample_data`)."""

from __future__ import annotations

import json
from pathlib import Path

# A learnable pattern: the answer repeats the name in a fixed sentence, so a tiny model's loss falls fast.
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]


def greeting_conversations(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Greet {name}."},
                    {"role": "assistant", "content": f"Hello, {name}! Nice to meet you."},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
