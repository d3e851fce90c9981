"""What a method generates from the frozen base model before or while it trains: shown, counted, sized and
cached.

Methods that need images the user did not give (EraseDiff with ``fu.Classes`` / ``fu.Concept`` / prompts to
keep) sample them from the frozen base (``generate``); ESD samples whole DDIM trajectories for its pool
(``ddim_states`` through ``cached``). Both go through this module, so every such phase

* runs DDIM (η = 0) from the model's own scheduler config, with classifier-free guidance when asked for
  (ε = ε(∅) + w (ε(c) − ε(∅)), one 2N forward per step; w = 1 is plain conditional sampling, one N forward);
* is shown: a progress bar per phase (``tqdm``, as the VAE encoding of ``DataPoints``), its description
  naming what is generated, how many, the DDIM steps, the guidance and the UNet evaluations it costs; off with
  ``progress=False`` (``run.progress``), as the training bar;
* is counted: a ``Generated`` record (rows, steps, guidance, UNet evaluations, seconds, cache hit) that the
  method puts into ``Result.extras["generated"]``;
* is cached on disk and reused across runs: a safetensors file under ``cache_dir("generated")``
  (``$FASTUNLEARN_CACHE_DIR/generated``, default ``~/.cache/fastunlearn/generated``, the planner's cache
  root; ``FASTUNLEARN_CACHE_DIR=off`` keeps none), written atomically (``files.atomic_path``). The key is a
  hash of everything that determines the tensors: a fingerprint of the frozen base weights (``run.original``,
  the caller's model, which the generation uses as it is: adapters off, nothing trained yet), the conditioning
  tensors themselves (prompt embeddings, so the prompts *and* the text encoder; or class ids) and the
  unconditional ones, the seed, the counts, the DDIM steps, the guidance, the sample shape (the resolution),
  the scheduler config, the dtype, device type and autocast state, the versions of torch and diffusers, and
  this module's source. A hit returns the stored tensors bit for bit, so a run with a hit ends with the same
  weights as one without. The planner switches the cache off (``caching(False)``): it traces the real work.

UNet evaluations of one generated image: ``steps`` × (2 with guidance, else 1). At SDXL size (1024 px, a
128 × 128 latent) that is 25 × 2 = 50 evaluations of the 2.6 B-parameter UNet with EraseDiff's latent
defaults; an ESD trajectory costs (ddim_steps − 1) × 2 = 98.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .conditioning import cat_cond, cond_len, cond_to, take_cond
from .files import atomic_path, cache_dir

logger = logging.getLogger(__name__)
_CACHING = [True]  # switched off by the planner (``caching(False)``)
FORMAT = 1  # the stored layout; part of every key


@contextlib.contextmanager
def caching(enabled: bool):
    """Within the block the disk cache is used only if ``enabled`` (the planner traces with it off)."""
    before = _CACHING[0]
    _CACHING[0] = bool(enabled)
    try:
        yield
    finally:
        _CACHING[0] = before


@dataclass
class Generated:
    """What one generation phase cost: ``rows`` samples (images or trajectories) of ``steps`` DDIM steps at
    guidance ``guidance`` (None: none), ``unet_evals`` UNet rows evaluated (0 on a cache hit), in ``seconds``."""

    what: str
    rows: int
    steps: int
    guidance: Optional[float]
    unet_evals: int
    seconds: float
    cached: bool
    cache_file: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


def evals_per_row(steps: int, guidance: Optional[float], null_rows: int = 1) -> int:
    """UNet rows one sample costs: ``steps`` × (1 + ``null_rows`` with guidance, else 1)."""
    return steps * (1 + null_rows if uses_guidance(guidance) else 1)


def uses_guidance(guidance: Optional[float]) -> bool:
    """w = 1 (or None) is plain conditional sampling: ε(∅) + 1·(ε(c) − ε(∅)) = ε(c), so no ∅ forward."""
    return guidance is not None and float(guidance) != 1.0


# --------------------------------------------------------------------------------- fingerprints
def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return False
    return bool(is_fake(t))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights: names, shapes and dtypes, every value of tensors up to 64 Ki
    elements, and of larger ones the first 256 values, 4,096 values evenly strided through the tensor and
    the float64 sum (computed where the tensor lives). Any fine-tuning, merged LoRA or edited row changes
    it; a full hash of an SDXL UNet would cost seconds of device-to-host copies for no practical gain."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            flat = t.reshape(-1)
            if flat.numel() <= 65536:
                parts = [flat]
            else:
                step = flat.numel() // 4096
                parts = [flat[:256], flat[::step][:4096], flat.double().sum().reshape(1)]
            for p in parts:
                p = p.to("cpu", copy=True).contiguous()
                h.update(p.view(torch.uint8).numpy().tobytes() if p.dtype != torch.bool else p.numpy().tobytes())
    return h.hexdigest()


def tensor_digest(obj) -> str:
    """sha256 of nested tensors / dicts / lists / scalars (conditioning: class ids or prompt embeddings)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"D")
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


