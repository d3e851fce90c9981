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
  step (median after the first), ``torch.cuda.max_memory_allocated`` over the set-up and over training, the
  planner's peak for the same configuration (``fastunlearn.plan``, traced meanwhile on the CPU cores) and whether
  24 GiB holds, with the allocator capped at ``--vram`` (24 GiB by default) so that a larger card cannot hide a
  run that would not fit; ``--memory-history METHODS`` lists what is live at those runs' peaks.

Robust and bounded: each model's methods run in a child process that reports one JSON line per method (a
failure is recorded with its error and the next method runs); the child is stopped at ``--budget`` seconds
and what did not run is recorded as such.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

# SDXL first: the 24 GiB claim is about SDXL, so it gets its share of the budget before SD 1.5.
MODELS = {"sdxl": (1024, ["siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd"]),
          "sd15": (512, ["siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd"])}
SHARE = {"sdxl": 0.6, "sd15": 1.0}  # of the budget left when the model starts
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


def peak_breakdown(snapshot: dict, top: int = 25) -> dict:
    """The live allocations at the highest point of a CUDA memory history (``torch.cuda.memory._snapshot()``
    with ``_record_memory_history`` on), grouped by the innermost frame in this project, diffusers, peft or
    torch's checkpointing: what the planner's trace should hold at its peak, for a peak it misses."""
    live, total, best, at_best = {}, 0, 0, {}
    for trace in snapshot.get("device_traces", []):
        for ev in trace:
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames") or [])
                total += ev["size"]
                if total > best:
                    best, at_best = total, dict(live)
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                total -= live.pop(ev["addr"])[0]
    mine = ("fastunlearn", "diffusers", "peft", "checkpoint", "benchmarks")
    groups: dict = {}
    for size, frames in at_best.values():
        where = next((f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}" for f in frames
                      if any(k in f["filename"] for k in mine)), "other")
        groups[where] = groups.get(where, 0) + size
    rows = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_gib": round(best / GiB, 3), "allocations": len(at_best),
            "by_frame_gib": {k: round(v / GiB, 3) for k, v in rows}}


