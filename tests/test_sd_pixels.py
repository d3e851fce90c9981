"""Stable Diffusion / SDXL as a diffusers user has them: a pipeline folder with a VAE, real pixel images
(scikit-learn digits upscaled, as PIL images and PNG files) with prompts in, decoded pictures out.

The pipelines are fastunlearn's tiny ones (random weights, local tokenizers, a two-level VAE: 16 px
images ↔ 4x8x8 latents), which is enough for the plumbing: what goes through the VAE, at which scale,
and what comes back.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastunlearn as fu
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.text import tiny_text_pipeline

CAT, CAR = "a photo of a cat", "a red car"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_text_pipeline(seed=0, with_vae=True).save_pretrained(folder, safe_serialization=True)
    return folder


def _digits(n, start=0, size=16, mode="RGB"):
    images, labels = fu.datasets.digits_pil(size, n=start + n, mode=mode)
    return images[start:], labels[start:]


def _unit_variance_latents(pipe, n):
    """Latents as Stable Diffusion's are after scaling_factor: unit variance, so well outside [-1, 1]."""
    x = torch.nn.functional.interpolate(fu.datasets.digits().images[:n], size=16).expand(-1, 3, -1, -1)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
    return (z - z.mean()) / z.std()


# ------------------------------------------------------------------------------------------- data in
def test_scaled_latents_are_accepted_as_latents_and_not_encoded_again():
    """The issue's first bug: SD latents scaled by the VAE factor were refused ("range [-4.09, 4.1]")."""
    pipe = tiny_text_pipeline(seed=0, with_vae=True)
    z = _unit_variance_latents(pipe, 6)
    assert z.abs().max() > 1.5  # the range the old pixel check refused
    with pytest.raises(InvalidArgumentError, match=r"^images: .*from_latents"):
        fu.DataPoints(z, prompts=CAT)  # as pixels they are out of range; the error says how to pass latents
    forget = fu.DataPoints.from_latents(z[:2], prompts=CAT)
    retain = fu.DataPoints(z[2:], prompts=CAR, latents=True)
    assert forget.latents and retain.latents and torch.equal(forget.images, z[:2])

    def no_encoding(*a, **k):
        raise AssertionError("latents went through the VAE encoder")

    pipe.vae.encode = no_encoding
    res = fu.erase(pipe, forget=forget, retain=retain, method="siss", steps=1, batch_size=2, progress=False)
    assert len(res.history) == 1
    with pytest.raises(InvalidArgumentError, match=r"^forget\.images: .*latents of 4x8x8"):
        fu.erase(pipe, forget=fu.DataPoints.from_latents(z[:2, :, :4, :4], prompts=CAT), retain=retain,
                 method="siss", steps=1, progress=False)


def test_pixels_are_encoded_once_through_the_pipelines_vae_scaled():
    from fastunlearn.pipelines import image_encoder

    pipe = tiny_text_pipeline(seed=0, with_vae=True)
    imgs, _ = _digits(10)
    x = fu.DataPoints(imgs).images
    # The encoder: the VAE's posterior draw times scaling_factor, batched, seeded.
    z = image_encoder(pipe.vae, batch_size=4)(x, seed=3)
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(3)) * pipe.vae.config.scaling_factor
    assert z.shape == (10, 4, 8, 8) and torch.allclose(z, expected, atol=1e-5)
    assert torch.equal(z, image_encoder(pipe.vae, batch_size=4)(x, seed=3))
    # In a run: each DataPoints goes through the VAE once (forget and retain being one object: once in all).
    calls = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda t, *a, **k: (calls.append(t.shape[0]), encode(t, *a, **k))[1]
    data = fu.DataPoints(imgs, prompts=[CAT] * 5 + [CAR] * 5)
    fu.erase(pipe, forget=data, retain=data, method="naive", steps=3, batch_size=2, progress=False)
    assert calls == [8, 2]  # 10 images in VAE batches of 8, once, whatever the number of steps


def test_wrong_pixels_are_refused_naming_the_argument():
    pipe = tiny_text_pipeline(seed=0, with_vae=True)
    small, _ = _digits(2, size=8)
    good, _ = _digits(2)
    retain = fu.DataPoints(good, prompts=CAR)
    with pytest.raises(InvalidArgumentError, match=r"^forget\.images: expected pixel images of 16x16"):
        fu.erase(pipe, forget=fu.DataPoints(small, prompts=CAT), retain=retain, method="siss", progress=False)
    four = torch.zeros(2, 4, 16, 16)
    with pytest.raises(InvalidArgumentError, match=r"^retain\.images: expected 3-channel pixel images"):
        fu.erase(pipe, forget=fu.DataPoints(good, prompts=CAT), retain=fu.DataPoints(four, prompts=CAR),
                 method="siss", progress=False)
    # resolution= sets the pixel size the images must have
    with pytest.raises(InvalidArgumentError, match=r"^forget\.images: expected pixel images of 32x32"):
        fu.erase(pipe, forget=fu.DataPoints(good, prompts=CAT), retain=retain, method="siss", resolution=32,
                 progress=False)
    with pytest.raises(InvalidArgumentError, match="^latents"):
        fu.DataPoints(good, latents=True)
    with pytest.raises(InvalidArgumentError, match=r"^images: expected images of one size"):
        fu.DataPoints(good + small)


