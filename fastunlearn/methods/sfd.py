"""SFD: Score Forgetting Distillation (Chen, Zhang & Zhou, ICLR 2025), spec §5, built on SiD (§5.1).

Data-free class or concept forgetting that also distils the model into a one-step generator.

Three roles, all initialised from the input model (§5.1):
* teacher ε_φ, frozen;
* fake score ε_ψ, trained by DSM on the generator's own samples;
* one-step generator G_θ, trained with the SiD loss.

The generator in DDPM form (§5.3), with t* = ``t_init``:

    x_{t*} = σ_{t*} z,   x_g = x_{t*}/γ_{t*} − s_{t*} ε_θ(x_{t*}, t*, c)

One optimizer step is one ψ step then one θ step (§5.1, §5.3), each with its own z, t ~ U{t_min..t_max−1}
and e ~ N(0, I), all drawn from the step's generator ``gen`` (the labels are shared by the two steps, as
in the official loop). x_t = γ_t x_g + σ_t e.

* ψ step (§5.2): L_ψ = λ_r^ψ E Σ_d (ε_ψ(x_t, t, c_r) − e)² + λ_f^ψ E Σ_d (ε_ψ(x_t, t, c_f) − e)² on
  stop-gradient generator samples (G in eval mode, no graph).
* θ step (§5.2): L_θ = λ_r^G E ℓ_SiD(G(z, c_r); c_r, c_r) + λ_f^G E ℓ_SiD(G(z, c_f); c_o, c_f). The forget
  term evaluates the teacher at the override class c_o (or the anchor concept) and the fake score at the
  forgotten one: p_φ(·|c_o) is distilled into p_θ(·|c_f). ℓ_SiD is used in its exact ε-space form (§5.6),
  ``ops.sid_generator_loss``: no subtraction of O(1/γ) quantities, ω detached and clamped, fp32
  reductions, NaN rows dropped (§5.9). The generator's gradient reaches θ only through the input
  Jacobians of the two score networks, which are frozen for this step (input gradients only).

Both steps pass their gradients through ``nan_to_num`` and clip them by value at ``clip_value`` (1.0, as in
the official DDPM code, §5.3; not by norm). Both optimizers are Adam with β1 = 0 (§5.5).

Two optimizers, one training loop. ``fastunlearn.trainer`` owns one optimizer over
``trainable_parameters()``: those are θ's (the generator is what SFD delivers). The ψ update, with its own
Adam (``lr_fake``), happens inside ``step()`` before the θ gradients are written; ψ's weights are a trained
role that checkpoints save, and its optimizer state travels with ``state_dict()`` / ``load_state_dict()``,
so checkpoints resume exactly.

Memory (``fastunlearn.roles``). Without LoRA θ is the model's own weights, and φ and ψ are copies of them
bound over the model for their calls (three sets of weights, fine for small models). With ``lora_rank`` the
teacher is the shared base with adapters off, and θ and ψ are two named LoRA adapters on that base
(``"default"``, the Run's adapter, for θ and ``"fake_score"`` for ψ): one copy of the base weights.

Options and their official origin (DDPM configs §5.5 unless noted):
* ``alpha`` (α = 1.2).
* ``override``: the class c_o the forgotten class is mapped onto; defaults to ``Classes.override``. With
  neither, each forget row draws c_o uniformly from the remaining classes (the official
  ``pseudo_label_type: "rand"`` path, §5.3). Concepts use ``Concept.anchor`` ("" when None).
* ``t_init``, ``t_min``, ``t_max``: None picks the timesteps whose noise level s_t = σ_t/γ_t matches the
  official 440, 38, 712 on the linear schedule (s = 2.50, 0.137, 13.1); on SD's scaled-linear schedule this
  gives 625, 20 and 981, against the SD script's 625, 20, 980 (§1, §5.4): the noise-level match of 712 lands
  one timestep above the script's t_max (an exclusive bound; 981 also admits t = 980). Pass ``t_max=980`` to
  reproduce the SD script exactly.
* ``sg_remain_coef``, ``sg_forget_coef``, ``g_remain_coef``, ``g_forget_coef``: λ_r^ψ, λ_f^ψ, λ_r^G, λ_f^G.
  The DDPM configs use 1 / 0.01 / 1 / 0.01 over 50 000 iterations; the SD script uses 1.0 for all four.
  The defaults here are the SD script's 1.0: with the few hundred steps that suit a CPU, 0.01 leaves the
  forgotten class recognisable (measured on the bundled digits model; see the README).
* ``two_stage``: the first ``two_stage`` steps are plain SiD distillation (forget coefficients 0, no forget
  rows computed), then SFD (SFD-Two-Stage, §5.3, run as one job instead of two).
* ``lr_fake``: ψ's learning rate (``lr`` is θ's); both default to the official 1e-5.
* ``forget_batch_size``: forget rows per step (the official loop uses as many as remain rows).
* ``clip_value``: the value clip of both steps' gradients (None: off).

What ``erase`` returns: ``result.generator`` is G_θ (``result.sample`` draws with it in one network
evaluation, ``sample_one_step``) and ``result.model`` is the fake score ψ: the multi-step denoiser of the
generator's (unlearned) distribution, same class as the input model. Both are plain diffusers models
(LoRA adapters merged). Saved with ``lora_rank``, the result's diffusers LoRA file
(``pytorch_lora_weights.safetensors``) is the generator's adapter, so ``pipe.load_lora_weights(dir)`` turns
the base pipeline's UNet into G_θ (sample it in one step with ``result.sample``, or as the ε of
x_{t*}); the fake score's adapter is written next to it, ``fake_score/pytorch_lora_weights.safetensors``.

Not reproduced: EMA on G (0.9999 over 50 000 iterations in the DDPM configs; the SD script runs without
it) and CFG inside distillation (the DDPM code uses none; SD's κ = 4.5 is not implemented here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import ops
from ..conditioning import cond_to, slice_cond, take_cond
from ..errors import bad_type, bad_value
from ..lora import adapter_payload, base_reference
from ..losses import sum_dims
from ..models import Denoiser
from ..roles import Roles
from ..surgery import dense_grads
from ..targets import Classes, Concept
from .base import Method, Options, option, optional, positive, register

# Official DDPM timesteps (§5.5) on the linear β schedule 1e-4 → 0.02, T = 1000; other schedules use the
# timesteps with the same noise level s_t.
_OFFICIAL_T = dict(t_min=38, t_init=440, t_max=712)


def _linear_noise_level(t: int) -> float:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1.0 - betas, 0)[t]
    return float(torch.sqrt(1.0 / ac - 1.0))


def matching_timestep(alphas_cumprod: torch.Tensor, s: float) -> int:
    """The timestep whose noise level s_t = √(1/ᾱ_t − 1) is closest to ``s``."""
    s_t = torch.sqrt(1.0 / alphas_cumprod.double() - 1.0)
    return int(torch.argmin((s_t.log() - math.log(s)).abs()))


@dataclass
class Draws:
    """The random draws of one network pass: latent z, timesteps t, DSM / SiD noise e."""

    z: torch.Tensor
    t: torch.Tensor
    e: torch.Tensor


@dataclass
class Labels:
    """Rows of one step: the first ``n_remain`` are remain rows, the rest forget rows. ``gen`` conditions
    the generator and the fake score; ``teacher`` the teacher (c_r on remain rows, c_o on forget rows).
    Entries index the method's condition table (class ids on class-conditional models)."""

    gen: torch.Tensor
    teacher: torch.Tensor
    n_remain: int


