import json
import subprocess
import sys
import time

import pytest


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from fastunlearn.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def test_cli_erase_digits_and_load(tmp_path):
    out = tmp_path / "res"
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "siss", "--steps", "2", "--batch-size", "4",
             "--out", str(out), "--option", "lambd=0.4", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "fastunlearn.json").read_text())
    assert meta["method"] == "siss" and meta["options"]["lambd"] == 0.4 and meta["steps"] == 2
    import fastunlearn as fu
    assert fu.load(out).method == "siss"


def test_cli_takes_the_diffusers_training_script_names(tmp_path):
    out = tmp_path / "res"
    r = _cli("erase", "--pretrained_model_name_or_path", "digits", "--classes", "3", "--method", "esd",
             "--max_train_steps", "2", "--train_batch_size", "4", "--learning_rate", "0.01", "--seed", "1",
             "--output_dir", str(out), "--no_progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "fastunlearn.json").read_text())
    assert (meta["steps"], meta["batch_size"], meta["lr"], meta["seed"]) == (2, 4, 0.01, 1)


def test_cli_bad_option_is_a_clear_error(tmp_path):
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "siss", "--out", str(tmp_path / "x"),
             "--option", "lambd=7", "--no-progress")
    assert r.returncode == 2
    assert "--option lambd" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_errors_name_the_flag(tmp_path):
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "esd", "--resolution", "16",
             "--output_dir", str(tmp_path / "x"), "--no_progress")
    assert r.returncode == 2 and "--resolution:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("erase", "--model", "digits", "--classes", "3", "--learning_rate", "-1", "--output_dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "--learning_rate" in r.stderr


def test_cli_choices_come_from_the_library(capsys):
    from fastunlearn.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["erase", "--model", "digits", "--classes", "3", "--method", "nope",
                                   "--output_dir", "x"])
    assert "siss" in capsys.readouterr().err  # from the method registry


def test_existing_output_dir_fails_before_any_training(tmp_path):
    """Found at save time, after the run, it would cost the whole training: a million steps would time out."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    t0 = time.perf_counter()
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "esd", "--max_train_steps", "1000000",
             "--output_dir", str(out), timeout=120)
    assert r.returncode != 0 and "--output_dir" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert "overwrite=True" not in r.stderr and "esd:" not in r.stderr  # no progress bar ever started
    assert time.perf_counter() - t0 < 120 and (out / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


@pytest.mark.slow
def test_validation_prompt_writes_samples_and_the_pipeline_is_saved(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an existing empty folder is fine
    r = _cli("erase", "--model", "digits_text", "--concept", "a picture of the digit three", "--method", "esd",
             "--max_train_steps", "2", "--train_batch_size", "2", "--option", "ddim_steps=2",
             "--validation_prompt", "a picture of the digit three", "--validation_steps", "1",
             "--num_validation_images", "2", "--num_inference_steps", "2", "--save_pipeline", "--output_dir", str(out),
             "--no_progress")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    for step in (1, 2):
        img = Image.open(out / "validation" / f"step-{step:06d}.png")
        assert img.size[0] == 2 * img.size[1]  # two images side by side
    assert (out / "model_index.json").exists() and (out / "fastunlearn.json").exists()
    r = _cli("erase", "--model", "digits", "--classes", "3", "--validation_prompt", "a cat", "--output_dir",
             str(tmp_path / "y"))
    assert r.returncode != 0 and "--validation_prompt" in r.stderr
    r = _cli("erase", "--model", "digits", "--classes", "3", "--save_pipeline", "--output_dir", str(tmp_path / "y"))
    assert r.returncode != 0 and "--save_pipeline" in r.stderr and not (tmp_path / "y").exists()


def test_help_lists_help_and_defaults_for_every_flag():
    from fastunlearn.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("demo", "erase"):
        p = sub.choices[name]
        text = p.format_help()
        for a in p._actions:
            if a.dest == "help" or a.help == "==SUPPRESS==":
                continue
            assert a.help, f"{name} {a.option_strings}: no help"
            assert "default" in p._get_formatter()._get_help_string(a), f"{name} {a.option_strings}: no default"
            assert a.option_strings[0] in text
    assert "(default: 100)" in sub.choices["erase"].format_help()
    erase = sub.choices["erase"]
    flags = {s for a in erase._actions for s in a.option_strings}
    for f in ("--pretrained_model_name_or_path", "--output_dir", "--max_train_steps", "--resolution",
              "--resume_from_checkpoint", "--mixed_precision", "--rank", "--learning_rate", "--train_batch_size",
              "--seed", "--checkpointing_steps", "--validation_prompt", "--validation_steps", "--variant",
              "--model", "--out", "--steps", "--lr", "--batch-size"):  # the older names still work
        assert f in flags, f
    from fastunlearn.config import PRECISIONS
    from fastunlearn.methods import REGISTRY
    method = next(a for a in erase._actions if a.dest == "method")
    assert method.choices == sorted(REGISTRY)
    assert next(a for a in erase._actions if a.dest == "mixed_precision").choices == sorted(PRECISIONS)
    # every primary (first) name uses one style: underscores
    assert all("-" not in a.option_strings[0][2:] for a in erase._actions if a.option_strings
               and a.option_strings[0].startswith("--") and a.help != "==SUPPRESS==")


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "erase" in r.stdout
