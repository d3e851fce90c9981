"""benchmarks/gpu_check.py keeps working without a GPU: its --dry mode (toy pipelines of the SD 1.5 and SDXL
layouts, CPU) runs the kernel timing, one method on both models and their plans, and writes the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_and_reports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTUNLEARN_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(tmp_path),
                           "--methods", "naive", "--steps", "2", "--budget", "400"],
                          capture_output=True, text=True, env=env, timeout=480)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "dry"
    assert {k["kernel"] for k in doc["kernels"]} == {"siss", "sfd", "esd", "pair_stats"}
    assert all("error" not in k and k["eager_ms"] > 0 for k in doc["kernels"])
    rows = {(r["model"], r["method"]): r for r in doc["methods"]}
    assert set(rows) == {(m, "naive") for m in ("sd15", "sdxl")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["seconds_per_step"] > 0 and r["only_adapters_trained"]
        assert r["planned_peak_gib"] >= r["planned_peak_encoders_off_gib"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| sdxl | naive |" in md and "| siss |" in md


def test_gpu_check_rejects_an_unknown_method(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(tmp_path),
                           "--methods", "bogus"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "--methods" in proc.stderr


def test_peak_breakdown_holds_what_was_live_at_the_highest_point():
    # A CUDA memory history in torch's snapshot format: the peak is after the third allocation (6 MiB live);
    # the later, larger-looking sequence never has more live at once.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import peak_breakdown

    mib = 2**20
    frame = lambda f, line: [{"filename": f"/x/site-packages/{f}", "line": line, "name": "fn"},  # noqa: E731
                             {"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}]
    events = [
        {"action": "alloc", "addr": 1, "size": 1 * mib, "frames": frame("fastunlearn/roles.py", 10)},
        {"action": "alloc", "addr": 2, "size": 2 * mib, "frames": frame("diffusers/models/attention.py", 20)},
        {"action": "alloc", "addr": 3, "size": 3 * mib, "frames": frame("diffusers/models/attention.py", 20)},
        {"action": "free_requested", "addr": 3, "size": 3 * mib, "frames": []},
        {"action": "free_completed", "addr": 3, "size": 3 * mib, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 2 * mib, "frames": []},
        {"action": "alloc", "addr": 4, "size": 4 * mib, "frames": frame("peft/tuners/lora/layer.py", 30)},
        {"action": "free_completed", "addr": 99, "size": 8 * mib, "frames": []},  # made before the history began
    ]
    b = peak_breakdown({"device_traces": [events]})
    assert b["peak_gib"] == round(6 * mib / 2**30, 3) and b["allocations"] == 3
    assert list(b["by_frame_gib"]) == ["models/attention.py:20 fn", "fastunlearn/roles.py:10 fn"]
    assert b["by_frame_gib"]["models/attention.py:20 fn"] == round(5 * mib / 2**30, 3)
