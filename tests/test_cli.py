import json
import subprocess
import sys

import pytest


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from fastunlearn.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_erase_digits_and_load(tmp_path):
    out = tmp_path / "res"
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "siss", "--steps", "2", "--batch-size", "4",
             "--out", str(out), "--option", "lambd=0.4", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "fastunlearn.json").read_text())
    assert meta["method"] == "siss" and meta["options"]["lambd"] == 0.4 and meta["steps"] == 2
    import fastunlearn as fu
    assert fu.load(out).method == "siss"


def test_cli_bad_option_is_a_clear_error(tmp_path):
    r = _cli("erase", "--model", "digits", "--classes", "3", "--method", "siss", "--out", str(tmp_path / "x"),
             "--option", "lambd=7", "--no-progress")
    assert r.returncode == 2
    assert "lambd" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "erase" in r.stdout
