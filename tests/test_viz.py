"""viz: every picture is a PNG written atomically (no temporary left), and draws what it is given."""
import torch

from fastunlearn import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(n_rows, k, channels=1):
    return [torch.rand(k, channels, 8, 8) * 2 - 1 for _ in range(n_rows)]


def _is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC and not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_before_after_grid_gray_and_rgb(tmp_path):
    for channels in (1, 3):
        path = viz.save_before_after(tmp_path / "pics" / f"ba{channels}.png", _rows(2, 3, channels),
                                     _rows(2, 3, channels), ["a", "b"], title="t", highlight_rows=[0])
        assert _is_png(path)


def test_evaluation_picture_kinds(tmp_path):
    assert viz.save_evaluation_picture(tmp_path / "none.png", None, "siss") is None  # nothing to draw
    grid = {"before": None, "after": _rows(2, 4), "labels": ["x", "y"], "highlight": []}
    assert _is_png(viz.save_evaluation_picture(tmp_path / "after.png", grid, None))  # no base model
    grid["before"] = _rows(2, 4)
    assert _is_png(viz.save_evaluation_picture(tmp_path / "both.png", grid, "siss"))


def test_bench_plots(tmp_path):
    rows = [
        {"setting": "class", "model": "original", "kind": "reference", "fd_retain": 4.0, "forget_rate": 0.99,
         "seconds": None},
        {"setting": "class", "model": "siss", "kind": "method", "fd_retain": 9.0, "forget_rate": 0.05, "seconds": 3.0},
        {"setting": "data", "model": "siss", "kind": "method", "fd": 12.0, "near_copy_rate": 0.0, "seconds": 2.0},
        {"setting": "data", "model": "naive", "kind": "method", "error": "boom"},
    ]
    assert _is_png(viz.plot_bench({"rows": rows}, tmp_path / "bench.png", ("class", "data"), 3))
    pictures = {("class", "siss"): (torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8))}
    assert _is_png(viz.plot_bench_samples(rows, pictures, tmp_path / "samples.png", 3))
    assert viz.plot_bench_samples(rows, {}, tmp_path / "none.png", 3) is None
