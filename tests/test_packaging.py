"""The package as users get it: from a clone's root (no name clash with installed packages) and as a wheel
installed outside the repository (everything it needs ships in it).

The wheel test installs the wheel with ``--no-deps`` into a fresh virtual environment outside the clone and
borrows this environment's site-packages for the dependencies (a ``.pth`` path line: their ``.pth`` hooks,
such as the editable install of this clone, are not run). It then checks the wheel's declared requirements
against what that environment holds, so a dependency the wheel forgets to declare, or declares wrongly,
fails here as it would for a user, without a multi-minute install of torch in the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    """The environment of a user's shell: none of pytest's or this clone's import paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(extra)
    return env


def test_repo_root_does_not_shadow_installed_kernels_package():
    """Python puts the working directory first on the path: from a clone's root, the top-level ``kernels/``
    folder (the Triton sources) must not hide an installed top-level ``kernels`` package, which diffusers
    and transformers import (the Hugging Face ``kernels`` hub client)."""
    code = textwrap.dedent("""
        import importlib.metadata as md, json, kernels
        try:
            md.distribution("kernels")
            installed = True
        except md.PackageNotFoundError:
            installed = False
        import fastunlearn
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        import fastunlearn.kernels.siss
        print(json.dumps({"installed": installed, "kernels_file": getattr(kernels, "__file__", None),
                          "ours": fastunlearn.kernels.siss.__file__}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["installed"]:  # the Hugging Face package wins
        assert got["kernels_file"] and "site-packages" in Path(got["kernels_file"]).parts, got
    else:  # at most a namespace portion: nothing from the clone is imported as a regular package
        assert got["kernels_file"] is None
    assert Path(got["ours"]).resolve() == REPO / "kernels" / "siss.py"
    assert not (REPO / "kernels" / "__init__.py").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # Without build isolation when this environment has setuptools: no index needed, seconds not minutes.
    cmd = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(dist)]
    if _has_setuptools():
        cmd.insert(5, "--no-build-isolation")
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = dist.glob("fastunlearn-*.whl")
    return whl


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("fastunlearn/__init__.py", "fastunlearn/kernels/siss.py", "fastunlearn/kernels/_common.py",
                 "fastunlearn/zoo/recipe.py", "fastunlearn/zoo/classifier.safetensors",
                 "fastunlearn/zoo/digits/diffusion_pytorch_model.safetensors",
                 "fastunlearn/zoo/digits_text/model_index.json",
                 "fastunlearn/zoo/retrained/digits_without_3/diffusion_pytorch_model.safetensors",
                 "fastunlearn/zoo/retrained/digits_outlier_without_outlier/training.json",
                 "fastunlearn/configs/sdxl.json"):
        assert must in names, must
    # every module of the package's source is in the wheel (a subpackage missing from pyproject's list is not)
    src = REPO / "fastunlearn"
    modules = {f"fastunlearn/{p.relative_to(src)}" for p in src.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    top = {n.split("/")[0] for n in names}
    assert top == {"fastunlearn", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/", "kernels/")) for n in names)


@pytest.mark.slow
def test_wheel_works_outside_the_repository(wheel, tmp_path):
    """Installed into a fresh venv in a folder outside the clone: the CLI, every bundled model, a short erase()
    on the Triton path where Triton is present, and the quick bench (class setting, one method)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies: this environment's site-packages as plain path entries (their .pth hooks don't run).
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                          str(wheel)], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    work = tmp_path / "user"
    work.mkdir()

    def run(args, timeout=600, **env):
        r = subprocess.run(args, cwd=work, env=_env(**env), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-4000:])
        return r.stdout

    # What the wheel declares is what the environment holds.
    run([str(py), "-c", textwrap.dedent("""
        import importlib.metadata as md
        from packaging.requirements import Requirement
        bad = []
        for line in md.requires("fastunlearn"):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = md.version(req.name)
            if not req.specifier.contains(have, prereleases=True):
                bad.append(f"{req} (have {have})")
        assert not bad, bad
    """)])
    assert "usage: fastunlearn" in run([str(venv / "bin" / "fastunlearn"), "--help"])
    report = json.loads(run([str(py), "-c", textwrap.dedent(f"""
        import json, sys, torch
        import fastunlearn as fu
        from fastunlearn.kernels import _common as C
        def in_clone(p):  # the clone's sources, not the site-packages that lend the dependencies
            return p.startswith("{REPO}") and "site-packages" not in p
        assert not in_clone(fu.__file__) and not any(in_clone(p) for p in sys.path if p)
        unet, sched = fu.zoo.digits()
        fu.zoo.digits_outlier(); fu.zoo.classifier(); pipe = fu.zoo.digits_text()
        data = fu.datasets.digits()
        hit = data.labels == 3
        res = fu.erase(unet, scheduler=sched, method="siss", steps=2, batch_size=4,
                       forget=fu.DataPoints(data.images[hit][:8], labels=data.labels[hit][:8]),
                       retain=fu.DataPoints(data.images[~hit][:32], labels=data.labels[~hit][:32]))
        res.save("out")
        back = fu.load("out")
        leaked = sorted(m.__file__ for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) and in_clone(m.__file__))
        print(json.dumps({{"launches": dict(C.LAUNCHES), "fu": fu.__file__, "leaked": leaked,
                          "steps": res.meta["steps"]}}))
    """)], FASTUNLEARN_KERNELS="triton" if _triton() else "torch", TRITON_INTERPRET="1").splitlines()[-1])
    assert report["leaked"] == [] and report["fu"].startswith(str(site))
    assert report["steps"] == 2
    if _triton():
        assert sum(report["launches"].values()) > 0, report
    out = run([str(venv / "bin" / "fastunlearn"), "bench", "--quick", "--settings", "class", "--methods", "naive",
               "--out", "bench"], timeout=900)
    doc = json.loads((work / "bench" / "bench.json").read_text())
    kinds = {r["model"]: r for r in doc["rows"]}
    assert {"original", "retrain", "naive"} <= set(kinds) and "error" not in kinds["naive"], out[-2000:]
    assert kinds["retrain"]["time_note"].startswith("recorded when trained")  # the bundled reference loaded


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
