"""Pictures: before/after sample grids (PNG, written atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .files import atomic_path


def _to_img(x: torch.Tensor):
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def save_before_after(path, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], row_labels: Sequence[str],
                      title: str = "", highlight_rows: Sequence[int] = ()) -> Path:
    """Two panels side by side; row i shows ``before[i]`` and ``after[i]`` (each [k, C, H, W])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = len(before), before[0].shape[0]
    fig, axes = plt.subplots(rows, 2 * k + 1, figsize=(0.55 * (2 * k + 1), 0.6 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for j in range(2 * k + 1):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j == k:
                continue
            img = _to_img(before[r][j] if j < k else after[r][j - k - 1])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            if r in highlight_rows:
                for s in ax.spines.values():
                    s.set_visible(True)
                    s.set_color("red")
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    axes[0][k // 2].set_title("before", fontsize=9)
    axes[0][k + 1 + k // 2].set_title("after", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
