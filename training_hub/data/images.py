"""Image parts of chat messages (vision-language models): read, checked up front, and opened for the processor.

A part is ``{"type": "image", "image": SOURCE}`` or OpenAI's ``{"type": "image_url", "image_url": {"url":
SOURCE}}``, where SOURCE is a local file path (relative paths are read from the current directory) or a
``data:image/...;base64,...`` URL. Both are normalized to the first shape, and every image is decoded once
when the data is read, so a missing or unreadable file is reported with its row before a model is loaded.
Pillow is imported only inside the functions that open images.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from .turns import RowProblem

IMAGE_PARTS = ("image", "image_url")
DATA_URL_PREFIX = "data:image/"
EXAMPLE_PART = '{"type": "image", "image": "photos/cat.png"}'


def image_source(part: dict, where: str) -> str:
    """The path or data URL an image part names, in either accepted shape."""
    if part["type"] == "image":
        source = part.get("image")
    else:
        url = part.get("image_url")
        source = url.get("url") if isinstance(url, dict) else url
    if not isinstance(source, str) or not source.strip():
        raise RowProblem(f"{where} is an image part without a path or data URL; write it as {EXAMPLE_PART} or "
                         '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')
    if "://" in source and not source.startswith("file://"):
        raise RowProblem(f"{where} names the image {source[:60]!r}: only local files and data:image/ URLs are read "
                         "(nothing is downloaded); save the image locally and give its path")
    return source.removeprefix("file://")


def open_image(source: str):
    """The image as an RGB ``PIL.Image`` (decoded in full). Raises OSError/ValueError when it cannot be read."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError('reading images needs Pillow: pip install pillow (or the "vision" extra)') from None

    if source.startswith(DATA_URL_PREFIX):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data URL must be base64-encoded (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise ValueError(f"its base64 payload is invalid ({error})") from None
        image = Image.open(io.BytesIO(data))
    else:
        image = Image.open(Path(source))
    image.load()
    return image.convert("RGB")


def parse_image_part(part: dict, where: str) -> dict:
    """A checked image part in the normalized shape ``{"type": "image", "image": SOURCE}``."""
    source = image_source(part, where)
    shown = source if len(source) <= 80 else source[:60] + "..."
    if not source.startswith(DATA_URL_PREFIX) and not Path(source).is_file():
        raise RowProblem(f"{where}: the image file {shown!r} does not exist (relative paths are read from the "
                         f"current directory, {Path.cwd()}); fix the path or drop the row")
    try:
        open_image(source)
    except (OSError, ValueError) as error:
        raise RowProblem(f"{where}: the image {shown!r} cannot be read ({error}); replace the file or drop the "
                         "row") from None
    return {"type": "image", "image": source}


def message_images(messages: list[Any]) -> list[str]:
    """The image sources of a conversation, in order."""
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "image"]


def content_text(content: str | list[dict]) -> str:
    """A message's text: the content itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")
