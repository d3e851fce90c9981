"""files: atomic writes leave either the old content or the new one, never a part, and no temporary files."""
import json
import os
from pathlib import Path

import pytest
import torch

from fastunlearn import files


def _hidden(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_and_bytes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    files.write_text(path, "one")  # creates the missing folder
    files.write_text(path, "two")
    assert path.read_text() == "two"
    files.write_text(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _hidden(path.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with files.atomic_path(path, ".png") as tmp:
            assert tmp.name == f".a.png.tmp-{os.getpid()}.png"  # hidden, and the writer sees the extension
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_write_json_converts_tensors_and_paths(tmp_path):
    path = files.write_json(tmp_path / "m.json", {"t": torch.tensor([1.5, 2.0]), "p": Path("/x"), "o": object})
    doc = json.loads(path.read_text())
    assert doc["t"] == [1.5, 2.0] and doc["p"] == "/x" and doc["o"].startswith("<class")
    assert path.read_text().endswith("\n")


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f").write_text(text)
    return path


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    dest = tmp_path / "result"
    files.publish_dir(_folder(tmp_path / ".new1", "first"), dest)
    assert (dest / "f").read_text() == "first"
    files.publish_dir(_folder(tmp_path / ".new2", "second"), dest)
    assert (dest / "f").read_text() == "second"
    assert _hidden(tmp_path) == []  # the old folder was removed, the new one renamed


def test_publish_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "result", "old")
    new = _folder(tmp_path / ".new", "new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("no space left")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="no space"):
        files.publish_dir(new, dest)
    assert (dest / "f").read_text() == "old"
