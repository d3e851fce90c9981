"""Cold `fastunlearn plan --auto` time per method: each run in a fresh process with an empty trace cache, as a
user's first plan of a model (issue 14: under 30 s per method on 2 cores for SDXL at 1024 px in 24 GiB).

    python benchmarks/plan_cold.py                      # SDXL: siss, erasediff, esd, sfd; 2 runs each
    python benchmarks/plan_cold.py --model sd15 --methods siss siss-nois naive neggrad --runs 2

Prints one line per run (wall seconds of the whole command, imports included, and the plan's choices) and the
minimum per method: the machine may be shared, the minimum is the least disturbed run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def cold_run(model: str, method: str, resolution: int, vram: float) -> tuple:
    """(wall seconds, plan as a dict) of one `fastunlearn plan --auto --json` with an empty cache folder."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FASTUNLEARN_CACHE_DIR": cache}
        cmd = [sys.executable, "-m", "fastunlearn", "plan", "--model", model, "--method", method, "--resolution",
               str(resolution), "--vram", str(vram), "--auto", "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):  # 1: nothing fits (still a plan)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl")
    ap.add_argument("--methods", nargs="+", default=["siss", "erasediff", "esd", "sfd"])
    ap.add_argument("--resolution", type=int, default=None, help="default: 1024 for sdxl, 512 otherwise")
    ap.add_argument("--vram", type=float, default=24.0)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    resolution = args.resolution or (1024 if args.model == "sdxl" else 512)
    best = {}
    for run in range(args.runs):
        for method in args.methods:
            seconds, p = cold_run(args.model, method, resolution, args.vram)
            best[method] = min(best.get(method, seconds), seconds)
            print(f"run {run + 1} {args.model} {method}: {seconds:6.1f} s  batch {p['batch_size']}, checkpointing "
                  f"{p['gradient_checkpointing']}, {p['optimizer']}, peak {p['peak_gib']} GiB", flush=True)
    for method, seconds in best.items():
        print(f"min of {args.runs}: {args.model} {method} {seconds:.1f} s")


if __name__ == "__main__":
    main()
