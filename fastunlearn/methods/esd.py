"""ESD: "Erasing Concepts from Diffusion Models" (Gandikota et al., ICCV 2023), spec §6.

Objective (§6.1), with θ* the frozen base and θ the trained copy (a parameter subset, §6.2):

    target = ε_θ*(x_t, t, c_from) − η · (ε_θ*(x_t, t, c) − ε_θ*(x_t, t, ∅))       (c_from = c unless erase_from)
    L_ESD  = MEAN ( ε_θ(x_t, t, c_from) − target )²                                 (``ops.esd_loss``)

x_t comes from sampling the frozen base (the current official code; the original CompVis script sampled
with the model being trained) under c_from with classifier-free guidance w = ``start_guidance`` (3) for k of
``ddim_steps`` (50) steps, k ~ U{0..49}, and t = timesteps[k] (§6.1, new code L127-141). The sampler here is
DDIM (η = 0) built from the model's scheduler config; the current official script samples with the
pipeline's own default scheduler (PNDM for SD-1.4), so its x_t follow that sampler's trajectories. Both give
states of the guided model at the same timesteps; DDIM is used because it is deterministic per x_T and the
same for every model this library loads (which the trajectory pool relies on).

What the user passes and what c and ∅ are:

* ``fu.Concept("...")`` on a text model or pipeline: c is the prompt's text embedding, ∅ the empty
  prompt's (SD's unconditional branch). ``erase_from="..."`` sets c_from (§6.1 ``--erase_from``).
* ``fu.Classes([k, ...])`` on a class-conditional UNet (no data needed): c is the class label (one of the
  ids per row), ∅ the model's null class (``Denoiser.null_class``: the id it was trained on with label
  dropout, 10 on the bundled digits model).

Models without a null class. Most class-conditional models are trained without label dropout (a plain
``UNet2DModel(num_class_embeds=K)``), so they have no unconditional branch. There ε(x_t, ∅) defaults to the
mean of the frozen model's predictions over all K classes, ``null_class="mean"``:

    ε(x_t, ∅) := (1/K) Σ_k ε_θ*(x_t, t, k)

Why this estimate: the unconditional score is the posterior-weighted mixture of the class scores,
∇log p(x_t) = Σ_k p(k | x_t) ∇log p(x_t | k), so ε(x_t, ∅) = Σ_k p(k | x_t) ε(x_t, t, k) exactly. The
posterior p(k | x_t) is not available without a classifier on noisy inputs, and it tends to the class prior as
the noise grows; with the uniform prior of class-balanced training that gives the class mean, which is then the
exact marginal score at high noise, where ESD's negative guidance does most of its work (it steers what the
sample becomes, not its fine detail). At low noise the mean is a smoothed ∅ (the true posterior concentrates
on one class); that only rescales the guidance direction ε(c) − ∅ at steps where it is small anyway. It needs
no data and no extra model, costs K rows per ∅ evaluation (batched in one forward), and is what the run log
(logger ``fastunlearn.methods.esd``) and ``Result.extras["null"]`` state. Measured on the bundled digits model
with its null class hidden (a plain ``num_class_embeds=10`` copy; ``benchmarks/esd_null_mean.py``, README):
see the README's ESD section. ``null_class=<id>`` stays the override: the model's own ∅ when it has one, or any
class id as a stand-in (ESD then pushes class k away from that class), and ``null_class="mean"`` forces the
mean on a model that has a null class too.

Parameter subsets (``params``, §6.2): ``"esd-x"`` cross-attention ``attn2`` only (styles; the default for
models that have cross-attention, as in the current official script), ``"esd-x-strict"`` only
``attn2.to_k``/``to_v``, ``"esd-u"`` every parameter outside ``attn2`` (close to the official ``noxattn``, not
the same set: the current official script trains only the weights of Linear/Conv2d modules outside ``attn2``,
so norm affine weights and embeddings stay frozen there, and the old code also froze ``out.`` and
``time_embed``), ``"full"`` everything. With ``lora_rank`` the subset selects which
LoRA adapters train.

Class-conditional UNets have no cross-attention (``esd-x`` would train nothing and is refused). There the
label enters the network only through ``class_embedding`` (added to the time embedding), just as a prompt
enters SD only through ``attn2``; so the class-model analogue of ESD-x, ``"class-embedding"``, is the
default: only the erased classes' embedding rows receive gradients, and every other class's samples stay
bit-identical (Adam moves nothing whose gradient was always zero). On the bundled digits model ``"full"``
(= ``esd-u`` there) erased digit 3 worse (60% still recognised after 200 steps at lr 2e-5) while
degrading the others (mean kept ratio 0.95, worst 0.76), because nothing in ESD's loss protects them.
One embedding row is a small edit, so the class defaults differ from the text ones (``defaults_for``):
lr 3e-2 (the rows are O(1) numbers; at 1e-4 they barely move in 200 steps) and η = 20. With η = 1 the
target is ε*(x_t, ∅), so class k would only become "unconditional" and still be drawn about 1 time in 10.
Larger η pushes the row away from k harder; measured on digit 3 (share of 100 samples still recognised as
a 3): η = 2: 4%, η = 3-5: 2%, η = 8-15: 0-3% depending on the training seed, η = 20: 0-1% over three
training seeds (0-0.3% on 300 other samples). The few that resist come from noise that even the
unconditional model turns into a 3, and one row cannot fully outweigh the low-noise states that dominate
the MEAN loss. The erased label then draws mostly 4s; since only its row moved, η costs the others nothing.

The frozen teacher without a second model (§6.5 wants one copy of the weights; ``fastunlearn.roles``): with
``lora_rank`` the teacher is the same model with its adapters switched off; without LoRA only the trained
tensors are kept as a frozen copy and swapped in with ``torch.func.functional_call`` (for ``esd-x`` on SD
that is the ~3% of the weights in ``attn2``, never the whole UNet). The teacher's c and ∅ evaluations
share one 2B forward (§6.5).

Trajectory pool (``trajectory_pool``, on by default). Producing x_t costs up to 49 DDIM steps × 2 (CFG)
frozen UNet calls per iteration, ~50× the training forward (§6.4). Because the current code samples x_t
with the *frozen* model, trajectories do not depend on θ, so they can be generated once and reused: every
``pool_refresh`` (100) steps ``pool_size`` (default 4·B) full trajectories (all 50 states each) are sampled,
and each step draws B (trajectory, k) pairs from them. With the defaults (200 steps, B = 16) that is 2
pools of 64 trajectories: erasing a digit from the bundled model took 12,544 sampling rows in 98 UNet calls
and 15 s, against 169,824 rows in 5,307 calls and 139 s with fresh sampling (one loaded CPU core). The
pool of 64 × 50 states costs 64·50·|x| floats of memory (0.2 GB for SD-1.5 latents at 512 px in fp32).
The marginal law of (x_t, t) is exactly the one of fresh sampling (k uniform, x_T Gaussian); only
successive steps' samples are correlated. The pool's seed is the first draw of the refresh step's
generator, so a resumed run rebuilds the same pool. With
``trajectory_pool=False`` each step samples B fresh trajectories for one k ~ U{0..49} (the official
procedure with batch B). ``Result.extras["unet_evals"]`` counts the UNet rows evaluated either way.

The pool, sized, shown and cached (``fastunlearn.generation``). ``pool_size`` defaults to 4·B on pixel models and
2·B on latent pipelines (SD / SDXL), where one trajectory costs (``ddim_steps`` − 1) × 2 = 98 evaluations of the
full UNet (at SDXL size on 128² latents), 3,136 per pool of 32 at batch 16; they are sampled a few latents per
forward (``generation.chunk_rows``). Each pool build shows in the progress display (trajectories, DDIM steps,
guidance, UNet evaluations; ``progress=False`` hides it), is recorded in ``Result.extras["generated"]["pool"]``,
and is cached on disk (``cache_generated``, on by default): a later run with the same base weights, prompt,
seed, pool size, steps, guidance and resolution takes the pools from ``$FASTUNLEARN_CACHE_DIR/generated`` and
ends with the same weights. A pool holds ``pool_size`` × ``ddim_steps`` samples.

Options and their official origin (§6.3):
* ``negative_guidance`` η: 1.0 for concepts (original script; the current script uses 2.0), 20 for classes
  (see above); ``None`` picks by target.
* ``start_guidance`` w: 3, ``ddim_steps``: 50 (both scripts).
* ``params``: see above. ``null_class``: see above. ``erase_from``: c_from for concepts.
* ``max_grad_norm``: None (the official code does not clip).
* Defaults: Adam (both scripts), lr 1e-4 and batch 16 for the small models this library runs on CPU
  (the official 1e-5 / 5e-5 at batch 1 are for the 860M-parameter SD UNet), 200 steps (current script);
  lr 3e-2 for classes (``class-embedding``, see above).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import ops
from ..conditioning import cat_cond, cond_len, cond_to, take_cond
from ..errors import bad_type, bad_value
from ..generation import announce, cached, chunk_rows, ddim_states, describe, progress_bar, tensor_digest
from ..roles import Roles, set_trainable
from ..run import step_generator
from ..surgery import clip_single, dense_grads
from ..targets import Classes, Concept
from .base import Method, Options, boolean, integer, option, optional, positive, register

# §6.2: name -> predicate on parameter names (LoRA names contain the wrapped layer's name).
PARAM_SUBSETS = {
    "full": lambda name: True,
    "esd-x": lambda name: ".attn2." in name,
    "esd-x-strict": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
    "esd-u": lambda name: ".attn2." not in name,
    "class-embedding": lambda name: name.startswith("class_embedding."),  # class models' analogue of esd-x
}
_NEEDS_XATTN = ("esd-x", "esd-x-strict")
NULL_MEAN = -1  # condition id of ε(x_t, ∅) := the mean over the classes (module docstring)
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- shared helpers
def has_cross_attention(model: torch.nn.Module) -> bool:
    return any(".attn2." in n for n, _ in model.named_parameters())


def check_params(value) -> None:
    if value is not None and value not in PARAM_SUBSETS:
        raise bad_value("params", " | ".join(PARAM_SUBSETS), value)


def has_class_embedding(model: torch.nn.Module) -> bool:
    return any(n.startswith("class_embedding.") for n, _ in model.named_parameters())


def apply_param_subset(run, subset: str) -> None:
    """Make exactly ``subset`` trainable on ``run.model`` (its LoRA adapters when ``lora_rank`` is set)."""
    if subset in _NEEDS_XATTN and not has_cross_attention(run.model):
        raise bad_value("params", "'full', 'esd-u' or 'class-embedding': this model has no cross-attention "
                        f"(attn2) layers, so {subset!r} would train nothing", subset)
    if subset == "class-embedding" and not has_class_embedding(run.model):
        raise bad_value("params", "a subset this model has ('class-embedding' needs a class-conditional UNet)",
                        subset)
    keep = PARAM_SUBSETS[subset]
    lora = run.lora_rank is not None
    set_trainable(run.model, lambda name: keep(name) and (("lora_" in name) if lora else True))
    if not any(p.requires_grad for p in run.model.parameters()):
        raise bad_value("params", "a subset with trainable parameters (with lora_rank, one that holds LoRA "
                        "adapters)", subset)


def encode_prompts(run, prompts):
    """Prompt embeddings from the pipeline's frozen text encoder (cached per prompt by the pipeline)."""
    if run.encode_prompts is None:
        raise bad_value("model", "a text-to-image pipeline (prompts need its text encoder; a bare "
                        "UNet2DConditionModel has none)", type(run.model).__name__)
    return run.encode_prompts(list(prompts))


