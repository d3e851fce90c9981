"""What to forget and what to keep: ``Classes``, ``Concept``, ``DataPoints``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import MissingFileError, bad_type, bad_value

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_CAPTION_KEYS = ("text", "caption", "prompt")  # the columns datasets' imagefolder and the diffusers scripts use


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with diffusers
        return False
    return isinstance(x, Image.Image)


def _is_dataset(x) -> bool:
    """An image dataset with rows, duck-typed so that ``datasets`` stays optional: a Hugging Face
    ``datasets.Dataset`` (it has ``with_format``), or any object with ``__len__`` and ``__getitem__`` whose rows
    are mappings (``{"image": PIL image, "text": ..., "label": ...}``), a list of such dicts included."""
    if isinstance(x, (str, bytes, Path, torch.Tensor, Mapping)) or _is_pil(x):
        return False
    if hasattr(x, "with_format") and hasattr(x, "__len__") and hasattr(x, "__getitem__"):
        return True
    if not (hasattr(x, "__len__") and hasattr(x, "__getitem__")):
        return False
    try:
        return len(x) > 0 and isinstance(x[0], Mapping)
    except Exception:  # noqa: BLE001 - e.g. an array whose [0] is not a row: not a dataset
        return False


def _pil_to_tensor(images, what: str) -> torch.Tensor:
    """PIL images → float tensor [N, C, H, W] in [-1, 1]. Grayscale images stay one channel when all of
    them are grayscale; anything else becomes RGB (alpha dropped), as ``image.convert("RGB")`` in the
    diffusers training scripts."""
    import numpy as np

    wide = ("I", "I;16", "F")  # 16-bit / float grayscale: PIL's convert("L") would clip, so scale here
    gray = all(im.mode in ("1", "L", "LA") + wide for im in images)
    arrays = []
    for im in images:
        if im.mode in wide:
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 2.0 - 1.0
            arr = arr if gray else np.repeat(arr[..., None], 3, axis=-1)
        else:
            arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        arrays.append(torch.from_numpy(np.ascontiguousarray(arr)))
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise bad_value(what, "images of one size (resize them to the model's resolution first)", sorted(shapes))
    return torch.stack(arrays)


def _read_captions(folder: Path) -> dict:
    """``file_name -> caption`` from a ``datasets`` imagefolder ``metadata.jsonl`` (``text``/``caption``/
    ``prompt`` column), or {} without one."""
    import json

    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return {}
    captions = {}
    for i, line in enumerate(meta.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise bad_value("images", f"a valid metadata.jsonl (line {i + 1})", str(e)) from None
        key = next((k for k in _CAPTION_KEYS if k in row), None)
        if "file_name" in row and key is not None:
            captions[str(row["file_name"])] = str(row[key])
    return captions


def _load_image_folder(folder: Path):
    """(images [N, C, H, W] in [-1, 1], captions or None, labels or None) of the image files in ``folder``,
    sorted by name, in the ``datasets`` imagefolder layout: captions from a ``metadata.jsonl`` next to the
    files; or one subfolder per class, named by its class id (``3/``) or, for other names, labelled by
    their sorted position (as imagefolder's ``label`` column)."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    labels = None
    if not files:
        subs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
        by_class = [(d, sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)) for d in subs]
        by_class = [(d, f) for d, f in by_class if f]
        if not by_class:
            raise MissingFileError(f"images: folder {str(folder)!r} holds no image files ({sorted(_IMAGE_SUFFIXES)}), "
                                   "directly or in one subfolder per class")
        numeric = all(d.name.isdigit() for d, _ in by_class)
        files, labels = [], []
        for i, (d, f) in enumerate(by_class):
            files += f
            labels += [int(d.name) if numeric else i] * len(f)
        labels = torch.tensor(labels, dtype=torch.long)
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im)
        except OSError as e:
            raise bad_value("images", "readable image files", f"{p.name} ({e})") from None
    captions = _read_captions(folder)
    prompts = None
    if captions:
        names = [str(p.relative_to(folder)) for p in files]
        missing = [n for n in names if n not in captions]
        if missing:
            raise bad_value("images", f"a caption in {folder / 'metadata.jsonl'} for every image", f"none for {missing[:3]}")
        prompts = [captions[n] for n in names]
    return _pil_to_tensor(images, "images"), prompts, labels


_IMAGE_KEYS = ("image", "img", "images", "pixel_values")  # the usual names of a dataset's image column
_LABEL_KEYS = ("label", "labels")


def _image_like(v) -> bool:
    import numpy as np

    return (_is_pil(v) or (isinstance(v, Mapping) and ("bytes" in v or "path" in v))
            or (isinstance(v, np.ndarray) and v.ndim in (2, 3)))


