"""The GPU check, one command: kernels against their references, and one step of every method on the real
SD 1.5 and SDXL architectures, with measured memory next to the planned peak.

    python benchmarks/gpu_check.py                  # on a CUDA machine: ~6 minutes on one data-centre GPU
    python benchmarks/gpu_check.py --dry            # on the CPU with the toy pipelines (the suite runs this)

It writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``benchmarks/results``):

* kernels: each fused loss (SISS, SFD, ESD, pair_stats; ``benchmarks/test_bench_kernels.py``'s cases, not
  re-written) as compiled Triton on CUDA, checked against the PyTorch reference, and timed against the eager
  and the ``torch.compile``d reference (dry: the eager reference only);
* methods: ``erase()`` for every method on SD 1.5 (512 px) and SDXL (1024 px), random weights of the real
  architecture (``benchmarks/real_arch.build_pipeline``), LoRA rank 16, bf16, gradient checkpointing, 8-bit
  AdamW (bitsandbytes) and xformers where installed (else AdamW, SDPA), batch 1, a few steps: seconds per
  step (median after the first), ``torch.cuda.max_memory_allocated`` over the run, the planner's peak for the
  same configuration (``fastunlearn.plan``, traced meanwhile on the CPU cores) and whether 24 GiB holds.

Robust and bounded: each model's methods run in a child process that reports one JSON line per method (a
failure is recorded with its error and the next method runs); the child is stopped at ``--budget`` seconds
and what did not run is recorded as such.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

MODELS = {"sd15": (512, ["siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd"]),
          "sdxl": (1024, ["siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd"])}
GiB = 2**30


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------- kernels
def check_kernels(dry: bool, repeats: int = 20) -> list:
    """Per fused loss: correct (kernel vs reference) and milliseconds per call for each implementation."""
    import test_bench_kernels as bk

    device = "cpu" if dry else "cuda"
    impls = ["eager"] if dry else ["eager", "compile", "triton"]
    size = "digits" if dry else "latent"
    rows = []
    for name in ("siss", "sfd", "esd", "pair_stats"):
        row = {"kernel": name, "size": size, "device": device}
        try:
            with torch._functorch.config.patch(donated_buffer=False):  # SISS: two VJPs from one graph
                ref = bk._case(name, "eager", size, device)()
                for impl in impls:
                    step = bk._case(name, impl, size, device)
                    out = step()  # compile / autotune / first launch outside the timing
                    if impl != "eager":
                        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
                            torch.testing.assert_close(torch.as_tensor(o, dtype=torch.float64).cpu(),
                                                       torch.as_tensor(r, dtype=torch.float64).cpu(), rtol=1e-4,
                                                       atol=1e-6)
                        row[f"{impl}_matches_reference"] = True
                    times = []
                    for _ in range(repeats):
                        bk._sync(device)
                        t = time.perf_counter()
                        step()
                        bk._sync(device)
                        times.append(time.perf_counter() - t)
                    row[f"{impl}_ms"] = round(1000 * sorted(times)[len(times) // 2], 4)
        except Exception as e:  # recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- methods
def run_config(dry: bool) -> dict:
    return {"lora_rank": 16, "precision": "bf16", "gradient_checkpointing": True, "batch_size": 1,
            "optimizer": "adamw8bit" if _available("bitsandbytes") else "adamw",
            "attention": "xformers" if (not dry and _available("xformers")) else "sdpa"}


def _plan(model: str, method: str, resolution, dry: bool) -> dict:
    """The planner's peak for the configuration the check runs (own process: traces are CPU-bound)."""
    from fastunlearn.planner import plan

    cfg = run_config(dry)
    target = model
    if dry:
        from real_arch import build_pipeline

        target = build_pipeline(model, tiny=True)
    t = time.perf_counter()
    p = plan(target, method=method, resolution=resolution, auto=False, **cfg)
    # erase() moves the text encoders and VAE off the GPU once the method's set-up is done: the same plan
    # without them (their bytes and their share of the workspace margin).
    traced = sum(v for k, v in p.parts_gib.items() if k != "workspace") * GiB - p.params["pipeline_extras_bytes"]
    off = traced + 0.5 * GiB + 0.05 * traced
    return {"planned_peak_gib": p.peak_gib, "planned_peak_encoders_off_gib": round(off / GiB, 3),
            "plan_seconds": round(time.perf_counter() - t, 1)}


def method_child(model: str, dry: bool, steps: int, methods) -> None:
    """Child process: build the pipeline once, run each method, print one ``ROW {json}`` line per method."""
    import fastunlearn as fu
    from real_arch import build_pipeline, targets

    device = "cpu" if dry else "cuda"
    res_px = None if dry else MODELS[model][0]
    pipe = build_pipeline(model, device=device, tiny=dry)
    cfg = run_config(dry)
    for method in methods:
        row = {"model": model, "method": method, "resolution": res_px, **cfg}
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            px = res_px or pipe.unet.config.sample_size * (pipe.vae_scale_factor if pipe.vae is not None else 1)
            tg = targets(method, pipe, px, n=2)
            res = fu.erase(pipe, method=method, steps=steps, progress=False, resolution=res_px, **cfg, **tg)
            secs = sorted(h["seconds"] for h in res.history[1:]) or [res.history[0]["seconds"]]
            row.update(seconds_per_step=round(secs[len(secs) // 2], 3), erase_seconds=round(time.perf_counter() - t, 1),
                       only_adapters_trained=all("lora_" in n for n, p in res.model.named_parameters()
                                                 if p.requires_grad))
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated()
                row.update(max_memory_allocated_gib=round(peak / GiB, 3), fits_24gib=peak <= 24 * GiB)
            del res
        except Exception as e:  # recorded; the next method runs
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print("ROW " + json.dumps(row), flush=True)


def run_methods(model: str, dry: bool, steps: int, deadline: float) -> list:
    methods = MODELS[model][1]
    cmd = [sys.executable, __file__, "--child", model, "--steps", str(steps), "--methods", ",".join(methods)] + (
        ["--dry"] if dry else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err = "stopped at the time budget\n" + (err or "")
    rows = {}
    for line in out.splitlines():
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rows[r["method"]] = r
    for m in methods:
        if m not in rows:
            rows[m] = {"model": model, "method": m, "error": "not run: " + (err or "child exited")[-300:].strip()}
    return [rows[m] for m in methods]


# --------------------------------------------------------------------------------------------- report
def markdown(doc: dict) -> str:
    lines = [f"GPU check on {doc['device']} ({doc['mode']}), torch {doc['torch']}, {doc['seconds']:.0f} s", "",
             "| kernel | eager ms | compile ms | triton ms | triton matches reference |", "|---|---|---|---|---|"]
    for k in doc["kernels"]:
        if "error" in k:
            lines.append(f"| {k['kernel']} | failed: {k['error'][:80]} | | | |")
            continue
        f = lambda key: f"{k[key]:.3f}" if key in k else "–"  # noqa: E731
        lines.append(f"| {k['kernel']} | {f('eager_ms')} | {f('compile_ms')} | {f('triton_ms')} | "
                     f"{'yes' if k.get('triton_matches_reference') else '–'} |")
    lines += ["", "| model | method | px | s/step | max_memory_allocated GiB | planned GiB | fits 24 GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["methods"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r.get('resolution') or ''} | failed: "
                         f"{r['error'][:100].replace('|', '/')} | | | |")
            continue
        mem = r.get("max_memory_allocated_gib")
        lines.append(f"| {r['model']} | {r['method']} | {r.get('resolution') or 'toy'} | {r['seconds_per_step']:.2f} | "
                     f"{'–' if mem is None else f'{mem:.2f}'} | {r.get('planned_peak_gib', '–')} | "
                     f"{'–' if mem is None else ('yes' if r['fits_24gib'] else 'NO')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy pipelines of the same layout (for the test suite)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.methods:
        keep = a.methods.split(",")
        bad = [m for m in keep if m not in MODELS["sd15"][1]]
        if bad:
            ap.error(f"--methods: expected names from {','.join(MODELS['sd15'][1])}, got {','.join(bad)}")
        for m in MODELS:
            MODELS[m] = (MODELS[m][0], [x for x in MODELS[m][1] if x in keep])
    if a.child:
        method_child(a.child, a.dry, a.steps, MODELS[a.child][1])
        return 0
    if not a.dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry on the CPU")
    if a.dry:
        os.environ.setdefault("FASTUNLEARN_KERNELS", "torch")
    t0 = time.monotonic()
    deadline = t0 + a.budget
    # The planner's traces run on the CPU cores while the GPU runs the methods.
    jobs = [(m, meth, None if a.dry else MODELS[m][0]) for m in MODELS for meth in MODELS[m][1]]
    workers = 1 if a.dry else max(1, min(len(jobs), (os.cpu_count() or 2) - 2))
    pool = ProcessPoolExecutor(workers)
    futures = {(m, meth): pool.submit(_plan, m, meth, px, a.dry) for m, meth, px in jobs}
    doc = {"device": "cpu" if a.dry else torch.cuda.get_device_name(0), "mode": "dry" if a.dry else "gpu",
           "torch": torch.__version__, "config": run_config(a.dry), "kernels": check_kernels(a.dry, repeats=2 if a.dry else 20), "methods": []}
    for m in MODELS:
        # SDXL gets the time SD 1.5 leaves, at most the rest of the budget less a margin for the report.
        doc["methods"] += run_methods(m, a.dry, a.steps, deadline - 15)
    for r in doc["methods"]:
        f = futures[(r["model"], r["method"])]
        try:
            r.update(f.result(timeout=max(deadline - time.monotonic(), 1)))
        except Exception as e:
            r["plan_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    running = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in running:  # traces still running past the budget: stop them
        p.kill()
    doc["seconds"] = round(time.monotonic() - t0, 1)
    from fastunlearn.files import write_json, write_text

    write_json(a.out / "gpu_check.json", doc)
    write_text(a.out / "gpu_check.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
