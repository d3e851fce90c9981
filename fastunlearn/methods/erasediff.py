"""EraseDiff: "Erasing Undesirable Influence in Diffusion Models" (Wu, Le, Hayat, Harandi; CVPR 2025), spec §4.

Problem (§4.1): keep the retain data's denoising loss low while the forget data is pushed off the
true denoising trajectory. Both losses use the MEAN reduction (§1), with x_t = γ_t x_0 + σ_t ε:

    F(θ) = L_r = MEAN ‖ε − ε_θ(x_t^r, t, c_r)‖²                                                     (1)
    f(θ) = L_f = MEAN ‖target − ε_θ(x_t^f, t, c_f)‖²                                                (2)

``forget_target`` chooses the target of (2); the default ``None`` means ``"relabel"`` on conditional models
and ``"uniform"`` on unconditional ones (the only target they allow):

* ``"relabel"`` (the released code since 2024-08, §4.2): target = stopgrad ε_θ(x_t^f, t, c̃), the
  *current* network's prediction on the same noisy forget input under another condition, with Gaussian
  ε. For classes c̃ is a random class that is not being forgotten: ONE class for the whole batch as in the
  official code (``randint(1, 10, (1,))``), or one per row with ``relabel="row"`` (a lower-variance
  estimate of the same expectation). For concepts c̃ is the anchor prompt (``Concept(..., anchor=...)``;
  the empty prompt when none is given), as the SD scripts map the forget captions (nudity, naked, …) onto
  the fixed anchor "a photo of a pokemon" (§4.4; "a photo of a person wearing clothes" is their retain prompt,
  not the anchor). On a text model with ``DataPoints`` to forget, c̃ is the empty prompt.
* ``"uniform"`` (the paper's v1 / ICLR'25 version, Eq. (2)): ε_f ~ U[0, 1)^D both noises the input and is
  the target. This is the only choice for unconditional models (there is no other label to map onto).

Update (§4.1 Eq. (6), first-order BOME; ∇q = ∇f because f(φ^K) is a constant):

    θ ← Adam(∇L_r + λ ∇L_f),  then the global clip at ``max_grad_norm`` (1.0 in the DDPM code)

``lambda_rule`` chooses λ:

* ``"fixed"``: λ = ``lambd`` (default 0.1, the DDPM ``lambda_bome``, or 0.02 with the frozen retain target, the
  class-model default below; the SD scripts use 1.0). One forward
  of the retain and forget rows concatenated and one backward of L_r + λ L_f (§8 "same-weight batching").
* ``"adaptive"``: the official code's rule when ``lambda_bome < 0`` (§4.2), a cosine variant:
  λ = max(η − cos(∇L_r, ∇L_f), 0), cos = ⟨·,·⟩/(‖·‖‖·‖ + 1e-8), which is 0 (λ = η) when either gradient
  vanishes.
* ``"bome"``: the paper's BOME control, λ = max((η‖∇f‖² − ⟨∇F, ∇f⟩)/‖∇f‖², 0) (left as a comment in the
  official code); λ = 0 when ∇f = 0 (nothing to add).

For both adaptive rules the two gradients come from one concatenated forward as two vector-Jacobian
products; ``fastunlearn.surgery.pair_stats`` yields ‖∇L_r‖², ‖∇L_f‖², ⟨∇L_r, ∇L_f⟩ in one pass, and λ and
the clip factor (‖g_r + λ g_f‖² = ‖g_r‖² + 2λ⟨g_r, g_f⟩ + λ²‖g_f‖²) follow in closed form (§8).

Why the official inner loop is dropped (§4.3). The official DDPM loop runs, per outer block, 2×40 inner
Adam steps on L_f starting from θ (the lower level φ^K of Eq. (4)-(5)), then restores θ and uses
L_q = L_du − meter.avg with meter.avg *detached*. So the inner loop never changes the outer gradient
(∇L_q = ∇L_du); it only shifts the logged value of L_q and perturbs Adam's moments (the 640 inner steps
share the optimizer, whose state is not restored). This module implements the mathematically clean
version, Adam on L_r + λ L_f, and saves those 640 extra forward/backward passes. The official 10% label
dropout on the forget forward (``cond_drop_prob``, §4.2) is not applied: the relabel target already
comes from a separate, undropped forward.

Timesteps: ``antithetic_t`` (default True, as in the official code): t = cat[t', T−1−t'][:B], t' ~ U{0..T−1},
shared by the retain and forget rows (the official L_du uses the retain t vector).

Data. ``forget`` is ``DataPoints`` (the images to forget, with labels or prompts), ``fu.Classes`` or a
``fu.Concept``; for the latter two the forget images are generated from the frozen base with the class
labels / concept prompt unless ``Concept.images`` holds some. ``retain`` is ``DataPoints``, a list of prompts,
or ``fu.Classes`` (images generated likewise). With ``forget=fu.Classes`` the retain rows of the forgotten
classes are dropped (D_r is "the data minus the forgotten classes", §4.3).

Generated data (``fastunlearn.generation``). The official code trains on real images only (§4.2, §4.4; the SD
scripts' NSFW and Imagenette sets), so generating them is this library's data-free stand-in, sized so that it
costs little next to training: ``n_generate`` images per side with DDIM ``generate_steps`` steps, 256 × 50 on
class-conditional and unconditional models (small pixel models), 64 × 25 on text-to-image pipelines and 32 × 25
on SDXL. The SD scripts draw every batch from the same first 16 images of an unshuffled loader (§4.4 (ii)), so a
few dozen images of a concept are what the official runs see. On text models the images are guided as the
pipeline draws them by default (``generate_guidance`` None: the pipeline's ``guidance_scale`` default, 7.5 for SD,
5.0 for SDXL; 1.0 turns guidance off), which doubles the UNet evaluations: one image costs ``generate_steps`` ×
2 of them, 50 at SDXL size (1024 px, 128² latents) with the defaults, so 3,200 for both sides. Class models
generate without guidance (their training data is drawn unguided). The generation shows in the progress
display (``progress=False`` hides it), is counted in ``Result.extras["generated"]`` (rows, steps, guidance,
UNet evaluations, seconds, cache hit) and is cached on disk (``cache_generated``, on by default): a later run
with the same base weights, prompts, seed, counts, steps, guidance and resolution takes the same images from
``$FASTUNLEARN_CACHE_DIR/generated`` and ends with the same weights. On the tiny SD test pipeline with a VAE
(``fastunlearn.text``, 2 loaded CPU cores) a Concept with prompt retain generated 256 + 256 images × 50 steps in
69 s before the first step; the defaults generate 64 + 64 × 25 guided steps in 33 s, and a run with the cache in
0.3 s.

Parameter subsets: ``params`` as for ESD (§4.4 uses the same switch): ``"full"`` (default, DDPM code),
``"esd-u"`` (every parameter outside ``attn2``; the SD scripts' ``noxattn`` also freezes ``out.`` and
``time_embed``), ``"esd-x"``, ``"esd-x-strict"``.

Relabel class. ``relabel="auto"`` (default) maps the forgotten classes onto ONE kept class chosen from the
model before training: the class farthest from the forgotten label in the model's own score space,
c̃ = argmax_k E‖ε(x_t, t, k) − ε(x_t, t, c_f)‖² over noised forget images (t uniform, 4 × 64 rows, one
forward per class). Why a fixed class, and why that one: training drives ε_θ(·, c_f) to ε(·, c̃), so the
forgotten label ends up drawing what c̃'s prediction draws on c_f's inputs. The official random class per
batch (``relabel="batch"``, the DDPM code's ``randint``) has as its fixed point the *mean* of the other
classes' predictions, which on the bundled digits model itself draws 9% threes (100 samples, seed 0): it
plateaus at 5-8% of digit-3 samples still recognised as 3 after 100-300 steps. One fixed class has no such
floor (``relabel=0``: 0-1% in 100 steps), and the farthest one keeps the least of c_f's modes in the target
(a look-alike class, e.g. 5 or 8 for a 3, would leave more). ``Result.extras`` records the chosen class and
every class's distance. ``"batch"`` (official) and ``"row"`` (one random class per row) stay available; an
int maps onto that class, as the SD scripts map a concept onto one fixed anchor prompt
(``fu.Classes(..., override=k)`` sets it too).

Stopping rule (``forget_tol``) and the step cap. Eq. (3) is a constrained problem: keep L_r low *subject to* θ
minimising L_f. The official code runs a fixed number of epochs and the paper gives no stopping criterion, and
no fixed count fits every class: with the former default of 150 steps (``relabel="auto"``) digits 0, 3, 4, 6, 9
of the bundled model reach 0-1%, but 5, 2, 1, 7, 8 keep 3, 6, 9, 12 and 13% (worst kept digit 93.7%); digit 8
goes 92% → 63% → 13% → 0% at steps 50, 100, 150, 200, digit 1 51% → 27% → 9% → 4%. So the run stops when the
constraint is met, with ``steps`` as the cap. With the relabel target on a class model the constraint's minimum
is L_f = 0 (the forgotten label predicts what c̃ predicts: c̃ could be copied into c_f's embedding), so "met"
is read relative to where L_f started: stop once the mean of the last ``STOP_WINDOW`` = 20 steps' L_f (the
training losses themselves: no extra forward; the window averages out the random t and rows) is at most
``forget_tol`` × L_f(θ_0), L_f(θ_0) being the relabel class's distance measured at setup (the mean over the other
classes for ``relabel="batch"``/``"row"``). The decision reads only the history, so a resumed run stops where an
uninterrupted one does; ``Result.meta["steps"]`` is the steps run and ``Result.extras["stopped_at"]`` the stop.
With the noise retain target the default is ``forget_tol=0.2`` (0.15 with the frozen one, below): on digit 8, L_f /
L_f(θ_0) is about 0.6 at step 100 (63% of the samples still eights), 0.4 at step 150 (13%), 0.2 at step 200 (0%),
and then levels off near 0.1 (the retain term and the moving target balance), so a much smaller tolerance would run
to the cap every time. The cap, 400 steps, is above the slowest digit's stop (digit 1, 346 steps). ``forget_tol=0``
runs every step (the official fixed schedule; with it the default is 150 steps, so ``forget_tol=0`` alone is the
former default). The rule is on by default only where L_f(θ_0) is measured and L_f's minimum is 0: class-conditional
models with the relabel target (on text models, or with the uniform target whose minimum is the noise's variance,
``forget_tol`` must be None or 0; those run the 150-step schedule, ``defaults_for``).
Measured with the former defaults (noise target, 0.2) on every digit (``benchmarks/method_checks.py erasediff-sweep``;
``benchmarks/results/erasediff_sweep.md``): 0-1% on eight digits, but digit 2 stops at 4% (3% at 300 samples per
label) and forgetting 7 keeps digit 1 at 93.0% of its rate (92.8% at 300); the mean kept rate is 98.3-100.6%.
Tolerances 0.15 and 0.1 reach ≤ 2% everywhere but cost look-alike kept digits more (5 when forgetting 3 or 6, 1
when forgetting 8: down to 92.6-93.8%), so no tolerance meets "≤ 2% forgotten, ≥ 95% kept" on every digit with the
noise target; 0.2 stays its tolerance (the fewest misses, the fewest steps).

Retain side (``retain_batch_size``, off by default). ``retain_batch_size`` draws that many retain rows per step
instead of the batch size (the first batch-size rows share the forget rows' t; L_r stays their mean, so only its
variance changes). Measured with ``forget_tol=0.15`` (``benchmarks/results/erasediff_retain.md``; 100 samples per
label, forget after / worst kept ratio (digit) / steps): 64 retain rows reach ≤ 2% on every digit and stop sooner
(digit 8: 0% / 96.9% (9) / 196, was 263 steps; 7: 0% / 98.0% (8) / 214; 9: 0% / 95.8% (3) / 146; 2: 2% / 98.0% (7)
/ 170), but forgetting 0 keeps digit 3 at 93.7% (the only miss of the ten; at 300 samples digit 9 at 93.4%, where
plain 0.15 keeps 98.3%, while the 300-sample misses of plain 0.15 are gone: 3 → 5 96.5%, 6 → 1 97.7%, 8 → 9 98.3%);
128 rows: ≤ 1% on every digit, but 0 → digit 3 93.7% and 4 → digit 3 94.7% (95 of digit 3's 100 samples are
recognised before, so two and one samples under the 95% line). So the closest setting is ``retain_batch_size=64,
forget_tol=0.15`` (one miss) with the noise target. Why 64 rows stop sooner (digit 0: 179 steps, 212 without): not
the clip (its factor is 1 in both runs, gradient norm 0.20 vs 0.26), but L_f falls faster per step (mean 0.0292 vs
0.0384 over steps 50-100), presumably because Adam divides by a second moment that the retain noise had inflated;
slowed down with lr 3e-5, 64 rows keep digit 3 at 94.7% when forgetting 0 (299 steps), still one sample short.
Loss-aware retain sampling (drawing the kept classes by their running retain loss over its value at setup) was
tried on a branch and not kept: the loss ratios did not single out the damaged class (forgetting 0: digit 3's
1.1166 within 1.0394-1.1457), and with 64 rows it kept digit 3 at 91.6% when forgetting 0.

Retain target (``retain_target``; ``"noise"``: Eq. (1), the paper's and the official code's). ``"frozen"``
regresses onto the input model's prediction on the same noisy retain rows instead of the noise,
L_r = MEAN ‖ε_θ0(x_t^r, t, c_r) − ε_θ(x_t^r, t, c_r)‖² (no gradient through θ0, the frozen base of
``fastunlearn.roles``: adapters off with LoRA, else a snapshot of the trained tensors taken at setup): 0 at θ0, with
no irreducible noise term (digit 0, 100 steps: L_r 0.0006 on average against 0.064). Cost: one more no-grad forward
of the retain rows per step (100 steps: 14.6 s against 12.4 s, one thread). Measured
(``benchmarks/results/erasediff_retain/retain_target.md``; forget after / worst kept (digit) / steps, 100 samples per
label): with the other defaults it forgets three times sooner (51-83 steps, 62 on average) and the kept samples move
less (forgetting 0: digit 3's mean squared change 0.0077 against 0.0101), but the same borderline samples flip and it
misses three digits: 0 → digit 3 94.7%, 5 → digit 9 93.9%, 2 keeps 3%; forget_tol 0.15, 64 retain rows, λ 0.05 or
lr 2.5e-5 keep digit 3 at 93.7-94.7% when forgetting 0. Presumably, without the retain noise in Adam's second moment
the forget term sets the step size, so λ must be smaller: ``retain_target="frozen", lambd=0.02, forget_tol=0.15``
meets "≤ 2% forgotten, ≥ 95% kept" on all ten digits (worst forget 2% (digit 2), worst kept 96.8% (0 → digit 3),
84-156 steps, 113 on average, 13-23 s a run against 19-20 s for the defaults on digits 0 and 2; at 300 samples:
worst forget 1%, worst kept 99.0% (4 → digit 9)), but narrowly: with training seed 1 digit 2 keeps 3% (kept digits
≥ 98.0% on 0, 2, 4, 5). The noise target with the same λ and tolerance does not forget within the 400-step cap (0: 5%
left, 2: 67%, 4: 25%, 5: 49%), so the frozen target is what allows the small λ. **So on class-conditional models
with the relabel target (where the stopping rule is on) the defaults are ``CLASS_RECIPE``: ``retain_target="frozen",
lambd=0.02, forget_tol=0.15``** (a deliberate departure from Eq. (1), which the official code and the paper share;
``retain_target="noise"`` restores it, with λ 0.1 and ``forget_tol`` 0.2, the former defaults, and ``forget_tol=0``
the official fixed schedule). Text models and the uniform target keep the noise target and λ 0.1 (not measured
there: the SD scripts' anchor runs have no stopping rule and no tuning of this kind).

EMA (``ema``). The official DDPM code keeps an EMA of the weights (μ = 0.99, updated after every outer
step, starting from the input weights) and samples and saves that copy; the SD scripts keep none.
``ema=0.99`` (or ``"official"``: 0.99 on pixel models, off on text models) does the same here: the result
is the EMA copy, which travels with checkpoints. It is off by default because at this library's step
counts it undoes the forgetting: after 150 steps the EMA still holds 0.99^150 = 22% of the
input weights and lags the trained weights by ~100 steps; on digit 3 of the bundled model the EMA copy
still draws 62% threes where the trained weights draw 1% (the official run takes 288 outer steps).

The uniform target barely forgets a class there (69% still recognised after 150 steps): its noised inputs
(mean 0.5) are never visited when sampling from Gaussian noise.

Frozen base without a second copy: the relabel target is the *current* network's (official), so training
needs no teacher; the images generated for ``fu.Classes`` / ``fu.Concept`` / prompt retain sets come from the
model at setup (before any update), or, with ``lora_rank``, from the same model with its adapters off.

Defaults, tuned on the bundled digits model (forget digit 3's 183 images, retain the other 1,614, with
``relabel=0``, the class ``"auto"`` picks there): Adam (official), batch 32 per set, lr 5e-5, λ = 0.1 (the DDPM
value), η 0.1, clip 1.0 (DDPM); 150 steps, or at most 400 with the stopping rule (class models, where λ, the retain
target and ``forget_tol`` are ``CLASS_RECIPE``'s, above). The λ measurements below are of the noise target.
Measured (100 samples per digit), λ at 150 steps of lr 5e-5: 0.1: 1% threes, the other digits keep 100.5% of
their rate on average, the worst 97.8%; 1.0 (the SD shell scripts' value): 1%, 97.0%, worst 91.4% (digit 0, the
relabel target); with ``relabel=8``, λ 0.1 … 1.0 all reach 0-1% while the worst digit goes from 94.9% to 91.8%.
Other schedules at λ = 1: lr 1e-4 × 100 steps forgot as well but kept the weakest digit at 0.87 of its rate; 3e-5 ×
200 steps: 0%, 0.98, 0.93; lr 3e-4 cut the weakest digits by up to 40%. 150 steps of batch 32 take ~20 s on 2 CPU
cores (an idle machine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import ops
from ..conditioning import cat_cond, cond_len, take_cond
from ..errors import bad_value
from ..roles import Roles
from ..surgery import clip_factor, clip_single, dense_grads, pair_stats, write_combination
from ..targets import Classes, Concept, DataPoints
from .base import Method, Options, boolean, integer, one_of, option, optional, positive, register
from ..generation import chunk_rows, generate, uses_guidance
from .esd import PARAM_SUBSETS, apply_param_subset, encode_prompts

FORGET_TARGETS = ("relabel", "uniform")
RETAIN_TARGETS = ("noise", "frozen")
MAX_GENERATE = 65536  # generated images per side: a typo (1e6) would cost days, not a clear error
DEFAULT_FORGET_TOL = 0.2  # the stopping rule's tolerance with the noise retain target (module docstring)
DDPM_LAMBD = 0.1  # λ of the official DDPM code (lambda_bome)
# The defaults where the stopping rule is on (class-conditional models with the relabel target): the frozen retain
# target with a smaller λ and a tighter tolerance, the one setting measured to forget every bundled digit to <= 2%
# with every other digit kept >= 95% (module docstring, "Retain target").
CLASS_RECIPE = {"retain_target": "frozen", "lambd": 0.02, "forget_tol": 0.15}
STOP_WINDOW = 20  # steps whose mean L_f the stopping rule reads
LAMBDA_RULES = ("fixed", "adaptive", "bome")


def _check_relabel(name, r):
    if not (r in ("auto", "batch", "row") or (isinstance(r, int) and not isinstance(r, bool) and r >= 0)):
        raise bad_value(name, "'auto' | 'batch' | 'row' | a class id to map the forgotten classes onto", r)


def _check_tol(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0):
        raise bad_value(name, "None (the default: %g on class-conditional models with the relabel target, off "
                        "elsewhere), 0 (off: run every step, as the official code) or a number in (0, 1)"
                        % DEFAULT_FORGET_TOL, v)


def _check_ema(name, e):
    if not (e in ("official", None) or (isinstance(e, float) and 0.0 < e < 1.0)):
        raise bad_value(name, "None (off, the default), 'official' (0.99 on pixel models as the DDPM code, off "
                        "on text models as the SD scripts) or a decay in (0, 1)", e)


@dataclass(frozen=True)
class EraseDiffOptions(Options):
    """EraseDiff's options (module docstring for the measurements behind the defaults)."""

    forget_target: Optional[str] = option(
        None, "the target of the forget term: 'relabel' (conditional models) or 'uniform' (noise; the default on "
        "unconditional models)", optional(one_of(*FORGET_TARGETS)))
    lambd: Optional[float] = option(
        None, "λ of L_r + λ L_f with lambda_rule='fixed' (None: %g with retain_target='frozen', else %g, the DDPM "
        "lambda_bome; the SD scripts use 1.0)" % (CLASS_RECIPE["lambd"], DDPM_LAMBD),
        optional(positive(allow_zero=True)))
    lambda_rule: str = option("fixed", "'fixed' (λ = lambd), 'adaptive' or 'bome' (λ from the two gradients, §4)",
                              one_of(*LAMBDA_RULES))
    eta_bome: float = option(0.1, "η of lambda_rule='bome'", positive(allow_zero=True))
    antithetic_t: bool = option(True, "t = cat[t', T-1-t'] as in the official code", boolean)
    relabel: Union[str, int] = option(
        "auto", "'auto' (the kept class farthest in score space), 'batch' (official: a random class per batch), "
        "'row', or a class id", _check_relabel)
    params: str = option("full", "the trained subset: 'full' (DDPM code), 'esd-u', 'esd-x', 'esd-x-strict'",
                         one_of(*PARAM_SUBSETS))
    max_grad_norm: Optional[float] = option(1.0, "the global gradient clip (1.0 in the DDPM code; None: off)",
                                            optional(positive()))
    n_generate: Optional[int] = option(
        None, "images generated per side (forget, retain) for fu.Classes / fu.Concept / prompt targets, at most "
        f"{MAX_GENERATE:,} (None: 256 on class-conditional and unconditional models, 64 on text-to-image pipelines, "
        "32 on SDXL). Each costs "
        "generate_steps x (2 with guidance, else 1) UNet evaluations: 50 of the SDXL UNet at 1024 px with the "
        "defaults", integer(allow_none=True, hi=MAX_GENERATE))
    generate_steps: Optional[int] = option(
        None, "DDIM steps of each generated image, at most the scheduler's training timesteps (None: 50 on class-"
        "conditional and unconditional models, 25 on text-to-image pipelines)", integer(allow_none=True))
    generate_guidance: Optional[float] = option(
        None, "classifier-free guidance w of the generated images (None: the pipeline's own default on text "
        "models, 7.5 for SD and 5.0 for SDXL; none on class models). 1.0: no guidance (half the evaluations)",
        optional(positive()))
    cache_generated: bool = option(
        True, "keep the generated images on disk ($FASTUNLEARN_CACHE_DIR/generated, fastunlearn.generation) and "
        "reuse them in a later run with the same weights, prompts, seed, counts, steps, guidance and resolution",
        boolean)
    forget_tol: Optional[float] = option(
        None, "stop once L_f (mean of the last 20 steps) is at most forget_tol × L_f at the start, steps being the "
        "cap; None: on class-conditional models with the relabel target %g (%g with retain_target='noise'), off "
        "elsewhere; 0: off (every step, as the official code)" % (CLASS_RECIPE["forget_tol"], DEFAULT_FORGET_TOL),
        _check_tol)
    retain_batch_size: Optional[int] = option(
        None, "retain rows per step (None: the batch size, as the forget rows and the official code); more rows "
        "give L_r a lower-variance gradient. The first batch-size retain rows share the forget rows' timesteps",
        integer(allow_none=True, lo=1))
    retain_target: Optional[str] = option(
        None, "the target of the retain term: 'noise' (ε, Eq. (1) as in the paper and the official code) or "
        "'frozen' (the input model's prediction on the same noisy retain rows, no gradient: L_r is 0 at the input "
        "weights; one extra no-grad forward of the retain rows per step). None: 'frozen' on class-conditional "
        "models with the relabel target, 'noise' elsewhere", optional(one_of(*RETAIN_TARGETS)))
    ema: Union[None, str, float] = option(
        None, "EMA of the weights: None (off), 'official' (0.99 on pixel models, off on text models) or a decay",
        _check_ema)


