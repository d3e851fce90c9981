"""Pictures, written as PNG atomically: before/after sample grids (``demo``, ``evaluate``) and the benchmark's
plots (``bench``). matplotlib is imported when a picture is drawn, not when fastunlearn is."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .files import atomic_path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int = 110, **savefig_kwargs) -> Path:
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
    _pyplot().close(fig)
    return path


def _to_img(x: torch.Tensor):
    """[C, H, W] in [-1, 1] -> an array in [0, 1] for imshow ([H, W] for one channel)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def save_before_after(path, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], row_labels: Sequence[str],
                      title: str = "", highlight_rows: Sequence[int] = ()) -> Path:
    """Two panels side by side; row i shows ``before[i]`` and ``after[i]`` (each [k, C, H, W])."""
    plt = _pyplot()
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
    return _save(fig, path, bbox_inches="tight")


def save_samples(path, rows: Sequence[torch.Tensor], row_labels: Sequence[str], title: str = "") -> Path:
    """One row of samples per entry of ``rows`` (each [k, C, H, W]); for a model with nothing to compare with."""
    plt = _pyplot()
    k = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(0.55 * k, 0.6 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        for j in range(k):
            ax = axes[r][j]
            ax.axis("off")
            if j < row.shape[0]:
                ax.imshow(_to_img(row[j]), cmap="gray", vmin=0, vmax=1)
        axes[r][0].text(-0.2, 0.5, row_labels[r], transform=axes[r][0].transAxes, ha="right", va="center",
                        fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, bbox_inches="tight")


def save_evaluation_picture(path, grid: Optional[dict], method: Optional[str]) -> Optional[Path]:
    """``evaluate``'s picture: ``grid`` holds rows of samples ("before" may be None, "after", "labels",
    "highlight": the rows of the forgotten target); None when there is nothing to draw."""
    if grid is None:
        return None
    name = method or "model"
    if grid["before"] is not None:
        return save_before_after(path, grid["before"], grid["after"], grid["labels"],
                                 title=f"{name}: samples before and after unlearning (same seeds)",
                                 highlight_rows=grid["highlight"])
    return save_samples(path, grid["after"], grid["labels"], f"{name}: samples (no base model to compare with)")


def plot_bench(doc, path, settings: Sequence[str], forget_class: int) -> Path:
    """The benchmark's plot: forget measure against retained quality (one point per model), and wall time,
    per setting ("class": forget one digit, "data": forget one memorised image)."""
    plt = _pyplot()
    import matplotlib.ticker

    settings = [s for s in settings if any(r["setting"] == s and "error" not in r for r in doc["rows"])]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4.2 * len(settings)), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in doc["rows"] if r["kind"] == "method"))
    palette = plt.get_cmap("tab10")
    style = {"original": ("tab:red", "s"), "retrain": ("tab:green", "*")}
    style.update({m: (palette(2 + i % 8), "o") for i, m in enumerate(models)})
    for i, s in enumerate(settings):
        rows = [r for r in doc["rows"] if r["setting"] == s and "error" not in r]
        fx, fy = ("fd_retain", "forget_rate") if s == "class" else ("fd", "near_copy_rate")
        ax = axes[i][0]
        for r in rows:
            if r.get(fx) is None or r.get(fy) is None:
                continue
            color, marker = style[r["model"]]
            ax.scatter(r[fx], r[fy], color=color, marker=marker, s=90 if marker == "*" else 45, label=r["model"],
                       alpha=0.85, edgecolors="black", linewidths=0.4)
        ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")  # FDs span 4 (original) to ~2,000 (a collapsed model)
        ax.set_xlabel("FD of the other digits (log; lower: closer to real)" if s == "class"
                      else "FD of the non-copy samples (log; lower: closer to real)")
        ax.set_ylabel(f"forget rate: label {forget_class} still a {forget_class}" if s == "class"
                      else "near-copy rate of the forgotten image")
        ax.set_title("forget one digit" if s == "class" else "forget one memorised image", fontsize=10)
        ax.grid(alpha=0.3)
        ax = axes[i][1]
        timed = [r for r in rows if r.get("seconds")]
        ax.barh([r["model"] for r in timed], [r["seconds"] for r in timed],
                color=[style[r["model"]][0] for r in timed])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("wall time, s (log; retrain: its training time)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_bench_samples(rows, pictures, path, forget_class: int) -> Optional[Path]:
    """The benchmark's samples: per setting, one line per model, samples that show forgetting (label
    ``forget_class`` / nearest to the glyph) and samples that show what was kept (one per other label / plain
    samples). One mosaic image, one axes."""
    plt = _pyplot()

    lines = [(f"{r['setting']}: {r['model']}", pictures.get((r["setting"], r["model"]))) for r in rows]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    k, pad = 8, 1
    h, w = lines[0][1][0].shape[-2:]
    cell_h, cell_w = h + pad, w + pad
    mosaic = torch.full((len(lines) * cell_h, (2 * k + 1) * cell_w), 0.35)  # grey background between cells
    for i, (_, halves) in enumerate(lines):
        for half, imgs in enumerate(halves):
            for j, img in enumerate(imgs[:k]):
                col = j + half * (k + 1)
                tile = (img[0].float().clamp(-1, 1) + 1) / 2
                mosaic[i * cell_h:i * cell_h + h, col * cell_w:col * cell_w + w] = tile
    fig, ax = plt.subplots(figsize=(0.32 * (2 * k + 1) + 1.6, 0.34 * len(lines) + 0.6))
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(k * cell_w) / 2, (k + 1 + k / 2) * cell_w])
    ax.set_xticklabels([f"label {forget_class} / nearest to glyph", "other labels / samples"], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([i * cell_h + h / 2 for i in range(len(lines))])
    ax.set_yticklabels([name for name, _ in lines], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(fig, path, bbox_inches="tight")
