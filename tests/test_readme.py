"""The README's Stable Diffusion / SDXL examples run, and its defaults table is the library's.

Every ```python block after a ``<!-- readme-test: NAME -->`` marker runs, in README order, in its own fresh
interpreter (blocks share files only, as a user's scripts do), in a temporary working folder, with the pipeline
folders replaced by tiny random-weight ones saved with ``save_pretrained`` and the step counts shrunk (each
substitution must apply, so the README cannot drift away from what is tested). Blocks named ``*-load`` must run
without importing fastunlearn. ``python tests/test_readme.py`` prints the defaults table to paste.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (\S+) -->\s*```python\n(.*?)```", re.S)
# README text -> what the test runs instead (tiny models: a step or two)
SHRINK = {"steps=200)": "steps=1, batch_size=2, ddim_steps=2)", "steps=100)": "steps=1, batch_size=2)",
          "steps=300)": "steps=1, batch_size=2)", "SIZE = 512": "SIZE = 16",
          "resolution=1024": "resolution=16", "num_inference_steps=30": "num_inference_steps=2"}


def defaults_table() -> str:
    """Markdown table of every method's run defaults, from the registry."""
    from fastunlearn.methods import REGISTRY

    rows = ["| `method=` | steps | batch | lr | optimizer (β1, β2) | |", "|---|---|---|---|---|---|"]
    for name, cls in sorted(REGISTRY.items()):
        d = cls.defaults
        lr = f"{d['lr']:g}"
        extra = getattr(cls, "class_defaults", {}).get("lr")
        if extra is not None:
            lr += f" ({extra:g} for `Classes`)"
        betas = ", ".join(f"{b:g}" for b in d.get("betas", (0.9, 0.999)))
        steps = f"{d['steps']}"
        cap = getattr(cls, "class_defaults", {}).get("steps")
        if cap is not None:
            steps += f" (class models: at most {cap}, a stopping rule ends earlier)"
        rows.append(f"| `{name}` | {steps} | {d['batch_size']} | {lr} | {d.get('optimizer', 'adamw')} ({betas}) "
                    f"| {cls.description} |")
    return "\n".join(rows)


def test_readme_defaults_table_is_the_librarys():
    text = README.read_text()
    got = text.split("<!-- defaults-table:start -->\n")[1].split("<!-- defaults-table:end -->")[0].strip()
    assert got == defaults_table(), "README defaults table is stale: run python tests/test_readme.py"


def _image_folders(root: Path):
    """The SISS example's inputs: 3 photos of another size (the example resizes them) and a retain folder of
    16 x 16 images with captions in a metadata.jsonl, as datasets' imagefolder writes it."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photos, retain = root / "photos", root / "retain"
    photos.mkdir()
    retain.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    rows = []
    for i, caption in enumerate(["a photo of a cat", "a red car", "a tree", "a photo of a bird"]):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(retain / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (retain / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return photos, retain


@pytest.mark.slow
def test_readme_sd_and_sdxl_examples_run(tmp_path, tiny_pipelines):
    blocks = BLOCK.findall(README.read_text())
    names = [n for n, _ in blocks]
    assert names == ["sd-erase", "sd-load", "sd-siss-erase", "sd-siss-load", "sdxl-erase", "sdxl-load"], names
    folders = {}
    for kind in ("sd", "sdxl"):
        folders[kind] = tmp_path / f"{kind}-folder"
        tiny_pipelines[kind]().save_pretrained(folders[kind], safe_serialization=True)
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    photos, retain = _image_folders(tmp_path)
    subs = {"path/to/sdxl-folder": str(folders["sdxl"]), "path/to/sd-folder": str(folders["sd"]),
            "path/to/photos": str(photos), "path/to/retain-folder": str(retain), **SHRINK}
    used = set()
    for name, code in blocks:
        for old, new in subs.items():
            if old in code:
                used.add(old)
                code = code.replace(old, new)
        if name.endswith("-load"):
            code += "\nimport sys\nassert 'fastunlearn' not in sys.modules, 'the example imported fastunlearn'\n"
        r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block {name}:\n{code}\n{r.stderr[-3000:]}"
    assert used == set(subs), f"substitutions that no longer apply: {set(subs) - used}"
    from PIL import Image

    for png in ("harbour.png", "harbour-lora.png", "harbour-xl.png", "dog-after.png", "dog.png", "dog-lora.png"):
        assert Image.open(work / "out" / png).size == (16, 16)
    card = (work / "out" / "sd-siss" / "README.md").read_text()
    assert "siss" in card and (work / "out" / "sd-siss" / "pytorch_lora_weights.safetensors").exists()
    for res in ("sd-no-van-gogh", "sdxl-no-van-gogh"):
        card = (work / "out" / res / "README.md").read_text()
        assert "Van Gogh" in card and (work / "out" / res / "model_index.json").exists()
    assert (work / "out" / "sdxl-no-van-gogh" / "fake_score").is_dir()


if __name__ == "__main__":
    print(defaults_table())
