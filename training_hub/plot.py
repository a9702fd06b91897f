"""loss.png: the training loss, the evaluation loss and the learning rate of a run, from its metrics file.

Drawn with matplotlib's object API on a `Figure` (the Agg renderer; pyplot and the process-wide backend are never
touched), imported only when a plot is drawn. Rows carrying a "phase" key (a run in several phases) get one
curve per phase and a dashed line where each later phase starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .outputs import LOSS_PLOT, MANIFEST_FILE, METRICS_FILE



def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(row["step"], float(row[key])) for row in rows
            if isinstance(row.get(key), (int, float)) and isinstance(row.get("step"), int)]


def _phases(rows: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """Rows grouped by phase in order of appearance. A phase whose steps start again from 1 (each phase of a
    two-phase run counts its own optimizer steps) is drawn after the one before it: its steps are shifted."""
    order: list[str | None] = []
    for row in rows:
        if row.get("phase") not in order:
            order.append(row.get("phase"))
    grouped, last_step = [], 0
    for phase in order:
        phase_rows = [r for r in rows if r.get("phase") == phase]
        steps = [r["step"] for r in phase_rows if isinstance(r.get("step"), int)]
        shift = last_step if steps and min(steps) <= last_step else 0
        grouped.append((phase, [{**r, "step": r["step"] + shift} if isinstance(r.get("step"), int) else r
                                for r in phase_rows]))
        last_step = max(steps, default=0) + shift
    return grouped


def plot_loss(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the run in `output_dir` (its training_metrics.jsonl) to `path` (default: output_dir/loss.png).

    Train loss and eval loss on the left axis, the learning rate on the right one, the optimizer step along
    the bottom. Returns the picture's path. Safe to call again at any time, also while the run is training.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .checkpoints import read_metric_rows

    out = Path(output_dir)
    metrics_file = out / METRICS_FILE
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist: point plot_loss to a lora_sft output folder")
    rows = [row for row in read_metric_rows(metrics_file) if "train_loss" not in row]  # not the end-of-run summary
    target = Path(path) if path is not None else out / LOSS_PLOT

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    phases = _phases(rows)
    for index, (phase, phase_rows) in enumerate(phases):
        suffix = f" ({phase})" if phase is not None else ""
        for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
            points = _series(phase_rows, key)
            if points:
                ax.plot(*zip(*points), style, color=f"C{2 * index + (key == 'eval_loss')}", label=label + suffix,
                        markersize=4, linewidth=1.5)
        if index and phase_rows:
            ax.axvline(phase_rows[0]["step"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = [point for _, phase_rows in phases for point in _series(phase_rows, "learning_rate")]
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        right = ax.twinx()
        line = right.plot(*zip(*lr), color="grey", linewidth=1, alpha=0.7, label="learning rate")
        right.set_ylabel("learning rate")
        right.set_ylim(bottom=0)
        right.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        handles, labels = handles + line, labels + ["learning rate"]
    if handles:
        ax.legend(handles, labels, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(_title(out), fontsize=10)
    tmp = target.with_name(target.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, target)
    return target


def _title(out: Path) -> str:
    import json


    try:
        config = json.loads((out / MANIFEST_FILE).read_text())["config"]
        return f"{config['model_path']}: LoRA r {config['lora_r']}, lr {config['learning_rate']:g}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(out)
