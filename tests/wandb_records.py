"""Read the history of an offline wandb run from its `run-*.wandb` file (test helper).

wandb 0.31 writes an offline run only as this binary record file (no wandb-summary.json, and the Python reader
of earlier versions is gone). The file is a 7-byte wandb header, then LevelDB-log blocks of 32 KiB: each chunk
has a 7-byte header (crc32, length, type: full / first / middle / last) and a piece of one serialized
`wandb_internal_pb2.Record`; a history record holds each logged value as JSON text.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

FILE_HEADER = 7  # ":W&B", magic 0xBEE1, version
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record file"
    out, pending, pos = [], b"", FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        piece = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            out.append(piece)
        elif kind == FIRST:
            pending = piece
        elif kind == MIDDLE:
            pending += piece
        elif kind == LAST:
            out.append(pending + piece)
    return out


def history(run_folder: Path) -> list[dict]:
    """Every logged history row of the run in `run_folder` (wandb/offline-run-*), values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_folder).glob("run-*.wandb")
    rows = []
    for blob in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows
