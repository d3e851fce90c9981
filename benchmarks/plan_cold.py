"""Cold `fastunlearn plan --auto` time per method: each run in a fresh process with an empty trace cache, as a
user's first plan of a model (issue 14: under 30 s per method on 2 cores for SDXL at 1024 px in 24 GiB).

    python benchmarks/plan_cold.py                      # SDXL: siss, erasediff, esd, sfd; 2 runs each
    python benchmarks/plan_cold.py --model sd15 --methods siss siss-nois naive neggrad --runs 2
    python benchmarks/plan_cold.py --runs 3 --out benchmarks/results   # also writes plan_cold.{json,md}

Prints one line per run (wall seconds of the whole command, imports included, and the plan's choices) and the
minimum per method: the machine may be shared, the minimum is the least disturbed run.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    ap.add_argument("--out", default=None, help="folder for plan_cold.json and plan_cold.md")
    args = ap.parse_args()
    resolution = args.resolution or (1024 if args.model == "sdxl" else 512)
    rows = []
    for run in range(args.runs):
        for method in args.methods:
            load = os.getloadavg()[0]
            seconds, p = cold_run(args.model, method, resolution, args.vram)
            rows.append({"run": run + 1, "method": method, "seconds": round(seconds, 1), "load_before": round(load, 2),
                         "plan": {k: p[k] for k in ("batch_size", "gradient_checkpointing", "optimizer", "peak_gib")}})
            print(f"run {run + 1} {args.model} {method}: {seconds:6.1f} s  batch {p['batch_size']}, checkpointing "
                  f"{p['gradient_checkpointing']}, {p['optimizer']}, peak {p['peak_gib']} GiB "
                  f"(load average before: {load:.2f})", flush=True)
    best = {m: min(r["seconds"] for r in rows if r["method"] == m) for m in args.methods}
    for method, seconds in best.items():
        print(f"min of {args.runs}: {args.model} {method} {seconds:.1f} s")
    if args.out:
        write(args, resolution, rows, best)


def write(args, resolution, rows, best):
    """``plan_cold.json`` (every run, the machine) and ``plan_cold.md`` (min / max per method) in ``args.out``."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__}
    doc = {"command": f"fastunlearn plan --model {args.model} --method M --resolution {resolution} --vram {args.vram} "
                      "--auto --json, each run in a fresh process with an empty trace cache",
           "model": args.model, "resolution": resolution, "vram": args.vram, "machine": machine, "runs": rows,
           "min_seconds": best}
    (out / "plan_cold.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Cold `plan --auto`: {args.model} at {resolution} px in {args.vram:g} GiB", "",
             f"{doc['command']} (`benchmarks/plan_cold.py`), {machine['cores']} cores, torch {machine['torch']}: wall "
             "seconds of the whole command, imports included. Issue 14's aim: under 30 s per method.", "",
             "| method | min s | max s | runs | plan (batch, checkpointing, optimizer, peak GiB) |", "|---|---|---|---|---|"]
    for m in best:
        mine = [r for r in rows if r["method"] == m]
        p = mine[0]["plan"]
        lines.append(f"| {m} | {best[m]:.1f} | {max(r['seconds'] for r in mine):.1f} | {len(mine)} | {p['batch_size']}, "
                     f"{p['gradient_checkpointing']}, {p['optimizer']}, {p['peak_gib']} |")
    (out / "plan_cold.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
