"""The run configuration: every field checks itself with an error naming it, the command line is built from the
fields (flags, choices, help, defaults), and each list of valid values exists once."""
import dataclasses

import pytest
import torch

from fastunlearn.config import RunConfig, fields
from fastunlearn.errors import FastUnlearnError

# one bad value per field; the table must cover every field (test_every_field_has_a_bad_case)
BAD = {
    "steps": 0, "batch_size": 2.5, "lr": float("inf"), "seed": "zero", "lora_rank": 0, "precision": "fp8",
    "optimizer": "sgd", "gradient_checkpointing": "yes", "attention": "flash", "compile": 1, "tf32": "on",
    "resolution": 12, "output_dir": 3, "checkpoint_every": -1, "resume": "yes", "keep_checkpoints": 0,
    "progress": None, "max_nonfinite": 0, "offload_input": 1, "variant": 16, "torch_dtype": "float64",
    "callback": "print",
}


def test_every_field_has_a_bad_case():
    assert set(BAD) == {f.name for f in fields()}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_names_its_field(name, tmp_path):
    with pytest.raises(FastUnlearnError) as info:
        RunConfig(**{"output_dir": tmp_path, name: BAD[name]})
    message = str(info.value)
    assert message.startswith(f"{name}: expected "), message
    assert len(message) > len(name) + 15, message  # says what was expected


def test_defaults_are_valid_and_every_field_is_documented():
    cfg = RunConfig()
    for f in fields():
        assert getattr(cfg, f.name) == f.default
        assert f.metadata["help"] and f.metadata["check"] is not None, f.name


@pytest.mark.parametrize("kwargs,name", [(dict(checkpoint_every=5), "output_dir"), (dict(resume=True), "output_dir")])
def test_settings_that_need_an_output_dir(kwargs, name):
    with pytest.raises(FastUnlearnError, match=rf"^{name}: expected"):
        RunConfig(**kwargs)


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FastUnlearnError, match=r"^output_dir: expected a folder path"):
        RunConfig(output_dir=tmp_path / "f" / "run")


def test_torch_dtype_by_name_becomes_a_dtype():
    assert RunConfig(torch_dtype="bfloat16").torch_dtype is torch.bfloat16
    assert RunConfig(torch_dtype=torch.float16).torch_dtype is torch.float16
    with pytest.raises(FastUnlearnError, match=r"^torch_dtype: expected torch.float32"):
        RunConfig(torch_dtype=torch.int8)


def test_method_defaults_fill_only_what_was_not_given():
    d = dict(steps=300, batch_size=64, lr=1e-4)
    cfg = RunConfig(steps=7).with_method_defaults(d)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.optimizer) == (7, 64, 1e-4, "adamw")


def test_each_list_of_valid_values_exists_once():
    """The lists of valid values are written in config.py only: no other module of the package spells one."""
    import re
    from pathlib import Path

    import fastunlearn

    spelled = {"precision": r"[\"']fp32[\"']\s*[:,][^\n]{0,40}[\"']bf16[\"']", "attention": r"[\"']sdpa[\"'],\s*[\"']xformers[\"']",
               "optimizer": r"[\"']adamw[\"'],\s*[\"']adam[\"']", "torch_dtype": r"[\"']float32[\"'],\s*[\"']float16[\"']"}
    root = Path(fastunlearn.__file__).parent
    found = {(name, str(f.relative_to(root))) for f in root.rglob("*.py") for name, rx in spelled.items()
             if re.search(rx, f.read_text())}
    assert found == {(name, "config.py") for name in spelled}


# ------------------------------------------------------------------------------------------ command line
def _erase_parser():
    from fastunlearn.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["erase"]


def test_the_erase_flags_come_from_the_config():
    actions = {a.option_strings[0]: a for a in _erase_parser()._actions if a.option_strings}
    for f in fields():
        flag = f.metadata["flag"]
        if flag is None:
            continue
        a = actions[flag.names[0]]
        assert tuple(a.option_strings) == flag.names
        assert a.help == (flag.help or f.metadata["help"])
        assert a.default == f.default
        if flag.const is not None:
            assert a.const == flag.const
        elif f.metadata["choices"] is not None:
            assert a.choices == sorted(f.metadata["choices"])


def test_no_flags_means_the_config_defaults():
    from fastunlearn.cli import _settings

    args = _erase_parser().parse_args(["--model", "digits", "--classes", "3", "--output_dir", "x"])
    assert RunConfig(**_settings(args)) == RunConfig()


def test_flags_set_their_fields():
    from fastunlearn.cli import _settings

    args = _erase_parser().parse_args(["--model", "digits", "--classes", "3", "--output_dir", "x", "--steps", "7",
                                       "--learning_rate", "0.01", "--rank", "4", "--mixed_precision", "bf16",
                                       "--use_8bit_adam", "--gradient_checkpointing", "--no_progress"])
    cfg = RunConfig(**_settings(args))
    assert dataclasses.replace(cfg) == RunConfig(steps=7, lr=0.01, lora_rank=4, precision="bf16",
                                                 optimizer="adamw8bit", gradient_checkpointing=True, progress=False)


def test_a_bad_flag_value_names_the_flag(tmp_path, capsys):
    from fastunlearn.cli import main

    with pytest.raises(SystemExit) as info:
        main(["erase", "--model", "digits", "--classes", "3", "--rank", "0", "--output_dir", str(tmp_path / "o")])
    assert "--rank: expected an int >= 1" in str(info.value)