class ClassMeanNull:
    """ε(x_t, ∅) as the mean of ``eps_fn`` over the ``num_classes`` classes on the rows labelled ``NULL_MEAN``;
    the other rows go through ``eps_fn`` unchanged, all in one forward of (rows + K·null rows)."""

    def __init__(self, eps_fn, num_classes: int):
        self.eps_fn, self.num_classes = eps_fn, num_classes

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        null = cond == NULL_MEAN
        if not bool(null.any()):
            return self.eps_fn(x_t, t, cond)
        K, idx = self.num_classes, null.nonzero().flatten()
        n = idx.numel()
        classes = torch.arange(K, device=cond.device).repeat_interleave(n)  # class k for every null row
        out = self.eps_fn(torch.cat([x_t, x_t[idx].repeat(K, *[1] * (x_t.ndim - 1))]),
                          torch.cat([t, t[idx].repeat(K)]), torch.cat([cond.clamp_min(0), classes]))
        eps, per_class = out[:x_t.shape[0]].clone(), out[x_t.shape[0]:]
        eps[idx] = per_class.reshape(K, n, *x_t.shape[1:]).float().mean(0).to(eps.dtype)
        return eps


def _check_null_class(name, v):
    if v == "mean":
        return
    if isinstance(v, str):
        raise bad_value(name, "None, 'mean' or a class id (int >= 0)", v)
    integer(lo=0, allow_none=True)(name, v)