def _image_column(ds, first: Mapping) -> str:
    """The image column: the first ``Image`` feature of a Hugging Face dataset (by its class name, so without
    importing ``datasets``), else a usual name (``image``, ``img``, ...), else the first column holding images."""
    features = getattr(ds, "features", None)
    if isinstance(features, Mapping):
        for name, f in features.items():
            if type(f).__name__ == "Image":
                return name
    for name in _IMAGE_KEYS:
        if name in first:
            return name
    for name, v in first.items():
        if _image_like(v):
            return name
    raise bad_value("images", "a dataset whose rows hold an image column (PIL images; e.g. 'image')",
                    f"columns {list(first)}")


def _as_pil(v, row: int, col: str):
    """One cell of the image column as a PIL image: PIL as it is, ``datasets``' undecoded ``{"bytes", "path"}``
    dict opened, a uint8 array [H, W] or [H, W, C] converted."""
    import io

    import numpy as np
    from PIL import Image

    if _is_pil(v):
        return v
    if isinstance(v, Mapping) and (v.get("bytes") is not None or v.get("path")):
        try:
            with Image.open(io.BytesIO(v["bytes"]) if v.get("bytes") is not None else v["path"]) as im:
                im.load()
                return im
        except OSError as e:
            raise bad_value("images", "readable images in the dataset", f"row {row} ({e})") from None
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and (v.ndim == 2 or (v.ndim == 3 and v.shape[2] in (1, 3, 4))):
        return Image.fromarray(v[..., 0] if v.ndim == 3 and v.shape[2] == 1 else v)
    raise bad_value("images", f"PIL images in column {col!r} (a datasets.Dataset is read with with_format(None); "
                    "give tensors as a float tensor [N, C, H, W] instead)", f"{type(v).__name__} in row {row}")


def _from_dataset(ds):
    """(images, captions or None, labels or None) of an image dataset (``_is_dataset``): its image column
    (``_image_column``), the ``text``/``caption``/``prompt`` column and the ``label`` column when there are ones.
    A Hugging Face dataset is read as Python objects (``with_format(None)``: PIL images whatever format was set),
    column by column; other datasets row by row."""
    if hasattr(ds, "with_format"):
        ds = ds.with_format(None)
    n = len(ds)
    if n == 0:
        raise bad_value("images", "a dataset with at least one row", "an empty one")
    first = ds[0]
    if not isinstance(first, Mapping):
        raise bad_value("images", "a dataset whose rows are dicts of columns", type(first).__name__)
    col = _image_column(ds, first)
    caption = next((k for k in _CAPTION_KEYS if k in first), None)
    label = next((k for k in _LABEL_KEYS if k in first), None)
    if hasattr(ds, "column_names"):  # columnar (datasets): one read per column
        columns = {k: list(ds[k]) for k in (col, caption, label) if k is not None}
    else:
        rows = [first] + [ds[i] for i in range(1, n)]
        missing = [i for i, r in enumerate(rows) if not isinstance(r, Mapping) or col not in r]
        if missing:
            raise bad_value("images", f"an {col!r} column in every row", f"none in row {missing[0]}")
        columns = {k: [r.get(k) for r in rows] for k in (col, caption, label) if k is not None}
    images = [_as_pil(v, i, col) for i, v in enumerate(columns[col])]
    prompts = [str(p) for p in columns[caption]] if caption is not None else None
    labels = None
    if label is not None:
        try:
            labels = torch.as_tensor([int(v) for v in columns[label]], dtype=torch.long)
        except (TypeError, ValueError):
            raise bad_value("labels", f"integer class ids in the dataset's {label!r} column",
                            columns[label][:3]) from None
    return _pil_to_tensor(images, "images"), prompts, labels