def _check_alpha(name, a):
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise bad_type(name, "a number", a)
    if not math.isfinite(a):
        raise bad_value(name, "a finite number", a)


def _check_timestep(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise bad_value(name, "None or an int timestep >= 0", v)


def _check_two_stage(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise bad_value(name, "an int >= 0 (steps of plain SiD distillation before forgetting)", v)


def _check_override(name, o):
    if o is not None and not isinstance(o, str) and (isinstance(o, bool) or not isinstance(o, int) or o < 0):
        raise bad_value(name, "None, a class id (int >= 0) or an anchor prompt (str)", o)


def _check_forget_batch(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise bad_value(name, "None or an int >= 1", v)


@dataclass(frozen=True)
class SFDOptions(Options):
    """SFD's options (module docstring for the official values)."""

    alpha: float = option(1.2, "α of the SiD generator loss", _check_alpha)
    override: Union[None, int, str] = option(
        None, "the class (or anchor prompt) the forgotten one is mapped onto (None: Classes.override)",
        _check_override)
    t_init: Optional[int] = option(None, "t* of the one-step generator (None: the official noise level)",
                                   _check_timestep)
    t_min: Optional[int] = option(None, "the lowest t of the score terms (None: the official noise level)",
                                  _check_timestep)
    t_max: Optional[int] = option(None, "the highest t of the score terms (None: the official noise level)",
                                  _check_timestep)
    sg_remain_coef: float = option(1.0, "λ_r^ψ, the fake score's remain weight", positive(allow_zero=True))
    sg_forget_coef: float = option(1.0, "λ_f^ψ, the fake score's forget weight", positive(allow_zero=True))
    g_remain_coef: float = option(1.0, "λ_r^G, the generator's remain weight", positive(allow_zero=True))
    g_forget_coef: float = option(1.0, "λ_f^G, the generator's forget weight", positive(allow_zero=True))
    two_stage: int = option(0, "the first N steps are plain SiD distillation (no forgetting)", _check_two_stage)
    lr_fake: float = option(1e-5, "ψ's learning rate (lr is θ's; both the official 1e-5)", positive())
    forget_batch_size: Optional[int] = option(None, "forget rows per step (None: as many as remain rows, as the "
                                              "official loop)", _check_forget_batch)
    clip_value: Optional[float] = option(1.0, "the value clip of both steps' gradients (None: off)",
                                         optional(positive()))


@register
class SFD(Method):
    name = "sfd"
    description = "Score Forgetting Distillation into a one-step generator (Chen et al., ICLR 2025)"
    targets = ("classes", "concept")
    needs_retain = False
    needs_forget_data = False
    # θ's optimizer (the training loop's): Adam with β1 = 0 as in SiD/SFD (§5.5).
    # lr (θ) and lr_fake (ψ) are the official 1e-5 (cifar10_sfd.yml); 100 steps of 32 + 32 rows forget a
    # digit of the bundled model completely (README numbers).
    defaults = dict(steps=100, batch_size=32, lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0, eps=1e-8,
                    optimizer="adam")
    Options = SFDOptions

    # ------------------------------------------------------------------ setup
    def setup(self):
        run = self.run
        T = run.num_train_timesteps
        ac = run.scheduler.alphas_cumprod
        for k, t_ref in _OFFICIAL_T.items():
            if self.opts[k] is None:
                self.opts[k] = matching_timestep(ac, _linear_noise_level(t_ref))
        t_min, t_init, t_max = self.opts["t_min"], self.opts["t_init"], self.opts["t_max"]
        if not 0 <= t_min < t_max <= T:
            raise bad_value("t_max", f"t_min < t_max <= {T} (got t_min={t_min})", t_max)
        if not 0 <= t_init < T:
            raise bad_value("t_init", f"an int timestep in [0, {T})", t_init)
        self.den = Denoiser(run.model)
        self._conditions()
        # Teacher φ, generator θ (the run's own trained role) and fake score ψ, all the input model at first
        # (§5.1): LoRA adapters on one base, or copies of the trained tensors (fastunlearn.roles).
        self.roles = Roles(run, trained=("generator", "fake_score"))
        self.theta, self.psi = self.roles.parameters("generator"), self.roles.parameters("fake_score")
        self.fake_optimizer = torch.optim.Adam(self.psi, lr=self.opts["lr_fake"], betas=(0.0, 0.999),
                                               eps=1e-8)
        g, s = run.gamma_sigma(torch.tensor([t_init]))
        self.gamma_init, self.sigma_init = float(g), float(s)

    def _conditions(self):
        """The condition table and the ids of remain, forget and override conditions in it."""
        run, den = self.run, self.den
        forget, retain = run.forget_target, run.retain_target
        override = self.opts["override"]
        if den.kind == "class":
            if not isinstance(forget, Classes):
                raise bad_type("forget", "fu.Classes for a class-conditional model", forget)
            k = den.num_classes
            if retain is None:
                remain = [c for c in range(k) if c not in forget.ids]
            elif isinstance(retain, Classes):
                remain = list(retain.ids)
            else:
                raise bad_type("retain", "fu.Classes or None (SFD is data-free: it needs class ids, not images)",
                               retain)
            bad = [c for c in remain if c >= k or c in forget.ids]
            if bad or not remain:
                raise bad_value("retain", f"class ids in [0, {k}) other than the forgotten ones", bad or remain)
            if override is not None and isinstance(override, str):
                raise bad_type("override", "a class id (int) for a class-conditional model", override)
            if override is not None and forget.override is not None and override != forget.override:
                raise bad_value("override", f"the same class as Classes.override ({forget.override})", override)
            override = override if override is not None else forget.override
            if override is not None and (override >= k or override in forget.ids):
                raise bad_value("override", f"a class id in [0, {k}) that is not forgotten", override)
            self.table = None
            self.remain_ids = torch.tensor(remain)
            self.forget_ids = torch.tensor(list(forget.ids))
            self.override_ids = None if override is None else torch.tensor([override])
            return
        if den.kind != "text" or not isinstance(forget, Concept):
            raise bad_value("forget", "fu.Classes (class-conditional model) or fu.Concept (text model)",
                            type(forget).__name__)
        if run.encode_prompts is None:
            raise bad_value("model", "a pipeline with a text encoder (SFD on concepts encodes prompts)", None)
        if retain is None:
            remain = [""]
        elif isinstance(retain, (list, tuple)) and retain and all(isinstance(p, str) for p in retain):
            remain = list(retain)
        else:
            raise bad_type("retain", "a list of prompts to keep, or None", retain)
        if override is not None and not isinstance(override, str):
            raise bad_type("override", "an anchor prompt (str) for a text model", override)
        anchor = override if override is not None else (forget.anchor or "")
        prompts = [forget.prompt, anchor] + remain
        with torch.no_grad():  # on the run's device once: the encoders return host tensors (and move off after set-up)
            self.table = cond_to(run.encode_prompts(prompts), run.device)
        self.forget_ids, self.override_ids = torch.tensor([0]), torch.tensor([1])
        self.remain_ids = torch.arange(2, len(prompts))

    def trainable_parameters(self):
        return self.theta

    # ------------------------------------------------------------------ pieces
    def cond(self, ids: torch.Tensor):
        """Model conditioning for rows of condition ids."""
        if self.table is None:
            return ids.to(self.run.device)
        return take_cond(self.table, ids)

    def coefficients(self, step: int) -> dict:
        forgetting = step >= self.opts["two_stage"]
        return {k: (self.opts[k] if forgetting or "remain" in k else 0.0)
                for k in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef")}

    def draw_labels(self, gen, coefs) -> Labels:
        B = self.run.batch_size
        n_f = 0
        if coefs["sg_forget_coef"] > 0 or coefs["g_forget_coef"] > 0:
            n_f = self.opts["forget_batch_size"] or B
        pick = lambda ids, n: ids[torch.randint(0, ids.numel(), (n,), generator=gen)]  # noqa: E731
        c_r, c_f = pick(self.remain_ids, B), pick(self.forget_ids, n_f)
        c_o = pick(self.override_ids if self.override_ids is not None else self.remain_ids, n_f)
        return Labels(gen=torch.cat([c_r, c_f]), teacher=torch.cat([c_r, c_o]), n_remain=B)

    def draw(self, gen, n: int) -> Draws:
        shape = (n, *self.den.sample_shape)
        z = torch.randn(shape, generator=gen)
        t = torch.randint(self.opts["t_min"], self.opts["t_max"], (n,), generator=gen)
        e = torch.randn(shape, generator=gen)
        return Draws(z, t, e)

    def generate(self, z, cond, train: bool = False):
        """x_g = x_{t*}/γ_{t*} − s_{t*} ε_θ(x_{t*}, t*, c) with x_{t*} = σ_{t*} z (§5.3)."""
        run = self.run
        x = (self.sigma_init * z).to(run.device, run.dtype)
        t = torch.full((z.shape[0],), self.opts["t_init"], dtype=torch.long, device=run.device)
        eps = self.roles.eps("generator", x, t, cond, train=train)
        return x / self.gamma_init - (self.sigma_init / self.gamma_init) * eps

    def noised(self, x_g, d: Draws):
        run = self.run
        gamma, sigma = run.gamma_sigma(d.t)
        e, t = run.to_device(d.e, d.t)
        x_t = run.bview(gamma, x_g).to(x_g.device) * x_g + run.bview(sigma, e).to(e.device) * e.to(x_g.dtype)
        return x_t, t, e, gamma, sigma

    def _write_grads(self, params, grads):
        """nan_to_num and the official value clip (§5.3, §5.4), straight into ``p.grad``."""
        c = self.opts["clip_value"]
        for p, g in zip(params, dense_grads(grads, params)):
            # in place: autograd's tuple still holds g, an out-of-place copy would be a second full-size gradient
            g = g.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
            p.grad = g.clamp_(-c, c) if c is not None else g

    # ------------------------------------------------------------------ the two updates
    def fake_score_loss(self, labels: Labels, d: Draws, coefs):
        """L_ψ on stop-gradient generator samples (§5.2): SUM over D, mean over rows; NaN rows dropped.

        A row is dropped *before* anything reduces over the batch, so the other rows' gradient survives
        (the official per-row NaN masks, §5.4, §5.9): a non-finite generator sample is replaced by zeros before
        ψ's forward (a NaN input would reach the weight gradients through the activations, where a zero
        cotangent still gives 0·NaN = NaN), and a non-finite output row is replaced by its target, so its
        residual and its cotangent are exactly zero. The mean stays over the full row counts."""
        with torch.no_grad():
            x_g = self.generate(d.z, self.cond(labels.gen), train=False)
            good_in = torch.isfinite(x_g.float()).flatten(1).all(1)
            x_g = torch.where(_rows(good_in, x_g), x_g, torch.zeros_like(x_g))
        x_t, t, e, _, _ = self.noised(x_g, d)
        eps_psi = self.roles.eps("fake_score", x_t.to(self.run.dtype), t, self.cond(labels.gen), train=True)
        e = e.to(eps_psi.device).float()
        with torch.no_grad():
            good = good_in.to(eps_psi.device) & torch.isfinite(eps_psi.float()).flatten(1).all(1)
        resid = torch.where(_rows(good, e), eps_psi.float(), e) - e
        per = sum_dims(resid ** 2)
        n_r = labels.n_remain
        loss_r = per[:n_r].sum() / n_r
        loss_f = per[n_r:].sum() / max(1, per.numel() - n_r)
        return coefs["sg_remain_coef"] * loss_r + coefs["sg_forget_coef"] * loss_f, loss_r, loss_f

    def generator_loss(self, labels: Labels, d: Draws, coefs):
        """L_θ (§5.2) in the ε-space form (§5.6): remain rows distil c_r into c_r, forget rows the teacher's
        override condition into the fake score's forgotten one."""
        x_g = self.generate(d.z, self.cond(labels.gen), train=True)
        x_t, t, e, gamma, sigma = self.noised(x_g, d)
        x_t = x_t.to(self.run.dtype)
        eps_phi = self.roles.eps("teacher", x_t, t, self.cond(labels.teacher))
        eps_psi = self.roles.eps("fake_score", x_t, t, self.cond(labels.gen), train=False)
        s_t = (sigma / gamma).to(e.device)
        n_r = labels.n_remain
        alpha = self.opts["alpha"]
        loss_r = ops.sid_generator_loss(eps_phi[:n_r], eps_psi[:n_r], e[:n_r], s_t[:n_r], alpha)
        loss = coefs["g_remain_coef"] * loss_r
        loss_f = torch.zeros((), device=loss_r.device)
        if eps_phi.shape[0] > n_r:
            loss_f = ops.sid_generator_loss(eps_phi[n_r:], eps_psi[n_r:], e[n_r:], s_t[n_r:], alpha)
            loss = loss + coefs["g_forget_coef"] * loss_f
        return loss, loss_r, loss_f

    def fake_score_step(self, labels: Labels, d: Draws, coefs) -> dict:
        loss, loss_r, loss_f = self.fake_score_loss(labels, d, coefs)
        grads = torch.autograd.grad(loss, self.psi, allow_unused=True)
        self.fake_optimizer.zero_grad(set_to_none=True)
        self._write_grads(self.psi, grads)
        self.fake_optimizer.step()
        self.fake_optimizer.zero_grad(set_to_none=True)
        return {"loss_fake": loss.item(), "loss_fake_remain": loss_r.item(), "loss_fake_forget": loss_f.item()}

    def step(self, step, gen):
        """One ψ step (its own Adam, applied here) then θ's gradients into ``p.grad`` for the loop's Adam."""
        coefs = self.coefficients(step)
        labels = self.draw_labels(gen, coefs)
        n = labels.gen.numel()
        d_psi = self.draw(gen, n)
        d_theta = self.draw(gen, n)  # independent z, t, e for the θ step (§5.9)
        stats = self.fake_score_step(labels, d_psi, coefs)
        loss, loss_r, loss_f = self.generator_loss(labels, d_theta, coefs)
        grads = torch.autograd.grad(loss, self.theta, allow_unused=True)
        self._write_grads(self.theta, grads)
        return {"loss": loss.item(), "loss_gen_remain": loss_r.item(), "loss_gen_forget": loss_f.item(),
                "forgetting": float(coefs["g_forget_coef"] > 0 or coefs["sg_forget_coef"] > 0), **stats}

    # ------------------------------------------------------------------ checkpoints and results
    def state_dict(self):
        """ψ's optimizer; ψ's weights are a trained role, which checkpoints save with the others (``roles``)."""
        return {"fake_optimizer": self.fake_optimizer.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.fake_optimizer.load_state_dict(state["fake_optimizer"])

    def finish(self, result):
        """``result.generator``: G_θ; ``result.model``: the fake score ψ, the denoiser of the generator's
        (unlearned) distribution; ``result.extras``: what one-step sampling needs. With LoRA both are
        merged, and the two adapters are kept in ``result.lora_roles``: ``Result.save`` writes the generator's
        as the diffusers LoRA file (``pipe.load_lora_weights(dir)`` loads G_θ) and ψ's under ``fake_score/``."""
        roles = self.roles
        if roles.lora:
            model = self.run.model
            result.lora_roles = {role: adapter_payload(model, roles.adapter(role)) for role in roles.trained}
            result.lora_roles["base"] = base_reference(model)
        result.generator = roles.plain_module("generator").eval()
        result.model = roles.plain_module("fake_score", last=True).eval()
        result.extras.update(t_init=self.opts["t_init"], gamma_init=self.gamma_init, sigma_init=self.sigma_init)

    @staticmethod
    @torch.no_grad()
    def sample_one_step(result, n: int, cond=None, seed: int = 0, batch_size: int = 1024) -> torch.Tensor:
        """``n`` samples from the one-step generator: ONE network evaluation per sample. On a pixel model,
        images clamped to [-1, 1]; on a latent pipeline (SD / SDXL: ``vae_scale_factor`` > 1, kept in the result's
        extras), the latents as they are, never clamped: scaled VAE latents have unit variance, so values past
        ±1 are ordinary, and the VAE decoder (``Result.sample``) maps them to pixels."""
        gen_model = result.generator
        den = Denoiser(gen_model)
        ex = result.extras
        latent = int(ex.get("vae_scale_factor") or 1) > 1
        t_init, gamma, sigma = int(ex["t_init"]), float(ex["gamma_init"]), float(ex["sigma_init"])
        p = next(gen_model.parameters())
        z = torch.randn(n, *den.sample_shape, generator=torch.Generator().manual_seed(seed))
        was_training = gen_model.training
        gen_model.eval()
        out = []
        try:
            for a in range(0, n, batch_size):
                x = (sigma * z[a:a + batch_size]).to(p.device, p.dtype)
                t = torch.full((x.shape[0],), t_init, dtype=torch.long, device=p.device)
                c = slice_cond(cond, a, a + batch_size)
                eps = den(x, t, c)
                x0 = (x - sigma * eps) / gamma
                out.append((x0 if latent else x0.clamp(-1, 1)).float().cpu())
        finally:
            gen_model.train(was_training)
        return torch.cat(out)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row mask [B] broadcast against [B, ...]."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))