def adaptive_lambda(nr2: float, nf2: float, dot: float, eta: float) -> float:
    """The official cosine rule (§4.2): max(η − ⟨g_r, g_f⟩/(‖g_r‖‖g_f‖ + 1e-8), 0)."""
    cos = dot / (math.sqrt(max(nr2, 0.0)) * math.sqrt(max(nf2, 0.0)) + 1e-8)
    lam = max(eta - cos, 0.0)
    return lam if math.isfinite(lam) else 0.0


def bome_lambda(nr2: float, nf2: float, dot: float, eta: float) -> float:
    """The BOME control (§4.1 Eq. (6)): max((η‖∇f‖² − ⟨∇F, ∇f⟩)/‖∇f‖², 0); 0 when ∇f = 0."""
    if not nf2 > 0.0:
        return 0.0
    lam = max((eta * nf2 - dot) / nf2, 0.0)
    return lam if math.isfinite(lam) else 0.0


@register
class EraseDiff(Method):
    name = "erasediff"
    description = "EraseDiff: Erasing Undesirable Influence in Diffusion Models (Wu et al., CVPR 2025)"
    targets = ("datapoints", "classes", "concept")
    needs_retain = False  # retain data is required, but it may be prompts or fu.Classes (checked in setup)
    defaults = dict(steps=150, batch_size=32, lr=5e-5, optimizer="adam", betas=(0.9, 0.999), weight_decay=0.0)
    # class models with the relabel target: steps is the cap of the stopping rule (forget_tol), above the slowest
    # digit's stop (module docstring)
    class_defaults = dict(steps=400)
    Options = EraseDiffOptions
    OFFICIAL_EMA = 0.99  # cifar10_erasediff.yml (DDPM code); the SD scripts keep no EMA (§4.2, §4.4)

    @classmethod
    def stops_early(cls, forget, opts: dict) -> bool:
        """Whether the stopping rule is on for this target and these options: a class-conditional model (the target
        is ``fu.Classes`` or labelled ``DataPoints``) with the relabel target and ``forget_tol`` not 0."""
        class_model = isinstance(forget, Classes) or (isinstance(forget, DataPoints) and forget.labels is not None)
        return class_model and opts.get("forget_target") != "uniform" and opts.get("forget_tol") != 0

    @classmethod
    def defaults_for(cls, forget, opts: dict, lora_rank=None) -> dict:
        """The run defaults for this target and options: with the stopping rule on, ``steps`` is its cap (400);
        otherwise the fixed schedule of 150 steps."""
        return {**cls.defaults, **cls.class_defaults} if cls.stops_early(forget, opts) else dict(cls.defaults)

    @classmethod
    def trainable_filter(cls, opts):
        return PARAM_SUBSETS[opts["params"]]

    def trainable_parameters(self):
        return self.run.trainable_parameters()

    # ------------------------------------------------------------------------------ setup
    def setup(self):
        run, o = self.run, self.opts
        self.kind = run.denoiser.kind
        self.forget_target = o["forget_target"] or ("uniform" if self.kind == "uncond" else "relabel")
        if self.forget_target == "relabel" and self.kind == "uncond":
            raise bad_value("forget_target", "'uniform' for an unconditional model ('relabel' maps the forget "
                            "data onto another class or prompt, and this model has none)", "relabel")
        apply_param_subset(run, o["params"])
        self._size_generation()
        # The defaults that depend on the model: the class recipe where the stopping rule is on (CLASS_RECIPE).
        class_rule = self.kind == "class" and self.forget_target == "relabel"
        self.retain_target = o["retain_target"] or ("frozen" if class_rule else "noise")
        frozen_target = self.retain_target == "frozen"
        self.lambd = float(o["lambd"] if o["lambd"] is not None else
                           CLASS_RECIPE["lambd"] if frozen_target else DDPM_LAMBD)
        # The frozen input model (fastunlearn.roles), for the frozen retain target and, with LoRA, for generating
        # data: the adapters off with LoRA, else a snapshot of the trained tensors taken now, before any update;
        # declared as the method's roles so runtime casts the snapshot.
        lora = run.lora_rank is not None
        teacher = None
        if frozen_target or lora:
            self.roles = Roles(run)
            teacher = self.roles.network("teacher")
        self.frozen = teacher if frozen_target else None  # ε of the input model for the retain term
        self.teacher = teacher if lora else None
        self._data_seed = run.seed * 7919 + 17  # generated data: fixed per run, so a resumed run sees the same
        forget = run.forget_target
        self.forgotten = None  # class ids the relabel target must avoid
        if isinstance(forget, Classes):
            self.forgotten = list(forget.ids)
            n = self.n_generate
            labels = torch.tensor(self.forgotten).repeat_interleave(-(-n // len(self.forgotten)))[:n]
            run.forget = (self._generate(labels, what="forget images"), labels)
        elif isinstance(forget, Concept):
            if self.kind != "text":
                raise bad_value("forget", "fu.Classes or fu.DataPoints for a class-conditional or unconditional "
                                "model (fu.Concept needs a text model or pipeline)", "Concept")
            if forget.images is not None:
                pts = forget.images
                prompts = pts.prompts if pts.prompts is not None else [forget.prompt] * len(pts)
                run.forget = (pts.images.float(), encode_prompts(run, prompts))
            else:
                cond = encode_prompts(run, [forget.prompt] * self.n_generate)
                run.forget = (self._generate(cond, what="forget images"), cond)
            self.anchor = encode_prompts(run, [forget.anchor or ""])
        else:  # DataPoints, already prepared by erase()
            x0, cond = run.forget
            if isinstance(cond, list):
                cond = encode_prompts(run, cond)
            run.forget = (x0, cond)
            if self.kind == "class":
                self.forgotten = sorted(set(cond.tolist()))
            elif self.kind == "text":
                self.anchor = encode_prompts(run, [""])
        self._setup_retain(run.retain_target)
        if class_rule:
            others = [c for c in range(run.denoiser.num_classes) if c not in set(self.forgotten)]
            if not others:
                raise bad_value("forget", "fewer classes than the model has ('relabel' maps them onto the others)",
                                self.forgotten)
            fixed = o["relabel"] if isinstance(o["relabel"], int) else getattr(run.forget_target, "override", None)
            if fixed is not None and fixed not in others:
                raise bad_value("relabel", f"a class id in [0, {run.denoiser.num_classes}) that is not being "
                                "forgotten", fixed)
            self.forget_tol = float(o["forget_tol"] if o["forget_tol"] is not None else
                                    CLASS_RECIPE["forget_tol"] if frozen_target else DEFAULT_FORGET_TOL)
            if (fixed is None and o["relabel"] == "auto") or self.forget_tol > 0:
                dist = self._relabel_distances(others if fixed is None else [fixed])
                if fixed is None and o["relabel"] == "auto":
                    fixed = max(dist, key=dist.get)
                    self.relabel_distances = dist
                # L_f at the start: E‖ε(x_t, c_f) − ε(x_t, c̃)‖², c̃ the fixed class or a random other one
                self.forget_loss_start = dist[fixed] if fixed is not None else sum(dist.values()) / len(dist)
            if fixed is not None:
                others = [fixed]
            self.others = torch.tensor(others, dtype=torch.long)
        elif o["forget_tol"]:
            raise bad_value("forget_tol", "None or 0 here: the stopping rule reads L_f against its value at the start, "
                            "which is measured on class-conditional models with forget_target='relabel'",
                            o["forget_tol"])
        else:
            self.forget_tol = 0.0
        self.ema = None
        decay = o["ema"] if o["ema"] != "official" else (None if self.kind == "text" else self.OFFICIAL_EMA)
        if decay is not None:
            self.ema_decay = float(decay)
            self.ema = [p.detach().clone() for p in self.trainable_parameters()]

    @torch.no_grad()
    def _relabel_distances(self, others, n_rows: int = 64, draws: int = 4) -> dict:
        """{k: E ‖ε(x_t, t, k) − ε(x_t, t, c_f)‖²} for each candidate relabel class k, the forget loss L_f that
        relabelling onto k starts from (t ~ U{0..T−1}, Gaussian ε, ``draws`` × ``n_rows`` forget rows, a
        generator seeded from the run's seed). ``relabel="auto"`` takes the argmax: training drives
        ε_θ(·, c_f) towards ε(·, c̃), so the forgotten label ends up drawing c̃; the class farthest from c_f
        in the model's own score space leaves the least of c_f's modes in that target. The stopping rule
        (``forget_tol``) compares L_f with the chosen class's value."""
        run = self.run
        gen = torch.Generator().manual_seed(self._data_seed + 2)
        dist = torch.zeros(len(others), dtype=torch.float64)
        for _ in range(draws):
            batch = run.forget_batch(gen, min(n_rows, len(run.forget[0])))
            t = torch.randint(0, run.num_train_timesteps, (batch.x0.shape[0],), generator=gen)
            noise = torch.randn(batch.x0.shape, generator=gen)
            gamma, sigma = run.gamma_sigma(t)
            x0, c_f, t, noise = run.to_device(batch.x0, batch.cond, t, noise)
            x_t = (run.bview(gamma.to(run.device), x0) * x0 + run.bview(sigma.to(run.device), x0) * noise)
            x_t = x_t.to(run.dtype)
            n = x_t.shape[0]
            labels = torch.tensor(others, device=run.device).repeat_interleave(n)
            eps = self._eps_base(torch.cat([x_t] * (len(others) + 1)), t.repeat(len(others) + 1),
                                 torch.cat([labels, c_f]))
            ref = eps[-n:].float()
            dist += ((eps[:-n].float().view(len(others), n, -1) - ref.view(1, n, -1)) ** 2).mean((1, 2)).double().cpu()
        return {int(k): float(d / draws) for k, d in zip(others, dist)}

    def _eps_base(self, x, t, cond):
        """ε of the model at setup (no update yet), in eval mode."""
        run = self.run
        was_training = run.model.training
        run.model.eval()
        try:
            return run.denoiser(x, t, cond)
        finally:
            run.model.train(was_training)

    @torch.no_grad()
    def _update_ema(self):
        """ema ← μ·ema + (1 − μ)·θ after each optimizer step (the official DDPM code's EMAHelper)."""
        params = self.trainable_parameters()
        torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1.0 - self.ema_decay)

    def _setup_retain(self, retain):
        run = self.run
        if isinstance(retain, DataPoints):
            x0, cond = run.retain
            if isinstance(cond, list):
                cond = encode_prompts(run, cond)
            if self.kind == "class" and isinstance(run.forget_target, Classes):
                keep = ~torch.isin(cond, torch.tensor(self.forgotten))
                if not keep.any():
                    raise bad_value("retain", "images of classes that are not being forgotten", "only forgotten ones")
                x0, cond = x0[keep], cond[keep]
            run.retain = (x0, cond)
        elif isinstance(retain, Classes) and self.kind == "class":
            ids = [c for c in retain.ids if c not in set(self.forgotten or [])]
            if not ids or max(ids) >= run.denoiser.num_classes:
                raise bad_value("retain", f"fu.Classes of ids in [0, {run.denoiser.num_classes}) that are not "
                                "being forgotten", retain.ids)
            labels = torch.tensor(ids).repeat_interleave(-(-self.n_generate // len(ids)))[:self.n_generate]
            run.retain = (self._generate(labels, salt=1, what="retain images"), labels)
        elif isinstance(retain, (list, tuple)) and retain and all(isinstance(p, str) for p in retain) \
                and self.kind == "text":
            prompts = [retain[i % len(retain)] for i in range(max(self.n_generate, len(retain)))]
            cond = encode_prompts(run, prompts)
            run.retain = (self._generate(cond, salt=1, what="retain images"), cond)
        else:
            expected = {"text": "fu.DataPoints with prompts or a list of prompts",
                        "class": "fu.DataPoints with labels or fu.Classes"}.get(self.kind, "fu.DataPoints")
            raise bad_value("retain", f"{expected} (EraseDiff needs something to keep)",
                            type(retain).__name__ if retain is not None else None)

    # Generated data, sized by the model (module docstring "Generated data"): (images per side, DDIM steps).
    GENERATE_SIZES = {"pixel": (256, 50), "text": (64, 25), "sdxl": (32, 25)}

    def _size_generation(self):
        """The sizes of generated data for this model: the options, or the defaults of its family."""
        run, o = self.run, self.opts
        family = "sdxl" if run.sdxl else ("text" if self.kind == "text" else "pixel")
        n, steps = self.GENERATE_SIZES[family]
        self.generate_chunk = chunk_rows(run, 256)  # images per no-grad forward: a few at SD / SDXL size
        self.n_generate = o["n_generate"] or n
        self.generate_steps = o["generate_steps"] or steps
        if self.generate_steps > run.num_train_timesteps:
            raise bad_value("generate_steps", f"an int in [1, {run.num_train_timesteps}] (the scheduler's training "
                            "timesteps)", self.generate_steps)
        w = o["generate_guidance"]
        if w is None and self.kind == "text":
            w = run.pipeline_guidance  # the pipeline's own default: images as the pipeline draws them
        self.generate_guidance = w
        self.generated = {}  # what -> fastunlearn.generation.Generated

    def _generate(self, cond, salt=0, what="images"):
        """Images from the frozen base (the untrained model at setup time) for each row of ``cond``: shown,
        counted and cached by ``fastunlearn.generation``."""
        o, run = self.opts, self.run
        eps_fn = self.teacher if self.teacher is not None else (lambda x, t, c: run.denoiser(x, t, c))
        w = self.generate_guidance
        null = self._null(cond_len(cond)) if uses_guidance(w) else None
        was_training = run.model.training
        run.model.eval()
        try:
            x, record = generate(run, eps_fn, cond, self._data_seed + salt, self.generate_steps, w, null,
                                 chunk=self.generate_chunk, what=what, cache=o["cache_generated"])
        finally:
            run.model.train(was_training)
        self.generated[what.split()[0]] = record
        return x

    def _null(self, n):
        den = self.run.denoiser
        if den.kind == "text":
            return encode_prompts(self.run, [""] * n)
        if den.null_class is None:
            raise bad_value("generate_guidance", "None or 1.0: guidance needs the model's null class, and it "
                            "declares none", self.opts["generate_guidance"])
        return torch.full((n,), den.null_class, dtype=torch.long)

    # ------------------------------------------------------------------------------ one step
    def draw(self, gen: torch.Generator) -> dict:
        """Every random quantity of one step, drawn from ``gen`` in a fixed order."""
        run, B, T = self.run, self.run.batch_size, self.run.num_train_timesteps
        Br = self.opts["retain_batch_size"] or B
        keep = run.retain_batch(gen, Br)
        forget = run.forget_batch(gen, B)

        def timesteps(n):
            if self.opts["antithetic_t"]:
                half = torch.randint(0, T, ((n + 1) // 2,), generator=gen)
                return torch.cat([half, T - 1 - half])[:n]
            return torch.randint(0, T, (n,), generator=gen)

        t = timesteps(B)  # the forget rows' t, shared by the first B retain rows (the official L_du uses one t)
        t_r = t if Br == B else (t[:Br] if Br < B else torch.cat([t, timesteps(Br - B)]))
        noise_r = torch.randn(keep.x0.shape, generator=gen)
        if self.forget_target == "uniform":
            noise_f = torch.rand(forget.x0.shape, generator=gen)  # ε_f ~ U[0, 1): input noise and target
        else:
            noise_f = torch.randn(forget.x0.shape, generator=gen)
        relabel = None
        if self.forget_target == "relabel":
            if self.kind == "class":
                n = B if self.opts["relabel"] == "row" else 1  # a fixed class: self.others has one entry
                relabel = self.others[torch.randint(0, len(self.others), (n,), generator=gen)].expand(B).clone()
            else:
                relabel = take_cond(self.anchor, torch.zeros(B, dtype=torch.long))
        return dict(keep=keep, forget=forget, t=t_r, t_f=t, noise_r=noise_r, noise_f=noise_f, relabel=relabel)

    def losses(self, d: dict):
        """(L_r, L_f) from one concatenated forward; the relabel target from a separate no-grad forward
        (it needs no activations kept for backward, so batching it in would only cost memory)."""
        run = self.run
        keep, forget, t, t_f, noise_r, noise_f, relabel = run.to_device(
            d["keep"], d["forget"], d["t"], d["t_f"], d["noise_r"], d["noise_f"], d["relabel"])

        def noised(x0, noise, steps):  # steps: the host copy (the schedule's table is read on the host)
            gamma, sigma = run.gamma_sigma(steps)
            return run.bview(gamma.to(run.device), noise) * x0 + run.bview(sigma.to(run.device), noise) * noise

        x_r = noised(keep.x0, noise_r, d["t"])
        x_f = noised(forget.x0, noise_f, d["t_f"])
        B = x_r.shape[0]
        pred = run.denoiser(torch.cat([x_r, x_f]).to(run.dtype), torch.cat([t, t_f]), cat_cond(keep.cond, forget.cond))
        pred_r, pred_f = pred[:B], pred[B:]
        if self.forget_target == "uniform":
            target_f = noise_f
        else:
            with torch.no_grad():
                target_f = run.denoiser(x_f.to(run.dtype), t_f, relabel)
        if self.frozen is not None:  # retain_target="frozen": the input model's ε on the same rows
            with torch.no_grad():
                target_r = self.frozen(x_r.to(run.dtype), t, keep.cond)
            return ops.mse_loss(pred_r, target_r.detach()), ops.mse_loss(pred_f, target_f.detach())
        return ops.mse_loss(pred_r, noise_r), ops.mse_loss(pred_f, target_f.detach())

    def step(self, step, gen):
        o = self.opts
        if self.ema is not None and step > 0:  # the loop applied step − 1's update: fold it into the EMA
            self._update_ema()
        loss_r, loss_f = self.losses(self.draw(gen))
        params = self.trainable_parameters()
        if o["lambda_rule"] == "fixed":
            lam = self.lambd
            g = torch.autograd.grad(loss_r + lam * loss_f, params, allow_unused=True)
            g = dense_grads(g, params)
            stats = clip_single(g, params, o["max_grad_norm"])
        else:
            g_r = torch.autograd.grad(loss_r, params, retain_graph=True, allow_unused=True)
            g_f = torch.autograd.grad(loss_f, params, allow_unused=True)
            g_r = dense_grads(g_r, params)
            g_f = dense_grads(g_f, params)
            nr2, nf2, dot = pair_stats(g_r, g_f)
            rule = adaptive_lambda if o["lambda_rule"] == "adaptive" else bome_lambda
            lam = rule(nr2, nf2, dot, o["eta_bome"])
            norm_sq = nr2 + 2.0 * lam * dot + lam * lam * nf2
            clip = clip_factor(norm_sq, o["max_grad_norm"])
            write_combination(params, g_r, clip, g_f, lam * clip)
            stats = {"grad_norm_r": math.sqrt(max(nr2, 0.0)), "grad_norm_f": math.sqrt(max(nf2, 0.0)),
                     "grad_cos": dot / (math.sqrt(max(nr2, 0.0) * max(nf2, 0.0)) + 1e-8),
                     "grad_norm": math.sqrt(max(norm_sq, 0.0)), "clip": clip}
        return {"loss": loss_r.item() + lam * loss_f.item(), "loss_r": loss_r.item(), "loss_f": loss_f.item(),
                "lambd": lam, **stats}

    def done(self, step_done: int, history: list) -> bool:
        """The stopping rule (``forget_tol``): the forget constraint of Eq. (3) is met once L_f, the mean of the
        last ``STOP_WINDOW`` steps' values, is at most ``forget_tol`` × L_f(θ_0); ``steps`` is the cap."""
        if not self.forget_tol or step_done < STOP_WINDOW:
            return False
        recent = [h["loss_f"] for h in history[-STOP_WINDOW:] if not h.get("skipped") and math.isfinite(h["loss_f"])]
        return len(recent) == STOP_WINDOW and sum(recent) / STOP_WINDOW <= self.forget_tol * self.forget_loss_start

    # The EMA copy travels with checkpoints, so a resumed run ends with the same EMA weights.
    def state_dict(self):
        return {"ema": list(self.ema)} if self.ema is not None else {}

    def load_state_dict(self, state):
        if state and self.ema is not None:
            for e, v in zip(self.ema, state["ema"]):
                e.copy_(v)

    def finish(self, result):
        """With the EMA on, the result is the EMA copy (the official code samples and saves it)."""
        result.extras["forget_target"] = self.forget_target
        result.extras["params"] = self.opts["params"]
        result.extras["retain_target"] = self.retain_target
        if getattr(self, "others", None) is not None and len(self.others) == 1:
            result.extras["relabel"] = int(self.others[0])
            if hasattr(self, "relabel_distances"):
                result.extras["relabel_distances"] = self.relabel_distances
        result.extras["ema"] = self.ema_decay if self.ema is not None else None
        if self.generated:  # what setup generated (fastunlearn.generation): rows, steps, UNet evaluations, cache
            result.extras["generated"] = {k: r.as_dict() for k, r in self.generated.items()}
        result.extras["forget_tol"] = self.forget_tol or None
        if self.forget_tol:
            result.extras["forget_loss_start"] = self.forget_loss_start
            history = getattr(result, "history", None) or []
            result.extras["stopped_at"] = len(history) if history and history[-1].get("stopped") else None
        if self.ema is not None:
            self._update_ema()  # the last optimizer step
            with torch.no_grad():
                for p, e in zip(self.trainable_parameters(), self.ema):
                    p.copy_(e)
