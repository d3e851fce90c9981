"""What to forget and what to keep: ``Classes``, ``Concept``, ``DataPoints``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .errors import MissingFileError, bad_type, bad_value

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _load_image_folder(folder: Path, channels: Optional[int] = None) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise MissingFileError(f"images: folder {str(folder)!r} holds no image files ({sorted(_IMAGE_SUFFIXES)})")
    arrays = []
    for p in files:
        img = Image.open(p)
        img = img.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        arrays.append(torch.from_numpy(arr.copy()))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise bad_value("images", "image files of one size", sorted(shapes))
    return torch.stack(arrays)


@dataclass
class DataPoints:
    """Specific training points: ``images`` [N, C, H, W] in [-1, 1] (or a folder of image files),
    optional ``labels`` [N] (class-conditional models) or ``prompts`` (N strings, text models)."""

    images: Union[torch.Tensor, str, Path]
    labels: Optional[torch.Tensor] = None
    prompts: Optional[Sequence[str]] = None
    normalize: bool = False  # True: map images from [0, 1] or [0, 255] into [-1, 1] instead of rejecting them

    def __post_init__(self):
        if isinstance(self.images, (str, Path)):
            folder = Path(self.images)
            if not folder.is_dir():
                raise MissingFileError(f"images: {str(folder)!r} is not a folder of images")
            self.images = _load_image_folder(folder)
        if not isinstance(self.images, torch.Tensor):
            raise bad_type("images", "a float tensor [N, C, H, W] or a folder path", self.images)
        if self.images.ndim != 4 or not self.images.is_floating_point():
            raise bad_value("images", "a float tensor of shape [N, C, H, W]",
                            f"{self.images.dtype} tensor of shape {tuple(self.images.shape)}")
        if self.images.shape[0] == 0:
            raise bad_value("images", "at least one image", "an empty tensor")
        if not torch.isfinite(self.images).all():
            raise bad_value("images", "finite values", "NaN or inf")
        if self.normalize:
            hi = float(self.images.max())
            scale = 255.0 if hi > 1.0 else 1.0
            self.images = self.images / scale * 2.0 - 1.0
        lo, hi = float(self.images.min()), float(self.images.max())
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise bad_value("images", "values in [-1, 1] (pass normalize=True to rescale [0, 1] or [0, 255] data)",
                            f"range [{lo:.3g}, {hi:.3g}]")
        n = self.images.shape[0]
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels)
            if self.labels.is_floating_point() or self.labels.ndim != 1 or self.labels.shape[0] != n:
                raise bad_value("labels", f"an integer tensor of shape [{n}]",
                                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}")
            self.labels = self.labels.long()
            if (self.labels < 0).any():
                raise bad_value("labels", "non-negative class ids", int(self.labels.min()))
        if self.prompts is not None:
            if isinstance(self.prompts, str):
                self.prompts = [self.prompts] * n
            self.prompts = list(self.prompts)
            if len(self.prompts) != n or not all(isinstance(p, str) for p in self.prompts):
                raise bad_value("prompts", f"{n} strings (one per image)", f"{len(self.prompts)} items")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Classes:
    """Class ids of a class-conditional model. ``override`` is the safe class SFD maps the forgotten
    classes onto."""

    ids: Sequence[int]
    override: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.ids, int):
            self.ids = [self.ids]
        ids = list(self.ids)
        if not ids:
            raise bad_value("Classes.ids", "at least one class id", ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise bad_type("Classes.ids", "a list of int class ids", ids[0] if ids else ids)
        if any(i < 0 for i in ids):
            raise bad_value("Classes.ids", "non-negative class ids", ids)
        self.ids = ids
        if self.override is not None and (not isinstance(self.override, int) or self.override in ids):
            raise bad_value("Classes.override", "an int class id not among the forgotten ones", self.override)


@dataclass
class Concept:
    """A text concept (``prompt``) and the ``anchor`` prompt it is mapped toward."""

    prompt: str
    anchor: Optional[str] = None
    images: Optional[DataPoints] = field(default=None)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise bad_value("Concept.prompt", "a non-empty string", self.prompt)
        if self.anchor is not None and not isinstance(self.anchor, str):
            raise bad_type("Concept.anchor", "a string", self.anchor)