def _check_prompt(name, v):
    if v is not None and (not isinstance(v, str) or not v):
        raise bad_value(name, "a non-empty prompt or None", v)


@dataclass(frozen=True)
class ESDOptions(Options):
    """ESD's options (module docstring for the choices behind the defaults)."""

    negative_guidance: Optional[float] = option(
        None, "η (None: 1.0 for concepts, 20.0 for fu.Classes; module docstring)", optional(positive()))
    params: Optional[str] = option(
        None, "the trained subset: 'esd-x', 'esd-x-strict', 'esd-u', 'full', 'class-embedding' (None: esd-x on "
        "text models, class-embedding for fu.Classes without LoRA, else full)", lambda n, v: check_params(v))
    start_guidance: float = option(3.0, "w, the classifier-free guidance of the x_t trajectories", positive())
    ddim_steps: int = option(50, "DDIM steps of a trajectory", integer())
    trajectory_pool: bool = option(True, "sample x_t from a pool of full trajectories refreshed every pool_refresh "
                                   "steps (False: B fresh trajectories each step, as the official loop)", boolean)
    pool_size: Optional[int] = option(
        None, "trajectories in the pool, at most 65,536 (None: 4 x batch size; 2 x batch size on latent pipelines, "
        "SD / SDXL). Each costs (ddim_steps - 1) x 2 UNet evaluations (98 with the defaults; at SDXL size, "
        "evaluations of the 2.6 B-parameter UNet on 128 x 128 latents) and keeps ddim_steps latents",
        integer(allow_none=True, hi=65536))
    pool_refresh: int = option(100, "steps between pool refreshes", integer())
    cache_generated: bool = option(
        True, "keep each trajectory pool on disk ($FASTUNLEARN_CACHE_DIR/generated, fastunlearn.generation) and "
        "reuse it in a later run with the same weights, prompts, seed, pool size, steps, guidance and resolution "
        "(pool_size x ddim_steps latents per pool: 0.2 GB for 64 SD-1.5 trajectories at 512 px in fp32)", boolean)
    null_class: Union[None, str, int] = option(
        None, "ε(x_t, ∅) on class models: None (the model's null class, else the mean over classes), 'mean', "
        "or a class id", _check_null_class)
    erase_from: Optional[str] = option(None, "c_from for concepts (§6.1 --erase_from; None: the concept itself)",
                                       _check_prompt)
    max_grad_norm: Optional[float] = option(None, "the global gradient clip (None: off, as the official code)",
                                            optional(positive()))