def base_fingerprint(run) -> str:
    """``weights_fingerprint`` of the run's frozen base (the caller's model), computed once per run."""
    fp = getattr(run, "_base_fingerprint", None)
    if fp is None:
        fp = weights_fingerprint(run.original)
        run._base_fingerprint = fp
    return fp


def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def cache_key(run, **parts) -> str:
    """The key of a generated tensor set: ``parts`` (what the caller generates: conditioning digests, seed,
    counts, steps, guidance, ...) plus what every generation depends on (base weights, sample shape, scheduler
    config, dtype, device, autocast, library versions, this module's code)."""
    import diffusers

    p = next(run.model.parameters())
    dev = p.device.type
    autocast = torch.is_autocast_enabled(dev) if dev in ("cuda", "cpu") else False
    blob = {
        "format": FORMAT, "parts": parts, "weights": base_fingerprint(run),
        "sample_shape": list(run.denoiser.sample_shape), "scheduler": dict(run.scheduler.config),
        "dtype": str(run.dtype), "param_dtypes": sorted({str(q.dtype) for q in run.model.parameters()}),
        "device": dev,
        "autocast": str(torch.get_autocast_dtype(dev)) if autocast else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _enabled(run, cache: bool) -> bool:
    if not (cache and _CACHING[0]) or cache_dir("generated") is None:
        return False
    return not _is_fake(next(run.model.parameters()))


def load_cached(key: str) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors stored under ``key``, or None (none stored, or unreadable: then generated again)."""
    from safetensors.torch import load_file

    folder = cache_dir("generated")
    f = folder / f"{key}.safetensors" if folder is not None else None
    if f is None or not f.exists():
        return None
    try:
        return load_file(str(f))
    except Exception as e:  # a truncated or foreign file: generate again and overwrite it
        logger.warning("generated-data cache %s unreadable (%s); generating again", f, e)
        return None


def store_cached(key: str, tensors: Dict[str, torch.Tensor]) -> Optional[Path]:
    """Write ``tensors`` under ``key`` atomically; None when the cache folder cannot be written."""
    from safetensors.torch import save_file

    folder = cache_dir("generated")
    if folder is None:
        return None
    f = folder / f"{key}.safetensors"
    try:
        with atomic_path(f, ".safetensors") as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    except OSError as e:  # a read-only home: the run is still right, only not remembered
        logger.warning("generated data not cached (%s)", e)
        return None
    return f


def cached(run, key_parts: Callable[[], dict], make: Callable[[], Dict[str, torch.Tensor]], *, cache: bool = True):
    """``(tensors, hit, file)``: ``make()``'s tensors, from the disk cache when a run with the same key
    stored them (``hit``), else made now and stored (when ``cache`` and the cache folder allow it).
    ``key_parts()`` (or a dict) gives what the caller's key depends on; it is only called when the cache is on
    (fake tensors of the planner cannot be hashed)."""
    if not _enabled(run, cache):
        return make(), False, None
    key = cache_key(run, **(key_parts() if callable(key_parts) else key_parts))
    got = load_cached(key)
    if got is not None:
        return got, True, str(cache_dir("generated") / f"{key}.safetensors")
    out = make()
    f = store_cached(key, out)
    return out, False, str(f) if f is not None else None


LATENT_BUDGET = 16 * 64 * 64  # latent pixels per chunk: 16 SD-1.5 images at 512 px (32 rows with guidance)


def chunk_rows(run, default: int) -> int:
    """Samples generated per no-grad forward (twice that with guidance): ``default`` on pixel models; on
    latent pipelines as many as fit ``LATENT_BUDGET`` latent pixels (16 at SD's 64², 4 at SDXL's 128²),
    at most ``default``, so that the peak stays that of a few SD images."""
    if not getattr(run, "latent", False):
        return default
    shape = run.denoiser.sample_shape
    return max(1, min(default, LATENT_BUDGET // (int(shape[-1]) * int(shape[-2]))))


# --------------------------------------------------------------------------------- progress
def progress_bar(run, total: int, desc: str, unit: str = "step"):
    """A tqdm bar (as the VAE encoding's: ``leave=False``) shown when the run shows progress."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not getattr(run, "progress", False),
                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)


def announce(run, text: str) -> None:
    """One line above the progress bars (a cache hit, which has no bar), when the run shows progress."""
    logger.info(text)
    if getattr(run, "progress", False):
        from tqdm.auto import tqdm

        tqdm.write(f"fastunlearn: {text}", file=sys.stderr)


def describe(what: str, rows: int, steps: int, guidance: Optional[float], null_rows: int = 1) -> str:
    w = f"guidance {float(guidance):g}" if uses_guidance(guidance) else "no guidance"
    evals = rows * evals_per_row(steps, guidance, null_rows)
    return f"generating {rows} {what}: {steps} DDIM steps, {w}, {evals:,} UNet evaluations"


# --------------------------------------------------------------------------------- sampling
@torch.no_grad()
def ddim_states(eps_fn, scheduler, x_T: torch.Tensor, cond, num_steps: int, upto: int,
                guidance: Optional[float] = None, null=None, on_step: Optional[Callable[[], None]] = None):
    """The DDIM (η = 0) states x^(0) = x_T, x^(1), …, x^(upto) of ``num_steps``-step sampling, and the
    timesteps (x^(k) is the sample at timesteps[k]). With ``guidance`` w ≠ 1 and ``null``, every step is one
    2N forward: ε = ε(∅) + w (ε(c) − ε(∅)). ``on_step()`` is called after each step (progress)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    ts = ddim.timesteps.long()
    x, states = x_T, [x_T]
    n = x.shape[0]
    for k in range(upto):
        t = torch.full((n,), int(ts[k]), device=x.device, dtype=torch.long)
        if not uses_guidance(guidance) or null is None:
            eps = eps_fn(x, t, cond)
        else:
            e_c, e_null = eps_fn(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, null)).chunk(2)
            eps = e_null + guidance * (e_c - e_null)
        x = ddim.step(eps, int(ts[k]), x).prev_sample
        states.append(x)
        if on_step is not None:
            on_step()
    return states, ts


@torch.no_grad()
def generate(run, eps_fn, cond, seed: int, num_steps: int = 50, guidance: Optional[float] = None, null=None,
             chunk: int = 256, *, what: str = "images", cache: bool = True, null_rows: int = 1):
    """``(samples, Generated)``: one sample (on the CPU, float32) for each row of ``cond`` from ``eps_fn`` (the
    frozen base), ``chunk`` rows per forward (2 × chunk with guidance): the data-free stand-in for images a
    method needs but the user did not give. Shown, counted and cached as the module docstring says."""
    n = cond_len(cond)
    steps = int(num_steps)
    t0 = time.perf_counter()
    record = dict(what=what, rows=n, steps=steps, guidance=float(guidance) if uses_guidance(guidance) else None)

    def make():
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn(n, *run.denoiser.sample_shape, generator=gen)
        out = []
        chunks = -(-n // chunk)
        with progress_bar(run, chunks * steps, describe(what, n, steps, guidance, null_rows)) as bar:
            for s in range(0, n, chunk):
                idx = torch.arange(s, min(n, s + chunk))
                c = cond_to(take_cond(cond, idx), run.device)
                nl = None if null is None else cond_to(take_cond(null, idx), run.device)
                states, _ = ddim_states(eps_fn, run.scheduler, x_T[idx].to(run.device, run.dtype), c, steps, steps,
                                        guidance, nl, on_step=lambda: bar.update(1))
                out.append(states[-1].float().cpu())
        return {"samples": torch.cat(out)}

    key = lambda: dict(kind="samples", cond=tensor_digest(cond),  # noqa: E731
                       null=tensor_digest(null) if uses_guidance(guidance) else None, seed=int(seed), rows=n,
                       steps=steps, guidance=record["guidance"], chunk=int(chunk))
    tensors, hit, f = cached(run, key, make, cache=cache)
    seconds = time.perf_counter() - t0
    if hit:
        announce(run, f"{n} {what} from the cache ({f}, {seconds:.1f} s)")
    else:
        logger.info("generated %d %s in %.1f s", n, what, seconds)
    evals = 0 if hit else n * evals_per_row(steps, guidance, null_rows)
    return tensors["samples"], Generated(**record, unet_evals=evals, seconds=round(seconds, 3), cached=hit,
                                         cache_file=f)
