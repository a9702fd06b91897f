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


# Solid-colour images and chats that name the colour: a tiny vision-language model learns the answer's pattern.
COLORS = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}


def write_color_images(folder: Path) -> dict[str, Path]:
    """One small PNG per colour in ``folder`` (sizes differ from the processor's, so it resizes and crops)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rgb in COLORS.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (20, 24), rgb).save(paths[name])
    return paths


def color_conversations(images: dict[str, Path], n: int = 24) -> list[dict]:
    """Image chats: the user shows one colour image and asks; the assistant names the colour."""
    names = list(images)
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(images[names[i % len(names)]])},
                                     {"type": "text", "text": "What colour is this?"}]},
        {"role": "assistant", "content": f"It is {names[i % len(names)]}."}]} for i in range(n)]