# ----------------------------------------------------------------------------------------- method
@register
class ESD(Method):
    name = "esd"
    description = "Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023)"
    targets = ("classes", "concept")
    defaults = dict(steps=200, batch_size=16, lr=1e-4, optimizer="adam", betas=(0.9, 0.999), weight_decay=0.0)
    class_defaults = dict(lr=3e-2)  # fu.Classes: one embedding row per class is trained (module docstring)
    negative_guidance_default = {"concept": 1.0, "classes": 20.0}
    Options = ESDOptions

    @classmethod
    def defaults_for(cls, forget, opts: dict, lora_rank=None) -> dict:
        """The run defaults for this target and options: training the class-embedding rows (the default
        for fu.Classes without LoRA) takes a larger lr (module docstring)."""
        rows = isinstance(forget, Classes) and (opts.get("params") == "class-embedding"
                                                or (opts.get("params") is None and lora_rank is None))
        return {**cls.defaults, **cls.class_defaults} if rows else dict(cls.defaults)

    @classmethod
    def trainable_filter(cls, opts):
        return PARAM_SUBSETS[opts["params"]] if opts.get("params") else None

    # ------------------------------------------------------------------------------ setup
    def setup(self):
        run, o = self.run, self.opts
        if o["ddim_steps"] > run.num_train_timesteps:
            raise bad_value("ddim_steps", f"an int in [1, {run.num_train_timesteps}]", o["ddim_steps"])
        classes = isinstance(run.forget_target, Classes)
        if o["params"] is not None:
            self.subset = o["params"]
        elif has_cross_attention(run.model):
            self.subset = "esd-x"
        elif classes and run.lora_rank is None and has_class_embedding(run.model):
            self.subset = "class-embedding"  # LoRA adapters do not wrap the embedding: then "full"
        else:
            self.subset = "full"
        apply_param_subset(run, self.subset)
        self.eta = o["negative_guidance"]
        if self.eta is None:
            self.eta = self.negative_guidance_default["classes" if classes else "concept"]
        self.roles = Roles(run)  # the frozen base θ* and the trained θ on one model (module docstring)
        self._eps, self.null_rows = self.teacher, 1  # ε of the frozen base; ∅ costs one row per row
        self._build_conditions(run.forget_target)
        self.pool_size = o["pool_size"] or (2 if run.latent else 4) * run.batch_size
        # trajectories per no-grad forward (twice that with guidance): a few latents at SD / SDXL size at a time
        self.pool_chunk = chunk_rows(run, self.pool_size)
        self.generated = []  # one fastunlearn.generation.Generated per pool built
        self._pool = None
        self._pool_at = None
        self.evals = {"sampling_rows": 0, "sampling_calls": 0, "teacher_rows": 0, "student_rows": 0}

    def _build_conditions(self, target):
        """c (one row per condition index), c_from (same rows) and ∅ (one row)."""
        run, o, den = self.run, self.opts, self.run.denoiser
        if isinstance(target, Classes):
            if den.kind != "class":
                raise bad_value("forget", "fu.Concept for a text model (fu.Classes needs class labels)", "Classes")
            if o["erase_from"] is not None:
                raise bad_value("erase_from", "None with fu.Classes (it is a prompt, for text models)", o["erase_from"])
            null = o["null_class"] if o["null_class"] is not None else den.null_class
            if null is None or null == "mean":
                null = NULL_MEAN
                K = den.num_classes
                self._eps = ClassMeanNull(self.teacher, K)
                self.null_rows = K
                self.null_desc = f"mean of the model's predictions over its {K} classes"
                why = ("this model declares no null class, so " if o["null_class"] is None else "")
                logger.info("ESD: %sε(x_t, ∅) is the %s (null_class='mean'; pass null_class=<id> to use a class)",
                            why, self.null_desc)
            elif null >= self.run.model.config.num_class_embeds or null in target.ids:
                raise bad_value("null_class", f"a class id in [0, {self.run.model.config.num_class_embeds}) that is "
                                "not being erased, or 'mean'", null)
            else:
                self.null_desc = (f"the model's null class {null}" if null == den.null_class
                                  else f"class {null} as a stand-in for the null class")
                logger.info("ESD: ε(x_t, ∅) is %s", self.null_desc)
            self.c = torch.tensor(list(target.ids), dtype=torch.long)
            self.c_from = self.c
            self.null = torch.tensor([null], dtype=torch.long)
        elif isinstance(target, Concept):
            if den.kind != "text":
                raise bad_value("forget", "fu.Classes for a class-conditional model (fu.Concept needs a text model "
                                "or pipeline)", "Concept")
            if o["null_class"] is not None:
                raise bad_value("null_class", "None for a text model (∅ is the empty prompt)", o["null_class"])
            self.null_desc = "the empty prompt"
            self.c = encode_prompts(run, [target.prompt])
            self.c_from = encode_prompts(run, [o["erase_from"]]) if o["erase_from"] else self.c
            self.null = encode_prompts(run, [""])
        else:  # erase() only lets the targets above through
            raise bad_type("forget", "fu.Classes or fu.Concept", target)
        self.n_cond = cond_len(self.c)

    def trainable_parameters(self):
        return self.run.trainable_parameters()

    @torch.no_grad()
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """ε_θ*(x_t, t, c) of the frozen base."""
        return self.roles.eps("teacher", x_t, t, cond)

    # ------------------------------------------------------------------------------ x_t
    def _null_rows(self, n):
        return take_cond(self.null, torch.zeros(n, dtype=torch.long))

    def _trajectories(self, x_T, ci, upto, on_step=None):
        run = self.run
        states, ts = ddim_states(self._eps, run.scheduler, x_T.to(run.device, run.dtype),
                                 cond_to(take_cond(self.c_from, ci), run.device), self.opts["ddim_steps"], upto,
                                 self.opts["start_guidance"], cond_to(self._null_rows(len(ci)), run.device), on_step)
        self.evals["sampling_rows"] += (1 + self.null_rows) * len(ci) * upto
        self.evals["sampling_calls"] += upto
        return states, ts

    def _refresh_pool(self, seed):
        """``pool_size`` full trajectories of the frozen base from ``seed``, ``pool_chunk`` at a time, shown in
        a progress bar and cached on disk (``fastunlearn.generation``)."""
        run, o = self.run, self.opts
        K, P, w = o["ddim_steps"], self.pool_size, o["start_guidance"]
        g = torch.Generator().manual_seed(seed)
        ci = torch.randint(0, self.n_cond, (P,), generator=g)
        x_T = torch.randn(P, *run.denoiser.sample_shape, generator=g)
        chunk = self.pool_chunk
        t0 = time.perf_counter()

        def make():
            parts, ts = [], None
            desc = describe("trajectories for ESD's pool", P, K - 1, w, self.null_rows)
            with progress_bar(run, -(-P // chunk) * (K - 1), desc) as bar:
                for a in range(0, P, chunk):
                    states, ts = self._trajectories(x_T[a:a + chunk], ci[a:a + chunk], K - 1,
                                                    on_step=lambda: bar.update(1))
                    parts.append(torch.stack(states))
            return {"states": parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), "timesteps": ts}

        key = lambda: dict(kind="esd-pool", c_from=tensor_digest(self.c_from),  # noqa: E731
                           null=tensor_digest(self.null), null_desc=self.null_desc, seed=int(seed), rows=P, steps=K,
                           guidance=float(w), chunk=int(chunk))
        tensors, hit, f = cached(run, key, make, cache=o["cache_generated"])
        seconds = time.perf_counter() - t0
        if hit:
            announce(run, f"ESD trajectory pool ({P} trajectories) from the cache ({f}, {seconds:.1f} s)")
        self.generated.append(dict(what="pool", rows=P, steps=K - 1, guidance=float(w), seconds=round(seconds, 3),
                                   unet_evals=0 if hit else (1 + self.null_rows) * P * (K - 1), cached=hit,
                                   cache_file=f))
        self._pool = (tensors["states"].to(run.device), ci, tensors["timesteps"])  # [K, P, ...]: state k of p

    def draw(self, step: int, gen: torch.Generator):
        """(x_t, t, condition index per row) for this step; all randomness from ``gen`` (or, for a pool
        built at an earlier step, from that step's generator)."""
        run, K, B = self.run, self.opts["ddim_steps"], self.run.batch_size
        if self.opts["trajectory_pool"]:
            R = self.opts["pool_refresh"]
            r = step - step % R
            if step == r:  # a refresh step always takes the pool's seed as its generator's first draw
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            elif self._pool_at != r:  # resumed between refreshes: replay the refresh step's first draw
                seed = int(torch.randint(0, 2**62, (1,), generator=step_generator(run.seed, r)))
            if self._pool_at != r or step == r:
                self._refresh_pool(seed)
                self._pool_at = r
            states, pool_ci, ts = self._pool
            j = torch.randint(0, self.pool_size, (B,), generator=gen)
            k = torch.randint(0, K, (B,), generator=gen)
            return states[k.to(states.device), j.to(states.device)], ts[k].to(run.device), pool_ci[j]
        k = int(torch.randint(0, K, (1,), generator=gen))
        ci = torch.randint(0, self.n_cond, (B,), generator=gen)
        x_T = torch.randn(B, *run.denoiser.sample_shape, generator=gen)
        states, ts = self._trajectories(x_T, ci, k)
        return states[-1], torch.full((B,), int(ts[k]), dtype=torch.long, device=run.device), ci

    # ------------------------------------------------------------------------------ step
    def loss(self, x_t, t, ci):
        """L_ESD on one batch (§6.1); the teacher's evaluations share one forward (§6.5)."""
        run, B = self.run, x_t.shape[0]
        c = cond_to(take_cond(self.c, ci), run.device)
        null = cond_to(self._null_rows(B), run.device)
        if self.c_from is self.c:
            e_c, e_null = self._eps(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(c, null)).chunk(2)
            e_from, c_from = e_c, c
        else:
            c_from = cond_to(take_cond(self.c_from, ci), run.device)
            e_from, e_c, e_null = self._eps(torch.cat([x_t] * 3), torch.cat([t] * 3),
                                            cat_cond(c_from, c, null)).chunk(3)
        self.evals["teacher_rows"] += B * ((1 if self.c_from is self.c else 2) + self.null_rows)
        self.evals["student_rows"] += B
        pred = run.denoiser(x_t, t, c_from)
        return ops.esd_loss(pred, e_from, e_c, e_null, self.eta)

    def step(self, step, gen):
        before = self.evals["sampling_rows"]
        x_t, t, ci = self.draw(step, gen)
        loss = self.loss(x_t, t, ci)
        params = self.trainable_parameters()
        g = torch.autograd.grad(loss, params, allow_unused=True)
        g = dense_grads(g, params)
        stats = clip_single(g, params, self.opts["max_grad_norm"])
        return {"loss": loss.item(), "sampling_rows": float(self.evals["sampling_rows"] - before), **stats}

    def finish(self, result):
        B, steps = self.run.batch_size, result.meta.get("steps")
        K = self.opts["ddim_steps"]
        # Fresh sampling (no pool) costs (1 + null rows)·B·k rows per step with k ~ U{0..K−1}: 2·B·(K−1)/2 on
        # average with a null class, (1 + classes)·B·(K−1)/2 with the class mean.
        result.extras["unet_evals"] = {**self.evals, "trajectory_pool": self.opts["trajectory_pool"],
                                       "pool_size": self.pool_size if self.opts["trajectory_pool"] else None,
                                       "no_pool_expected_sampling_rows":
                                           ((1 + self.null_rows) * B * (K - 1) * steps // 2) if steps else None}
        if self.generated:  # the pools built (fastunlearn.generation): rows, steps, UNet evaluations, cache hits
            result.extras["generated"] = {"pool": self.generated}
        result.extras["params"] = self.subset
        result.extras["negative_guidance"] = self.eta
        result.extras["null"] = self.null_desc