def test_pil_folder_and_grayscale_inputs(tmp_path):
    rgb, labels = _digits(3)
    gray, _ = _digits(3, mode="L")
    a = fu.DataPoints(rgb).images
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1 and a.min() < 0 < a.max()
    g = fu.DataPoints(gray)
    assert g.images.shape == (3, 1, 16, 16)
    assert torch.equal(g.pixels(3), a)  # grayscale files become RGB for an RGB VAE, as convert("RGB")
    with pytest.raises(InvalidArgumentError, match="^x"):
        fu.DataPoints(torch.zeros(1, 1, 4, 4)).pixels(3, "x")  # tensors are never converted
    # A folder in the datasets imagefolder layout: captions from metadata.jsonl ...
    (tmp_path / "cap").mkdir()
    for i, im in enumerate(rgb):
        im.save(tmp_path / "cap" / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"digit {int(c)}"} for i, c in enumerate(labels)]
    (tmp_path / "cap" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    f = fu.DataPoints(tmp_path / "cap")
    assert torch.equal(f.images, a) and f.prompts == [r["text"] for r in rows]
    # ... or one subfolder per class, named by its id
    for c in (1, 7):
        (tmp_path / "cls" / str(c)).mkdir(parents=True)
        gray[0].save(tmp_path / "cls" / str(c) / "a.png")
    assert fu.DataPoints(tmp_path / "cls").labels.tolist() == [1, 7]
    # normalize=True applies to tensors only: decoded files are already in [-1, 1] (the CLI bug)
    assert torch.equal(fu.DataPoints(tmp_path / "cap", normalize=True).images, a)


def test_a_datasets_image_dataset():
    """A real ``datasets.Dataset`` (skipped where ``datasets`` is not installed; the stand-in below always runs):
    its Image column, captions and labels; a torch format set by the user and undecoded images change nothing."""
    datasets = pytest.importorskip("datasets")
    rgb, labels = _digits(3)
    ds = datasets.Dataset.from_dict({"photo": rgb, "text": ["a cat"] * 3, "label": labels.tolist()},
                                    features=datasets.Features({"photo": datasets.Image(), "text": datasets.Value("string"),
                                                                "label": datasets.Value("int64")}))
    want = fu.DataPoints(rgb).images
    for d in (ds, ds.with_format("torch"), ds.cast_column("photo", datasets.Image(decode=False))):
        d = fu.DataPoints(d)
        assert torch.equal(d.images, want)
        assert d.prompts == ["a cat"] * 3 and d.labels.tolist() == labels.tolist()


ImageFeature = type("Image", (), {})  # datasets' image feature type is named Image: all that DataPoints looks at


class StandInDataset:
    """A stand-in for ``datasets.Dataset`` with the API DataPoints uses (``features``, ``column_names``,
    ``len``, ``ds[i]`` -> a row dict, ``ds[column]`` -> a list, ``with_format``): rows are stored as datasets
    stores images (undecoded ``{"bytes", "path"}``), and decoded to PIL on access in the Python format,
    while the torch format (set here, as a user might) gives tensors that DataPoints must not take as images."""

    def __init__(self, rows, fmt="torch"):
        self.rows, self.fmt = rows, fmt
        self.features = {"picture": ImageFeature(), "caption": "string", "label": "int64"}
        self.column_names = list(self.features)

    def with_format(self, type=None):
        return StandInDataset(self.rows, type)

    def __len__(self):
        return len(self.rows)

    def _cell(self, row, key):
        import io

        import numpy as np
        from PIL import Image as PILImage

        v = row[key]
        if key != "picture":
            return v
        im = PILImage.open(io.BytesIO(v["bytes"]))
        return torch.from_numpy(np.array(im)) if self.fmt == "torch" else im

    def __getitem__(self, key):
        if isinstance(key, str):
            return [self._cell(r, key) for r in self.rows]
        return {k: self._cell(self.rows[key], k) for k in self.column_names}


def test_datasets_style_inputs_are_duck_typed():
    """DataPoints takes a dataset without importing ``datasets``: a stand-in of its API (above), a custom
    sequence of row dicts holding uint8 arrays, and a plain list of dicts; bad ones get a clear error."""
    import io

    import numpy as np

    rgb, labels = _digits(3)
    want = fu.DataPoints(rgb).images

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    stand_in = StandInDataset([{"picture": png(im), "caption": f"digit {int(c)}", "label": int(c)}
                               for im, c in zip(rgb, labels)])
    assert isinstance(stand_in[0]["picture"], torch.Tensor)  # what the user's format gives: not read as images
    d = fu.DataPoints(stand_in)
    assert torch.equal(d.images, want) and d.labels.tolist() == labels.tolist()
    assert d.prompts == [f"digit {int(c)}" for c in labels]

    class Rows:  # only __len__ and __getitem__, images as uint8 arrays under the usual column name
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if not 0 <= i < 3:
                raise IndexError(i)
            return {"image": np.asarray(rgb[i]), "prompt": "a cat"}

    d = fu.DataPoints(Rows())
    assert torch.equal(d.images, want) and d.prompts == ["a cat"] * 3 and d.labels is None
    d = fu.DataPoints([{"img": im, "labels": int(c)} for im, c in zip(rgb, labels)], prompts="a dog")
    assert torch.equal(d.images, want) and d.labels.tolist() == labels.tolist() and d.prompts == ["a dog"] * 3
    with pytest.raises(InvalidArgumentError, match="^images: .*image column"):
        fu.DataPoints([{"text": "no image here"}])
    with pytest.raises(InvalidArgumentError, match="^images: .*PIL images in column 'image'"):
        fu.DataPoints([{"image": torch.zeros(3, 8, 8)}])
    with pytest.raises(InvalidArgumentError, match="^labels: .*'label' column"):
        fu.DataPoints([{"image": rgb[0], "label": "cat"}])


# ------------------------------------------------------------------------------------------- pictures out
def test_pixels_in_siss_decoded_pictures_out(sd_folder):
    """The user's path: a pipeline folder, PIL images with prompts, SISS, pictures back as the pipeline
    gives them (its own scheduler, guidance and VAE decoder)."""
    from diffusers import StableDiffusionPipeline

    imgs, _ = _digits(8)
    forget = fu.DataPoints(imgs[:2], prompts=CAT)
    retain = fu.DataPoints(imgs[2:], prompts=CAR)
    res = fu.erase(str(sd_folder), forget=forget, retain=retain, method="siss", steps=2, batch_size=2,
                   progress=False)
    pics = res.sample(2, prompts=CAT, num_inference_steps=2)
    assert len(pics) == 2 and all(isinstance(p, Image.Image) and p.mode == "RGB" and p.size == (16, 16)
                                  for p in pics)
    arr = res.sample(2, prompts=CAT, num_inference_steps=2, output_type="np")
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    assert np.array_equal(np.asarray(pics[0]), (arr[0] * 255).round().astype(np.uint8))
    # Exactly what the pipeline itself draws with the unlearned UNet in place (its PNDM/DDPM scheduler
    # from the folder and its default guidance), not a DDIM with clipping in latent space.
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.unet = res.model
    pipe.set_progress_bar_config(disable=True)
    own = pipe(prompt=[CAT] * 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert np.allclose(arr, own, atol=1e-5)
    guided = res.sample(2, prompts=CAT, num_inference_steps=2, output_type="np", guidance_scale=1.0)
    assert not np.allclose(guided, arr)  # guidance_scale reaches the pipeline
    lat = res.sample(2, prompts=CAT, num_inference_steps=2, output_type="latent")
    assert lat.shape == (2, 4, 8, 8)
    with pytest.raises(InvalidArgumentError, match="^output_type"):
        res.sample(1, prompts=CAT, output_type="jpeg")


def test_sdxl_pixels_in_pictures_out():
    from fastunlearn.text import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline(seed=0)
    imgs, _ = _digits(6)
    res = fu.erase(xl, forget=fu.DataPoints(imgs[:2], prompts=CAT), retain=fu.DataPoints(imgs[2:], prompts=CAR),
                   method="siss", steps=1, batch_size=2, progress=False)
    out = res.sample(2, prompts=CAT, num_inference_steps=2, output_type="pt")
    assert out.shape == (2, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_pixel_models_sample_as_before():
    """Bare class-conditional UNet: a tensor in [-1, 1] as before; output_type is for pipelines."""
    model, scheduler = fu.zoo.digits()
    res = fu.Result(model=model, scheduler=scheduler, method=None)
    x = res.sample(3, class_labels=[1, 2, 3], num_inference_steps=2)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    with pytest.raises(InvalidArgumentError, match="^output_type"):
        res.sample(1, output_type="pil")


# ------------------------------------------------------------------------------------------- CLI
def _write_pngs(folder, images, captions=None):
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    if captions is not None:
        rows = [{"file_name": f"{i:03d}.png", "text": c} for i, c in enumerate(captions)]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_cli_erase_from_png_folders_on_the_digits_model(tmp_path, capsys):
    """The issue's second bug: `--data imgs/ --retain imgs/` failed on valid PNGs ("range [-3, 0.984]")."""
    from fastunlearn.cli import main

    gray, labels = fu.datasets.digits_pil(8, n=40)
    for i, (im, c) in enumerate(zip(gray, labels.tolist())):
        folder = tmp_path / ("forget" if c == 3 else "retain") / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i}.png")
    main(["erase", "--model", "digits", "--method", "siss", "--data", str(tmp_path / "forget"), "--retain",
          str(tmp_path / "retain"), "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "out"),
          "--no-progress"])
    assert "saved" in capsys.readouterr().out
    res = fu.load(tmp_path / "out")
    assert len(res.history) == 2
    n3 = int((labels == 3).sum())
    assert json.loads((tmp_path / "out" / "fastunlearn.json").read_text())["forgotten"]["label_counts"] == {"3": n3}


def _cli_erase_sd(tmp_path, sd_folder, steps="2"):
    from fastunlearn.cli import main

    imgs, _ = _digits(8)
    _write_pngs(tmp_path / "forget", imgs[:2], [CAT] * 2)
    _write_pngs(tmp_path / "retain", imgs[2:], [CAR] * 6)
    main(["erase", "--model", str(sd_folder), "--method", "siss", "--data", str(tmp_path / "forget"), "--retain",
          str(tmp_path / "retain"), "--steps", steps, "--batch-size", "2", "--out", str(tmp_path / "out"),
          "--no-progress"])
    return tmp_path / "out"


def test_cli_erase_from_png_folders_on_an_sd_pipeline(tmp_path, sd_folder):
    """PNG files with captions (metadata.jsonl) into a latent pipeline: failed on the old code with the
    double normalisation ("range [-3, 1]")."""
    out = _cli_erase_sd(tmp_path, sd_folder)
    res = fu.load(out)
    assert res.model.config.in_channels == 4 and len(res.history) == 2
    rec = json.loads((out / "fastunlearn.json").read_text())["forgotten"]
    assert rec["shape"] == [2, 3, 16, 16] and rec["prompts"] == [CAT]


@pytest.mark.slow
def test_eval_of_an_sd_result_draws_decoded_rgb_with_its_step_count(tmp_path, sd_folder, monkeypatch):
    from fastunlearn import viz
    from fastunlearn.cli import main
    from fastunlearn.result import Result

    out = _cli_erase_sd(tmp_path, sd_folder, steps="1")
    steps, rows = [], []
    draw = Result._sample_with_pipeline
    monkeypatch.setattr(Result, "_sample_with_pipeline",
                        lambda self, pipe, prompts, n_steps, *a: (steps.append(n_steps), draw(self, pipe, prompts, n_steps, *a))[1])
    save = viz.save_before_after
    monkeypatch.setattr(viz, "save_before_after", lambda path, before, after, *a, **k: (rows.extend(before + after),
                                                                                         save(path, before, after, *a, **k))[1])
    main(["eval", str(out), "--num_inference_steps", "2", "--out", str(tmp_path / "eval")])
    assert steps and set(steps) == {2}
    assert rows and all(r.shape[1:] == (3, 16, 16) and r.min() >= -1 and r.max() <= 1 for r in rows)
    assert (tmp_path / "eval" / "before_after.png").exists()
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["concept"] == CAT and "decoded by its VAE" in report["settings"]["sampler"]


def test_an_fp16_vae_that_asks_for_upcasting_encodes_in_fp32_without_changing_it():
    from fastunlearn.pipelines import image_encoder
    from fastunlearn.text import tiny_vae

    vae = tiny_vae()
    x = torch.nn.functional.interpolate(fu.datasets.digits().images[:2], size=16).expand(-1, 3, -1, -1)
    ref = image_encoder(vae)(x, seed=0)
    vae = vae.half()
    vae.register_to_config(force_upcast=True)
    z = image_encoder(vae)(x, seed=0)
    assert next(vae.parameters()).dtype == torch.float16  # the caller's VAE stays as it was
    assert torch.allclose(z, ref, atol=1e-2)  # fp32 work on fp16-rounded weights
