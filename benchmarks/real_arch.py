"""Every method on the real Stable Diffusion 1.5 and SDXL architectures, on the CPU, with random weights.

    python benchmarks/real_arch.py --model sd15 --method esd --resolution 256 --steps 2
    python benchmarks/real_arch.py --model sd15 --all          # every method on SD 1.5, one fresh process each

The pipelines are built from the configurations the package ships (``fastunlearn/configs/{sd15,sdxl}.json``):
full-size UNet, text encoders and VAE, random weights made locally (nothing is downloaded), in bf16. Each
run is ``erase()`` with LoRA rank 16 and gradient checkpointing on a ``Concept`` (esd, sfd) or
``DataPoints.from_latents(latents, prompts=...)`` (siss and its baselines, erasediff). It checks that only the adapters
train, that the saved LoRA loads into a plain diffusers pipeline with ``pipe.load_lora_weights`` and that
the input pipeline is left untouched, and it measures the peak memory of the run independently of the
planner: the process's peak resident set (``ru_maxrss``) minus its resident set just before ``erase()``,
in a fresh process per run, plus the input UNet's weights the run uses in place (with LoRA the run shares
the caller's tensors instead of copying them; they are resident before the run), next to
``fastunlearn.plan()`` of the same configuration (which plans GPU memory; on the CPU the same tensors live in
host memory). ``--all`` writes the table to
``benchmarks/results/real_arch.{json,md}``.

``build_pipeline`` is shared with ``benchmarks/gpu_check.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = {"sd15": ["siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd"],
           "sdxl": ["siss", "erasediff", "esd", "sfd"]}
CONCEPT, ANCHOR = "van gogh style painting", "a painting"
PROMPTS = ["a photo of a cat", "a red car", "a tree by a house", "a dog in the golf ball style"]


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _text_encoder(cfg, tok, device, dtype):
    """A CLIP text encoder of the published config, with the local tokenizer's special ids (its pooled
    output is read at the end-of-text token)."""
    import transformers

    from fastunlearn.text import BOS, EOS

    vocab = tok.get_vocab()
    c = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
    c.update(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    cls = getattr(transformers, cfg.get("_class_name", "CLIPTextModel"))
    with torch.device(device), _default_dtype(dtype):
        return cls(transformers.CLIPTextConfig(**c)).eval()


def build_pipeline(name: str, *, device="cpu", dtype=torch.bfloat16, tiny: bool = False, seed: int = 0):
    """``StableDiffusionPipeline`` ("sd15") or ``StableDiffusionXLPipeline`` ("sdxl") of the real architecture
    with random weights (seeded), built on ``device`` in ``dtype``; ``tiny`` gives the library's toy pipelines
    of the same layout (``fastunlearn.text``), for dry runs."""
    if tiny:
        from fastunlearn.text import tiny_sdxl_pipeline
        from fastunlearn.text import tiny_text_pipeline

        pipe = tiny_sdxl_pipeline(seed=seed) if name == "sdxl" else tiny_text_pipeline(seed=seed)
        return pipe.to(device)
    from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from fastunlearn.planner import load_spec
    from fastunlearn.text import tiny_tokenizer

    spec = load_spec(name)
    length = int(spec.get("text_length", 77))
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        toks = [tiny_tokenizer(max_length=length) for _ in spec["text_encoders"]]
        encoders = [_text_encoder(cfg, tok, device, dtype) for cfg, tok in zip(spec["text_encoders"], toks)]
        with torch.device(device), _default_dtype(dtype):
            unet = UNet2DConditionModel.from_config(strip(spec["unet"]))
            vae = AutoencoderKL.from_config(strip(spec["vae"])).eval()
    sd = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              steps_offset=1, prediction_type="epsilon")
    if name == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=toks[0], tokenizer_2=toks[1], unet=unet,
                                         scheduler=EulerDiscreteScheduler(**sd, timestep_spacing="leading"),
                                         force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=toks[0], unet=unet,
                                   scheduler=DDPMScheduler(**sd, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def targets(method: str, pipe, resolution: int, n: int = 4, seed: int = 0):
    """``erase()``'s forget/retain for ``method``: a Concept for the data-free methods, latents with prompts
    (``DataPoints.from_latents(latents, prompts=...)``) for the data-based ones (latents: no VAE encode needed)."""
    import fastunlearn as fu

    if method == "esd":
        return {"forget": fu.Concept(CONCEPT, anchor=ANCHOR)}
    if method == "sfd":
        return {"forget": fu.Concept(CONCEPT, anchor=ANCHOR), "retain": PROMPTS[:2]}
    side = resolution // pipe.vae_scale_factor if getattr(pipe, "vae", None) is not None else resolution
    g = torch.Generator().manual_seed(seed)
    # Unit-variance, as VAE latents scaled by scaling_factor are; from_latents takes them as they are.
    lat = lambda k: torch.randn(k, 4, side, side, generator=g)  # noqa: E731
    forget = fu.DataPoints.from_latents(lat(n), prompts=[CONCEPT] * n)
    retain = fu.DataPoints.from_latents(lat(2 * n), prompts=(PROMPTS * n)[:2 * n])
    return {"forget": forget, "retain": retain}


def _rss() -> int:
    """Resident set now (bytes), from /proc (ru_maxrss only gives the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fingerprint(module) -> float:
    return float(sum(p.detach().float().abs().sum() for p in module.parameters()))


def run_one(model: str, method: str, resolution: int, steps: int, batch_size: int, out_dir: Path) -> dict:
    """One ``erase()`` on the real architecture in this process, with its checks and measured peak."""
    import fastunlearn as fu
    from fastunlearn.planner import plan

    t0 = time.perf_counter()
    pipe = build_pipeline(model)
    build_s = time.perf_counter() - t0
    tg = targets(method, pipe, resolution)
    before = {n: _fingerprint(getattr(pipe, n)) for n in ("unet", "text_encoder") if getattr(pipe, n, None) is not None}
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    cfg = dict(method=method, lora_rank=16, gradient_checkpointing=True, precision="bf16", batch_size=batch_size,
               resolution=resolution)
    rss0 = _rss()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t1 = time.perf_counter()
    res = fu.erase(pipe, steps=steps, progress=False, **cfg, **tg)
    wall = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"model": model, "method": method, "resolution": resolution, "batch_size": batch_size, "steps": steps,
           "unet_parameters": n_unet, "build_seconds": round(build_s, 1), "erase_seconds": round(wall, 1)}
    step_s = [h["seconds"] for h in res.history]
    row["seconds_per_step"] = round(sorted(step_s[1:] or step_s)[len(step_s[1:] or step_s) // 2], 2)
    # Only adapters train: every trainable parameter of the result is a LoRA parameter.
    trained = [n for n, p in res.model.named_parameters() if p.requires_grad]
    row["only_adapters_trained"] = bool(trained) and all("lora_" in n for n in trained)
    row["input_untouched"] = all(abs(_fingerprint(getattr(pipe, n)) - v) == 0 for n, v in before.items()) and not any(
        "lora_" in n for n, _ in pipe.unet.named_parameters())
    # Memory: what erase() added to the process at its peak (rss before the run is the input pipeline).
    # (ru_maxrss is the peak of the process's life: if the build peaked higher, erase()'s own peak is hidden.)
    row["measured_peak_over_start_gib"] = round((peak - rss0) / 2**30, 3)
    # With LoRA the run trains on the input UNet's own tensors (not a copy): they were resident before the run,
    # so the run's peak is what it added plus the input weights it used in place (the planner counts the model).
    used = {q.data_ptr() for m in (res.model, res.generator) if m is not None for q in m.parameters()}
    shared = sum(q.numel() * q.element_size() for q in pipe.unet.parameters() if q.data_ptr() in used)
    row["input_weights_shared_gib"] = round(shared / 2**30, 3)
    row["measured_run_peak_gib"] = round((peak - rss0 + shared) / 2**30, 3)
    row["peak_hidden_by_build"] = peak <= peak0
    p = plan(pipe, text_encoders_on_gpu=False, auto=False, **cfg)
    row["planned_peak_gib"] = p.peak_gib
    row["planned_parts_gib"] = p.parts_gib
    workspace = p.parts_gib["workspace"]
    row["planned_without_workspace_gib"] = round(p.peak_gib - workspace, 3)
    row["ratio"] = round(row["measured_run_peak_gib"] / row["planned_without_workspace_gib"], 3)
    # The saved LoRA loads into a plain diffusers pipeline.
    folder = out_dir / f"{model}-{method}"
    res.save(folder, overwrite=True)  # a scratch folder, rewritten by every run
    lora_file = next(folder.glob("*lora*.safetensors"), None) or next(folder.glob("*.safetensors"))
    del res
    try:
        pipe.load_lora_weights(str(folder), weight_name=lora_file.name)
        row["lora_loads_in_diffusers"] = any("lora" in n for n, _ in pipe.unet.named_parameters())
    except Exception as e:  # recorded, not fatal: the table says which method's file did not load
        row["lora_loads_in_diffusers"] = False
        row["lora_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def _table(rows) -> str:
    """Rows measured before the run shared the input UNet's tensors have no ``measured_run_peak_gib``: their
    process grew by a full copy, so what they added is their run peak."""
    head = ("| method | model | resolution | s/step | added to the process (GiB) | input weights used in place (GiB) "
            "| run peak (GiB) | planned peak (GiB) | ratio | only adapters | LoRA loads | input untouched |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        if "error" in r:
            body += f"| {r['method']} | {r['model']} | {r.get('resolution', '')} | failed: {r['error'][:80]} |||||||||\n"
            continue
        yn = lambda b: "yes" if b else "NO"  # noqa: E731
        added = r["measured_peak_over_start_gib"]
        shared = f"{r['input_weights_shared_gib']:.2f}" if "input_weights_shared_gib" in r else "none (copied)"
        body += (f"| {r['method']} | {r['model']} | {r['resolution']} | {r['seconds_per_step']:.1f} | {added:.2f} | "
                 f"{shared} | {r.get('measured_run_peak_gib', added):.2f} | "
                 f"{r['planned_without_workspace_gib']:.2f} | "
                 f"{r['ratio']:.2f} | {yn(r['only_adapters_trained'])} | {yn(r['lora_loads_in_diffusers'])} | "
                 f"{yn(r['input_untouched'])} |\n")
    return head + body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--method", default=None)
    ap.add_argument("--all", action="store_true", help="every method of --model, one fresh process each")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fastunlearn-real-arch"))
    ap.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args(argv)
    if not a.all:
        if a.method is None:
            ap.error("--method M or --all")
        try:
            row = run_one(a.model, a.method, a.resolution, a.steps, a.batch_size, a.out)
        except Exception as e:
            row = {"model": a.model, "method": a.method, "resolution": a.resolution,
                   "error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(("ROW " if a.json_line else "") + json.dumps(row), flush=True)
        return 0 if "error" not in row else 1
    from fastunlearn.files import write_json, write_text

    rows_file = RESULTS / "real_arch.json"
    rows = json.loads(rows_file.read_text())["rows"] if rows_file.exists() else []
    for m in METHODS[a.model] if a.method is None else [a.method]:
        # A fresh process per run: ru_maxrss is the peak of the process's whole life.
        cmd = [sys.executable, __file__, "--model", a.model, "--method", m, "--resolution", str(a.resolution),
               "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--out", str(a.out), "--json-line"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        row = json.loads(line) if line else {"model": a.model, "method": m, "resolution": a.resolution,
                                             "error": (proc.stderr or "no output")[-500:]}
        rows = [r for r in rows if (r["model"], r["method"]) != (a.model, m)] + [row]
        print(_table([row]).splitlines()[-1], flush=True)
        write_json(rows_file, {"rows": rows})
        write_text(RESULTS / "real_arch.md", _table(rows))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
