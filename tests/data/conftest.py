"""Helpers for the data tests: write rows in each file type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def write_rows(tmp_path):
    """Return a function (rows, name) -> path of a .jsonl/.json/.csv/.parquet file holding the rows."""

    def write(rows: list, name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        elif name.endswith(".json"):
            path.write_text(json.dumps(rows))
        elif name.endswith(".csv"):
            import csv

            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        elif name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    return write