@dataclass
class DataPoints:
    """Specific training points to forget or keep.

    ``images`` is one of

    * a float tensor [N, C, H, W] of pixels in [-1, 1] (or in [0, 1] / [0, 255] with ``normalize=True``);
    * PIL images (a list, or one image), a folder of image files (sorted by name; captions from a
      ``metadata.jsonl`` as ``datasets``' imagefolder writes it), or an image dataset: a Hugging Face
      ``datasets.Dataset`` or any object (a list included) whose rows ``ds[i]`` are dicts with an image column
      (its ``Image`` feature, else ``image``/``img``/...: PIL images, ``datasets``' undecoded ``{"bytes",
      "path"}`` dicts or uint8 arrays), captions from ``text``/``caption``/``prompt`` and class ids from
      ``label`` when present (``datasets`` itself is not needed); all mapped to [-1, 1];
    * latents in the model's own sample space, with ``latents=True`` or ``DataPoints.from_latents(...)``:
      e.g. Stable Diffusion latents already multiplied by ``vae.config.scaling_factor``; no range check.

    On a latent-space pipeline (one with a VAE) pixel images are encoded once through the pipeline's own
    VAE when ``erase`` starts, and the methods work on the scaled latents. ``labels`` [N] are class ids
    (class-conditional models), ``prompts`` N strings (text models; one string is repeated)."""

    images: Any
    labels: Optional[torch.Tensor] = None
    prompts: Optional[Sequence[str]] = None
    normalize: bool = False  # True: map a tensor from [0, 1] or [0, 255] into [-1, 1] instead of rejecting it
    latents: bool = False  # True: ``images`` are already in the model's sample space (VAE latents, scaled)
    # Set for images decoded from files or PIL: they may be converted between grayscale and RGB to fit the model.
    from_files: bool = field(default=False, repr=False)

    @classmethod
    def from_latents(cls, latents: torch.Tensor, labels=None, prompts=None) -> "DataPoints":
        """Latents given directly (e.g. ``vae.encode(x).latent_dist.sample() * vae.config.scaling_factor``):
        used as they are, never encoded again and not range-checked."""
        return cls(latents, labels=labels, prompts=prompts, latents=True)

    def __post_init__(self):
        if not isinstance(self.latents, bool):
            raise bad_type("latents", "True or False", self.latents)
        found_prompts = found_labels = None
        source = self.images
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if not folder.is_dir():
                raise MissingFileError(f"images: {str(folder)!r} is not a folder of images")
            self.images, found_prompts, found_labels = _load_image_folder(folder)
        elif _is_pil(source):
            self.images = _pil_to_tensor([source], "images")
        elif isinstance(source, (list, tuple)) and source and all(_is_pil(im) for im in source):
            self.images = _pil_to_tensor(list(source), "images")
        elif _is_dataset(source):
            self.images, found_prompts, found_labels = _from_dataset(source)
        elif not isinstance(source, torch.Tensor):
            raise bad_type("images", "a float tensor [N, C, H, W], PIL images, a folder path or an image dataset "
                           "(a datasets.Dataset, or rows ds[i] that are dicts with an image column)", source)
        decoded = not isinstance(source, torch.Tensor)
        if decoded:
            if self.latents:
                raise bad_value("latents", "False for image files / PIL images (they are pixels)", True)
            self.from_files = True
            if self.prompts is None:
                self.prompts = found_prompts
            if self.labels is None:
                self.labels = found_labels
        if self.images.ndim != 4 or not self.images.is_floating_point():
            raise bad_value("images", "a float tensor of shape [N, C, H, W]",
                            f"{self.images.dtype} tensor of shape {tuple(self.images.shape)}")
        if self.images.shape[0] == 0:
            raise bad_value("images", "at least one image", "an empty tensor")
        if not torch.isfinite(self.images).all():
            raise bad_value("images", "finite values", "NaN or inf")
        if self.latents:
            if self.normalize:
                raise bad_value("normalize", "False for latents (they are not pixels)", True)
        elif not decoded:  # files and PIL images were mapped to [-1, 1] above: never rescale them again
            if self.normalize:
                hi = float(self.images.max())
                scale = 255.0 if hi > 1.0 else 1.0
                self.images = self.images / scale * 2.0 - 1.0
            lo, hi = float(self.images.min()), float(self.images.max())
            if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
                raise bad_value("images", "values in [-1, 1] for pixels (pass normalize=True to rescale [0, 1] "
                                "or [0, 255] data; latents already in the model's sample space go in with "
                                "DataPoints.from_latents(...) or latents=True)", f"range [{lo:.3g}, {hi:.3g}]")
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

    def __repr__(self) -> str:  # one line: the tensors are summarised, never printed
        shape = "x".join(str(d) for d in self.images.shape[1:])
        parts = [f"{len(self)} {'latents' if self.latents else 'images'} {shape}"]
        if self.labels is not None:
            parts.append(f"labels={sorted(set(self.labels.tolist()))[:10]}")
        if self.prompts is not None:
            uniq = list(dict.fromkeys(self.prompts))
            parts.append(f"prompts={uniq[:3]!r}" + (f" (+{len(uniq) - 3} more)" if len(uniq) > 3 else ""))
        return f"DataPoints({', '.join(parts)})"

    def pixels(self, channels: int, what: str = "images", expected: Optional[str] = None) -> torch.Tensor:
        """The images with ``channels`` channels: images from files / PIL convert between grayscale and RGB
        (as ``image.convert``), tensors must already have them (else an error naming ``what``, saying
        ``expected``)."""
        x = self.images
        c = x.shape[1]
        if c == channels:
            return x
        if self.from_files and (c, channels) == (1, 3):
            return x.expand(-1, 3, -1, -1).clone()
        if self.from_files and (c, channels) == (3, 1):  # ITU-R 601-2 luma, what PIL's convert("L") computes
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        raise bad_value(what, expected or f"{channels} channel(s) to match the model", tuple(x.shape))


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
