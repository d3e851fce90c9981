"""The Triton kernel tests on CPU: reruns tests/test_kernels_*.py in a subprocess under Triton's interpreter.

In this process triton is already imported without TRITON_INTERPRET=1, so the kernel tests skip here; a child
process started with TRITON_INTERPRET=1 runs them (numpy executes each Triton program; triton 3.x, about one
second per test on one core). The check is not just a green exit code: every kernel test must have run (none
skipped except the one that needs a process without the interpreter), and the launch counters of
``fastunlearn.kernels._common`` must show every kernel's grids running, including the ones launched from
inside ``erase(..., method="siss")``.
"""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fastunlearn.kernels import _common as C

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_kernels_siss.py", "tests/test_kernels_sfd.py", "tests/test_kernels_mse.py",
         "tests/test_kernels_surgery.py", "tests/test_kernels_dispatch.py"]
# Skips that are correct in the interpreter process (they check behaviour without the interpreter).
EXPECTED_SKIPS = {"test_triton_on_cpu_without_interpreter_is_a_clear_error"}
# Every kernel, with the launches the files above make at the least (forward, finalize, backward and the
# multi-tensor reduction); the erase() test alone launches 3 + 3 + 6 + 3.
MIN_LAUNCHES = {"siss_partials": 40, "siss_finalize": 40, "siss_backward": 40, "sid_partials": 15,
                "sid_finalize": 15, "sid_backward": 15, "mse_partials": 15, "mse_finalize": 15,
                "mse_backward": 15, "pair_stats": 8}

# The child: pytest.main with a plugin that dumps the launch counters when the session ends.
CHILD = """
import json, sys
import pytest
out = sys.argv[1]
class Dump:
    def pytest_sessionfinish(self, session, exitstatus):
        from fastunlearn.kernels import _common as C
        json.dump(dict(C.LAUNCHES), open(out, "w"))
sys.exit(pytest.main(sys.argv[2:], plugins=[Dump()]))
"""


@pytest.mark.skipif(C.interpreter_ready(), reason="this process already runs the interpreter: the kernel "
                                                  "tests run here directly")
def test_kernel_tests_pass_under_the_interpreter(tmp_path):
    launches, junit = tmp_path / "launches.json", tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTUNLEARN_KERNELS", "PYTEST_ADDOPTS")}
    # CPU tensors even on a CUDA machine: this is the interpreter's run; the GPU runs the files natively
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-c", CHILD, str(launches), *FILES, "-q", "-p", "no:cacheprovider", "-rs",
           f"--junitxml={junit}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log

    cases = ET.parse(junit).getroot().iter("testcase")
    ran, skipped = {}, []
    for case in cases:
        f = case.get("classname", "").split(".")[-1]
        if case.find("skipped") is not None:
            skipped.append(case.get("name"))
        else:
            ran[f] = ran.get(f, 0) + 1
    assert {s.split("[")[0] for s in skipped} <= EXPECTED_SKIPS, (skipped, log)
    for f in FILES:
        assert ran.get(Path(f).stem, 0) >= 3, (f"{f}: too few tests ran under the interpreter", ran, log)

    counts = json.loads(launches.read_text())
    for name, least in MIN_LAUNCHES.items():
        assert counts.get(name, 0) >= least, f"{name}: {json.dumps(counts)}"
