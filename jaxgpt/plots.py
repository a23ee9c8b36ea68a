"""Loss-curve PNG of a training history (matplotlib's Agg canvas: no display, no global state)."""

from __future__ import annotations

import math
import os

from jaxgpt.atomic import atomic_file


def plot_history(history: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Draws training and validation loss against the step and writes a PNG atomically.

    Args:
      history: records as returned by `jaxgpt.train.fit` (`step`, `loss`, optional `val_loss`).
      path: destination `.png` (replaced only once the new image is complete).
      title: optional title.

    Raises:
      ValueError: the history holds no loss record.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if not train and not val:
        raise ValueError("the training history has no loss to plot")
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="training (batch loss)", color="tab:blue", linewidth=1.2, alpha=0.85)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=3.5, linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    # A second axis in bits/char: the same curve, another unit.
    secondary = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
    secondary.set_ylabel("bits/char")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
