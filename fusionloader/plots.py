"""PNG output for the CLI: image grids (PIL only) and stats/benchmark charts (matplotlib, lazily imported)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["bar_chart", "image_grid", "save_loader_plot"]


def image_grid(rows: Sequence[Sequence[torch.Tensor]], path: str, cell: int = 96, labels: Sequence[str] = ()) -> str:
    """Save a grid of float [0, 1] (3, H, W) images, ``rows[r][c]``, each cell resized to ``cell`` px.

    ``labels`` names the columns (a header strip); the file is written at ``path`` and returned.
    """
    from PIL import Image, ImageDraw

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    header = 16 if labels else 0
    grid = Image.new("RGB", (n_cols * cell, n_rows * cell + header), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(labels):
        draw.text((c * cell + 3, 2), str(text), fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (c * cell, header + r * cell))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training boxes
    import matplotlib.pyplot as plt

    return plt


def save_loader_plot(per_epoch: dict, accuracy: dict[str, Sequence[float]], path: str) -> str:
    """Two panels: what each epoch delivered (real / fresh / reused / fallback) and test accuracy per epoch."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = sorted(per_epoch)
    bottom = np.zeros(len(epochs))
    for kind, color in (("real", "#4c72b0"), ("fresh", "#55a868"), ("reused", "#dd8452"), ("fallback", "#c44e52")):
        values = np.array([per_epoch[e][kind] for e in epochs], dtype=float)
        left.bar(epochs, values, bottom=bottom, label=kind, color=color)
        bottom += values
    stall = max(100 * per_epoch[e]["stall_fraction"] for e in epochs)
    left.set_xlabel("epoch")
    left.set_ylabel("samples")
    left.set_title(f"delivered samples per epoch (worst stall {stall:.1f}% of epoch time)", fontsize=9)
    left.legend(fontsize=8)
    for name, values in accuracy.items():
        right.plot(range(len(values)), [100 * v for v in values], marker="o", label=name)
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.set_title("classifier test accuracy")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart(panels: dict[str, dict[str, float]], path: str, title: str = "") -> str:
    """One horizontal bar panel per entry of ``panels`` (panel title -> {bar label: value})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        labels = list(bars)
        ax.barh(labels, [bars[k] for k in labels], color="#4c72b0")
        ax.set_title(name, fontsize=10)
        ax.invert_yaxis()
        for i, k in enumerate(labels):
            ax.text(bars[k], i, f" {bars[k]:.3g}", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
