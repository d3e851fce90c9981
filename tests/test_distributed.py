"""Data-parallel erase() (fastunlearn.distributed), on CPU: ``accelerate launch`` starts two processes that
join a gloo process group, exactly the command a multi-GPU machine runs (there NCCL). The result must
match the single-process run on the same global batch, up to floating-point summation order."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import fastunlearn as fu

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")


def _free_port() -> int:
    with socket.socket() as s:  # other test sessions may be using accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _erase_cli(out, args, processes: int):
    """``fastunlearn erase --model digits ...``: in this process for 1, through ``accelerate launch`` else."""
    cli = ["erase", "--model", "digits", "--out", str(out), "--no-progress", *args]
    if processes == 1:
        from fastunlearn.cli import main

        main(cli)
        return fu.load(out)
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "fastunlearn", *cli]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return fu.load(out)


def _max_diff(a, b, key=""):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max((pa[n] - pb[n]).abs().max().item() for n in pa if key in n)


needs_accelerate = pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")


@needs_accelerate
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """SISS, full weights: its gradient surgery (the two VJPs' norms) must see the global gradients. A
    batch of 7 rows also checks the padded last slice (4 + 3 rows)."""
    args = ["--classes", "3", "--method", "siss", "--steps", "3", "--batch-size", "7"]
    one = _erase_cli(tmp_path / "one", args, 1)
    two = _erase_cli(tmp_path / "two", args, 2)
    assert two.meta["processes"] == 2 and two.meta["process_weight_drift"] == 0.0  # the ranks stayed identical
    assert "processes" not in one.meta
    base = fu.zoo.digits()[0]
    moved = _max_diff(one.model, base)
    assert moved > 1e-5  # the run did train
    assert _max_diff(one.model, two.model) <= 0.02 * moved
    for h1, h2 in zip(one.history, two.history):  # the same global-batch losses at every step
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
    assert not (tmp_path / "two" / "checkpoints").exists()
    # only process 0 wrote the result: one fastunlearn.json, complete
    assert json.loads((tmp_path / "two" / "fastunlearn.json").read_text())["method"] == "siss"


@needs_accelerate
def test_two_processes_sfd_lora_roles(tmp_path):
    """SFD with LoRA: the generator's gradient flows through the teacher's and fake score's input
    Jacobians, all three role calls split by rows. Compared: the generator's adapter (what SFD delivers).
    The fake score's adapter is not compared: SFD draws its LoRA A matrices from the process's global RNG
    (not from ``seed``), so two separate runs start ψ differently even in one process."""
    args = ["--classes", "3", "--override", "1", "--method", "sfd", "--rank", "2", "--steps", "2",
            "--batch-size", "3"]
    one = _erase_cli(tmp_path / "one", args, 1)
    two = _erase_cli(tmp_path / "two", args, 2)
    assert two.meta["process_weight_drift"] == 0.0
    moved = max(p.abs().max().item() for n, p in one.generator.named_parameters() if "lora_B" in n)
    assert moved > 0
    assert _max_diff(one.generator, two.generator, "lora_") <= 0.02 * moved


@needs_accelerate
def test_each_process_input_model_is_untouched_with_a_shared_lora_base():
    """With LoRA the run's frozen base is the caller's own tensor (``lora.shared_base_copy``): the broadcast of
    process 0's weights must not write it on the other processes (whose input differs here on purpose)."""
    # not under helpers/: the script's folder goes first on sys.path, and helpers/kernels.py would shadow a package
    script = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), script]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("input untouched True, base from process 0 True") == 2


def test_checkpoints_are_refused_before_any_work_under_several_processes(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("WORLD_SIZE", "2")
    unet, sched = tiny
    with pytest.raises(fu.errors.InvalidArgumentError, match=r"^checkpoint_every: .*2 processes"):
        fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=1, progress=False,
                 output_dir=tmp_path / "run", checkpoint_every=1)
    assert not (tmp_path / "run").exists()


def test_single_process_is_untouched(monkeypatch):
    from fastunlearn import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.attach(None, None) is None
    assert not torch.distributed.is_initialized()