def method_child(model: str, dry: bool, steps: int, methods, history=(), vram: float = 0.0) -> None:
    """Child process: build the pipeline once, run each method, print one ``ROW {json}`` line per method.
    ``history``: methods whose CUDA memory history is recorded, for ``peak_breakdown`` of their run. ``vram``
    (GiB, 0: the whole card): the caching allocator is capped there, so a run that needs more fails with an
    out-of-memory error instead of being read off a larger card, and the libraries that size their workspaces
    by the free memory (cuDNN's convolution algorithms) see what such a card has."""
    import fastunlearn as fu
    from real_arch import build_pipeline, targets

    device = "cpu" if dry else "cuda"
    if device == "cuda" and vram:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, vram * GiB / total))
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
            print(f"{model} {method} ...", file=sys.stderr, flush=True)
            snap: dict = {}
            if method in history and device == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
                # the history up to the last step's end: set-up and training, not the result's assembly
                tg["callback"] = lambda step, view: snap.update(s=torch.cuda.memory._snapshot()) \
                    if step == steps else None  # step: steps done
            try:
                res = fu.erase(pipe, method=method, steps=steps, progress=False, resolution=res_px, **cfg, **tg)
                row["kernels"] = "triton" if device == "cuda" else "torch"
            except Exception as e:
                if device != "cuda" or "triton" not in f"{type(e).__module__} {e}".lower():
                    raise
                # A Triton failure is recorded and the method measured on the PyTorch references instead.
                row["triton_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                os.environ["FASTUNLEARN_KERNELS"] = "torch"
                try:
                    res = fu.erase(pipe, method=method, steps=steps, progress=False, resolution=res_px, **cfg, **tg)
                finally:
                    os.environ.pop("FASTUNLEARN_KERNELS")
                row["kernels"] = "torch"
            secs = sorted(h["seconds"] for h in res.history[1:]) or [res.history[0]["seconds"]]
            row.update(seconds_per_step=round(secs[len(secs) // 2], 3), erase_seconds=round(time.perf_counter() - t, 1),
                       only_adapters_trained=all("lora_" in n for n, p in res.model.named_parameters()
                                                 if p.requires_grad))
            if device == "cuda":
                # Two peaks: the run's own (erase() reads it before the caller's UNet goes back to the GPU:
                # set-up and training, what the planner plans) and the whole call's, which also holds the
                # moment the caller's UNet is back next to the trained copy that the Result keeps.
                peak = torch.cuda.max_memory_allocated()
                meta = res.meta
                row.update(max_memory_allocated_gib=round(peak / GiB, 3),
                           run_peak_gib=round(meta["peak_memory_bytes"] / GiB, 3),
                           setup_peak_gib=round(meta["setup_peak_memory_bytes"] / GiB, 3),
                           train_peak_gib=round(meta["train_peak_memory_bytes"] / GiB, 3),
                           fits_24gib=peak <= 24 * GiB)
                if snap:
                    torch.cuda.memory._record_memory_history(enabled=None)
                    row["peak_breakdown"] = peak_breakdown(snap["s"])
            del res
        except Exception as e:  # recorded; the next method runs
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print("ROW " + json.dumps(row), flush=True)


def run_methods(model: str, dry: bool, steps: int, deadline: float, history: str = "", vram: float = 0.0) -> list:
    methods = MODELS[model][1]
    cmd = [sys.executable, __file__, "--child", model, "--steps", str(steps), "--methods", ",".join(methods),
           "--memory-history", history, "--vram", str(vram)] + (["--dry"] if dry else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    why = "child exited with {rc}"
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        why = "stopped at the time budget"
    why = why.format(rc=proc.returncode)
    sys.stderr.write(err or "")  # the child's log (tracebacks of failed methods) into this one's
    rows = {}
    for line in out.splitlines():
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rows[r["method"]] = r
    for m in methods:
        if m not in rows:
            rows[m] = {"model": model, "method": m,
                       "error": f"not run: {why}; its log ends: " + (err or "")[-300:].strip()}
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
    cap = doc.get("vram_cap_gib")
    lines += ["", f"Runs capped at {cap:g} GiB (`torch.cuda.set_per_process_memory_fraction`): a run that needs more "
              "fails with out-of-memory, and cuDNN sizes its workspaces for such a card." if cap else
              "Runs on the whole card (no cap)."]
    lines += ["", "`torch.cuda.max_memory_allocated` over erase()'s set-up (the run's UNet next to the text encoders and "
              "VAE that encode its data) and over its training (the encoders and VAE gone: what the planner plans, "
              "*planned*; *ratio* = training / planned); *call max*: the whole call, which also holds the caller's "
              "UNet moved back next to the result's model; *run peak*: the larger of set-up and training (†: a run "
              "that recorded only this, whose ratio is run peak / planned).", "",
              "| model | method | px | s/step | run peak GiB | set-up GiB | training GiB | planned GiB | ratio | "
              "call max GiB | fits 24 GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["methods"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r.get('resolution') or ''} | failed: "
                         f"{r['error'][:100].replace('|', '/')} | | | | | |")
            continue
        mem, run_peak, train = r.get("max_memory_allocated_gib"), r.get("run_peak_gib"), r.get("train_peak_gib")
        planned = r.get("planned_peak_encoders_off_gib")
        g = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        peak, mark = (train, "") if train is not None else (run_peak, " †")
        ratio = "–" if peak is None or not planned else f"{peak / planned:.2f}{mark}"
        name = r["method"] + (" (torch kernels: Triton failed)" if "triton_error" in r else "")
        lines.append(f"| {r['model']} | {name} | {r.get('resolution') or 'toy'} | {r['seconds_per_step']:.2f} | "
                     f"{g(run_peak)} | {g(r.get('setup_peak_gib'))} | {g(train)} | {g(planned)} | {ratio} | {g(mem)} | "
                     f"{'–' if mem is None else ('yes' if r['fits_24gib'] else 'NO')} |")
    for r in doc["methods"]:
        if "peak_breakdown" in r:
            b = r["peak_breakdown"]
            lines += ["", f"{r['model']} {r['method']}: live at the peak of its memory history ({b['peak_gib']:.2f} GiB, "
                      f"{b['allocations']} allocations), by allocating frame:", ""]
            lines += [f"- {k}: {v:.3f} GiB" for k, v in b["by_frame_gib"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy pipelines of the same layout (for the test suite)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--plan-workers", type=int, default=None,
                    help="processes tracing the plans meanwhile (default: the CPU cores less two)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: kernels, plans")
    ap.add_argument("--vram", type=float, default=24.0,
                    help="GiB the runs may allocate (the card the claims are about; 0: the whole card)")
    ap.add_argument("--memory-history", default="",
                    help="comma-separated methods whose CUDA memory history is recorded: the live allocations at "
                         "their peak, by allocating frame, go in the report (slower: Python stacks per allocation)")
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
        method_child(a.child, a.dry, a.steps, MODELS[a.child][1], history=a.memory_history.split(","), vram=a.vram)
        return 0
    if not a.dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry on the CPU")
    if a.dry:
        os.environ.setdefault("FASTUNLEARN_KERNELS", "torch")
    t0 = time.monotonic()
    deadline = t0 + a.budget
    # The planner's traces run on the CPU cores while the GPU runs the methods.
    jobs = [(m, meth, None if a.dry else MODELS[m][0]) for m in MODELS for meth in MODELS[m][1]]
    workers = a.plan_workers or (1 if a.dry else max(1, min(len(jobs), (os.cpu_count() or 2) - 2)))
    # spawned, not forked: a forked child of a process that has touched CUDA cannot use it (plan() asks torch
    # about devices), and the first GPU run here lost every plan to "CUDA error: initialization error".
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    skip = set(filter(None, a.skip.split(",")))
    futures = {} if "plans" in skip else {(m, meth): pool.submit(_plan, m, meth, px, a.dry) for m, meth, px in jobs}
    doc = {"device": "cpu" if a.dry else torch.cuda.get_device_name(0), "mode": "dry" if a.dry else "gpu",
           "torch": torch.__version__, "config": run_config(a.dry), "vram_cap_gib": None if a.dry else a.vram or None, "kernels": [] if "kernels" in skip else check_kernels(a.dry, repeats=2 if a.dry else 20),
           "methods": []}
    print(f"kernels checked at {time.monotonic() - t0:.0f} s", flush=True)
    for m in MODELS:
        # Each model gets its share of what is left (less a margin for the report); what it does not use
        # goes to the next.
        left = deadline - 15 - time.monotonic()
        doc["methods"] += run_methods(m, a.dry, a.steps, time.monotonic() + SHARE[m] * left, a.memory_history,
                                    a.vram)
        print(f"{m} done at {time.monotonic() - t0:.0f} s", flush=True)
    for r in doc["methods"]:
        f = futures.get((r["model"], r["method"]))
        if f is None:
            continue
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
