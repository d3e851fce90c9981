"""SFD (spec §5): the ε-space SiD loss against the x0-space formula of §5.2, the generator gradient through
the score networks' input Jacobians, role isolation (ψ and θ steps change only their own parameters), the
reduction to plain SiD with zero forget coefficients, exact resume, one-step sampling and the result's
save/load round trip. The end-to-end run on the bundled digits model is marked slow."""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn import losses, ops
from fastunlearn.errors import InvalidArgumentError, InvalidTypeError
from fastunlearn.methods import get_method
from fastunlearn.models import Denoiser, digits_scheduler
from fastunlearn.run import Run, step_generator
from fastunlearn.trainer import loop as train, make_optimizer



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add synchronisation (10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ the loss
def _bview(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def x0_space_sid(x_g, e, eps_phi, eps_psi, gamma, sigma, alpha, coef=1.0):
    """§5.2 literally: f_• = (x_t − σ ε_•)/γ with x_t = γ x_g + σ e,
    ℓ = Σ_d (f_φ − f_ψ)((f_φ − x_g) − α(f_φ − f_ψ)) / ω,  ω = sg(mean_d |f_φ − x_g|).clamp_min(1e-5),
    mean over the batch, times ``coef``."""
    g, s = _bview(gamma, x_g), _bview(sigma, x_g)
    x_t = g * x_g + s * e
    f_phi = (x_t - s * eps_phi) / g
    f_psi = (x_t - s * eps_psi) / g
    omega = (f_phi - x_g).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    per = ((f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi))).flatten(1).sum(1) / omega
    return coef * per.mean()


def _schedule(t):
    ac = digits_scheduler().alphas_cumprod.double()[t]
    return ac.sqrt(), (1 - ac).sqrt()


def _loss_inputs(B=5, shape=(3, 7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(38, 712, (B,), generator=g)
    gamma, sigma = _schedule(t)
    x_g = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    e = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    eps_phi = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    eps_psi = eps_phi + 0.3 * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    return x_g, e, eps_phi, eps_psi, gamma, sigma


@pytest.mark.parametrize("alpha,coef", [(1.2, 1.0), (1.0, 0.01), (0.5, 3.0)])
@pytest.mark.parametrize("impl", ["losses", "ops"])
def test_eps_space_loss_and_cotangents_match_x0_formula_float64(alpha, coef, impl):
    x_g, e, eps_phi, eps_psi, gamma, sigma = _loss_inputs()
    fn = losses.sid_generator_loss if impl == "losses" else ops.sid_generator_loss
    phi, psi = eps_phi.clone().requires_grad_(), eps_psi.clone().requires_grad_()
    got = fn(phi, psi, e, sigma / gamma, alpha, coef=coef)
    d_psi, d_phi = torch.autograd.grad(got, (psi, phi))

    phi_r, psi_r = eps_phi.clone().requires_grad_(), eps_psi.clone().requires_grad_()
    ref = x0_space_sid(x_g, e, phi_r, psi_r, gamma, sigma, alpha, coef)
    r_psi, r_phi = torch.autograd.grad(ref, (psi_r, phi_r))
    # the loss accumulates in fp32 (§5.9), so agreement is to fp32 precision
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(d_psi.double(), r_psi, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(d_phi.double(), r_phi, rtol=2e-5, atol=1e-7)

    # and the closed form of §5.6: C = s_t coef/(B mean|r|), ∂/∂ε_ψ = C(r − 2αu), ∂/∂ε_φ = C(−r + (2α−1)u)
    u, r = eps_psi - eps_phi, e - eps_phi
    C = _bview(sigma / gamma * coef / (x_g.shape[0] * r.abs().flatten(1).mean(1)), r)
    torch.testing.assert_close(r_psi, C * (r - 2 * alpha * u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r_phi, C * (-r + (2 * alpha - 1) * u), rtol=1e-10, atol=1e-12)


def test_loss_drops_nan_rows_and_clamps_omega():
    x_g, e, eps_phi, eps_psi, gamma, sigma = _loss_inputs(B=4, seed=1)
    bad = eps_psi.clone()
    bad[1] = float("nan")
    phi, psi = eps_phi.clone().requires_grad_(), bad.requires_grad_()
    got = ops.sid_generator_loss(phi, psi, e, sigma / gamma, 1.2)
    keep = torch.tensor([0, 2, 3])
    ref = x0_space_sid(x_g[keep], e[keep], eps_phi[keep], eps_psi[keep], gamma[keep], sigma[keep], 1.2) * 3 / 4
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)
    d_psi, d_phi = torch.autograd.grad(got, (psi, phi))
    assert torch.isfinite(d_psi).all() and torch.isfinite(d_phi).all()
    assert d_psi[1].abs().max() == 0 and d_phi[1].abs().max() == 0
    # ω = s_t mean|e − ε_φ| is clamped at 1e-5: a row where the teacher predicts the noise exactly stays finite
    same = ops.sid_generator_loss(e.clone(), eps_psi, e, sigma / gamma, 1.2)
    assert torch.isfinite(same)


# ------------------------------------------------------------------------------------------ the method
def _run(unet, forget=None, retain=None, B=4, lora_rank=None, seed=0):
    forget = forget if forget is not None else fu.Classes([3], override=8)
    return Run(unet, digits_scheduler(), forget=None, retain=None, forget_target=forget, retain_target=retain,
               batch_size=B, seed=seed, lora_rank=lora_rank)


def _method(run, **opts):
    m = get_method("sfd")(run, **opts)
    m.setup()
    return m


def _generator_loss_reference(m, labels, d, coefs):
    """§5.2 in x0 space, every path through x_g kept: the generator's x_g enters x_t and the formula
    directly, and the teacher / fake score through their input Jacobians."""
    roles, run = m.roles, m.run
    z = d.z.to(run.dtype)
    x = m.sigma_init * z
    t_star = torch.full((z.shape[0],), m.opts["t_init"])
    eps = roles.eps("generator", x, t_star, labels.gen)
    x_g = x / m.gamma_init - (m.sigma_init / m.gamma_init) * eps
    gamma, sigma = (v.to(run.dtype) for v in run.gamma_sigma(d.t))
    x_t = _bview(gamma, x_g) * x_g + _bview(sigma, x_g) * d.e.to(run.dtype)
    eps_phi = roles.eps("teacher", x_t, d.t, labels.teacher)
    eps_psi = roles.eps("fake_score", x_t, d.t, labels.gen)
    n = labels.n_remain
    a = m.opts["alpha"]
    loss = x0_space_sid(x_g[:n], d.e[:n].to(run.dtype), eps_phi[:n], eps_psi[:n], gamma[:n], sigma[:n], a,
                        coefs["g_remain_coef"])
    if x_g.shape[0] > n:
        loss = loss + x0_space_sid(x_g[n:], d.e[n:].to(run.dtype), eps_phi[n:], eps_psi[n:], gamma[n:], sigma[n:],
                                   a, coefs["g_forget_coef"])
    return loss


def _perturb_fake(m, scale=0.02):
    """Make ψ differ from the teacher (at initialisation they are equal and ℓ_SiD's gradient is tiny)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.psi:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("g_forget_coef", [1.0, 0.01])
def test_generator_gradient_matches_x0_space_autograd_float64(tiny, g_forget_coef):
    run = _run(tiny[0].double(), B=3)
    m = _method(run, g_forget_coef=g_forget_coef, forget_batch_size=2)
    _perturb_fake(m)
    gen = step_generator(0, 0)
    coefs = m.coefficients(0)
    labels = m.draw_labels(gen, coefs)
    d = m.draw(gen, labels.gen.numel())
    assert labels.n_remain == 3 and labels.gen.numel() == 5
    assert (labels.gen[3:] == 3).all() and (labels.teacher[3:] == 8).all()  # fake at c_f, teacher at c_o
    assert torch.equal(labels.gen[:3], labels.teacher[:3]) and not (labels.gen[:3] == 3).any()
    loss, _, _ = m.generator_loss(labels, d, coefs)
    got = torch.autograd.grad(loss, m.theta)
    ref_loss = _generator_loss_reference(m, labels, d, coefs)
    ref = torch.autograd.grad(ref_loss, m.theta)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    scale = max(r.abs().max() for r in ref)
    assert scale > 0
    for g_, r in zip(got, ref):
        torch.testing.assert_close(g_.double(), r, rtol=1e-4, atol=1e-5 * scale)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, before):
    return [not torch.equal(p, b) for p, b in zip(params, before)]


def test_fake_score_and_generator_steps_change_only_their_own_parameters(tiny):
    run = _run(tiny[0])
    m = _method(run)
    teacher = list(m.roles.copies()["teacher"].values())
    theta, psi = m.theta, m.psi
    t0, th0, ps0 = _snapshot(teacher), _snapshot(theta), _snapshot(psi)
    assert not any(p.requires_grad for p in teacher)
    assert {id(p) for p in theta}.isdisjoint({id(p) for p in psi})

    stats = m.step(0, step_generator(0, 0))
    assert set(stats) >= {"loss", "loss_fake", "loss_gen_remain", "loss_gen_forget"}
    assert not any(_changed(teacher, t0)) and all(p.grad is None for p in teacher)
    assert not any(_changed(theta, th0)), "step() only writes θ's gradients; the loop's optimizer applies them"
    assert any(_changed(psi, ps0)), "the ψ step applies its own Adam inside step()"
    assert all(p.grad is None for p in psi)
    assert all(p.grad is not None for p in theta) and any(p.grad.abs().max() > 0 for p in theta)
    assert all(p.grad.abs().max() <= 1.0 for p in theta)  # value clip (§5.3)

    ps1 = _snapshot(psi)
    opt = make_optimizer("adam", m.trainable_parameters(), 1e-4, betas=(0.0, 0.999))
    opt.step()
    assert any(_changed(theta, th0)) and not any(_changed(psi, ps1)) and not any(_changed(teacher, t0))


def test_a_nan_row_in_the_fake_score_step_keeps_the_other_rows_gradient(tiny):
    """One generator sample planted NaN: ψ's gradient is finite and equals the gradient of the same loss with
    that row dropped (the mean still over the full row count), not a gradient zeroed whole (§5.9)."""
    run = _run(tiny[0], B=4)
    m = _method(run)
    gen = step_generator(0, 0)
    coefs = m.coefficients(0)
    labels = m.draw_labels(gen, coefs)
    d = m.draw(gen, labels.gen.numel())
    clean = m.generate
    bad = 1  # a remain row

    def planted(z, cond, train=False):
        x_g = clean(z, cond, train=train).clone()
        x_g[bad] = float("nan")
        return x_g

    m.generate = planted
    loss, loss_r, loss_f = m.fake_score_loss(labels, d, coefs)
    got = torch.autograd.grad(loss, m.psi, allow_unused=True)
    assert torch.isfinite(loss) and all(g is None or torch.isfinite(g).all() for g in got)

    m.generate = clean  # reference: the clean batch, the planted row left out of the sums
    with torch.no_grad():
        x_g = clean(d.z, m.cond(labels.gen))
    x_t, t, e, _, _ = m.noised(x_g, d)
    eps_psi = m.roles.eps("fake_score", x_t, t, m.cond(labels.gen), train=True)
    per = ((eps_psi - e) ** 2).flatten(1).sum(1)
    n_r, keep = labels.n_remain, torch.ones(per.numel(), dtype=torch.bool)
    keep[bad] = False
    ref_loss = (coefs["sg_remain_coef"] * per[:n_r][keep[:n_r]].sum() / n_r
                + coefs["sg_forget_coef"] * per[n_r:].sum() / (per.numel() - n_r))
    ref = torch.autograd.grad(ref_loss, m.psi, allow_unused=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    scale = max(r.abs().max() for r in ref if r is not None)
    assert scale > 0
    for g_, r in zip(got, ref):
        if r is None:
            assert g_ is None or not g_.any()
        else:
            torch.testing.assert_close(g_, r, rtol=1e-4, atol=1e-6 * scale)


def test_fake_score_step_alone_leaves_generator_untouched(tiny):
    run = _run(tiny[0])
    m = _method(run)
    gen = step_generator(0, 0)
    coefs = m.coefficients(0)
    labels = m.draw_labels(gen, coefs)
    th0 = _snapshot(m.theta)
    m.fake_score_step(labels, m.draw(gen, labels.gen.numel()), coefs)
    assert not any(_changed(m.theta, th0)) and all(p.grad is None for p in m.theta)


def test_lora_roles_share_one_base_and_stay_separate(tiny):
    unet = tiny[0]
    run = _run(unet, lora_rank=2)
    m = _method(run)
    roles = m.roles
    assert not roles.copies()  # one copy of the base weights: every role is an adapter on run.model (or none)
    base = {n: p for n, p in run.model.named_parameters() if "lora_" not in n}
    base0 = {n: p.detach().clone() for n, p in base.items()}
    assert m.theta and m.psi and len(m.theta) == len(m.psi)
    assert all(".default." in n for n, p in run.model.named_parameters() if any(p is q for q in m.theta))
    # the teacher is the base with adapters off; at initialisation all three roles agree (LoRA B = 0)
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([100, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        outs = [roles.eps(r, x, t, c) for r in ("teacher", "fake_score", "generator")]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])

    th0, ps0 = _snapshot(m.theta), _snapshot(m.psi)
    m.step(0, step_generator(0, 0))
    assert all(torch.equal(base[n], base0[n]) for n in base)
    assert any(_changed(m.psi, ps0)) and not any(_changed(m.theta, th0))
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.theta)
    with torch.no_grad():
        teacher, fake = roles.eps("teacher", x, t, c), roles.eps("fake_score", x, t, c)
    assert not torch.allclose(teacher, fake)
    with torch.no_grad():
        torch.testing.assert_close(teacher, Denoiser(unet)(x, t, c))  # still the input model after training


def test_zero_forget_coefficients_reduce_to_plain_sid(tiny):
    """With λ_f^ψ = λ_f^G = 0, SFD is SiD distillation of the remain classes: no forget rows, the θ gradient
    is the x0-space SiD gradient with teacher and fake score at the same label, and which class is
    "forgotten" or what it overrides to changes nothing."""
    retain = fu.Classes([0, 1, 2, 4])
    base = tiny[0].double()
    grads, losses_ = [], []
    for forget in (fu.Classes([3], override=8), fu.Classes([5], override=1)):
        run = _run(copy.deepcopy(base), forget=forget, retain=retain, B=3)
        m = _method(run, sg_forget_coef=0.0, g_forget_coef=0.0)
        _perturb_fake(m)
        gen = step_generator(0, 2)
        coefs = m.coefficients(2)
        labels = m.draw_labels(gen, coefs)
        assert labels.gen.numel() == labels.n_remain == 3 and torch.equal(labels.gen, labels.teacher)
        d_psi, d = m.draw(gen, 3), m.draw(gen, 3)
        fake_loss, loss_r, loss_f = m.fake_score_loss(labels, d_psi, coefs)
        assert loss_f.item() == 0.0 and torch.equal(fake_loss, loss_r)
        loss, _, _ = m.generator_loss(labels, d, coefs)
        got = torch.autograd.grad(loss, m.theta)
        ref = torch.autograd.grad(_generator_loss_reference(m, labels, d, coefs), m.theta)
        scale = max(r.abs().max() for r in ref)
        for g_, r in zip(got, ref):
            torch.testing.assert_close(g_.double(), r, rtol=1e-4, atol=1e-5 * scale)
        grads.append(got)
        losses_.append(fake_loss.item())
    assert losses_[0] == losses_[1]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_stage_distils_before_forgetting(tiny):
    m = _method(_run(tiny[0]), two_stage=3)
    assert m.coefficients(2)["g_forget_coef"] == 0.0 and m.coefficients(2)["sg_forget_coef"] == 0.0
    assert m.coefficients(3)["g_forget_coef"] == 1.0
    assert m.step(0, step_generator(0, 0))["forgetting"] == 0.0
    assert m.step(3, step_generator(0, 3))["forgetting"] == 1.0


def test_random_override_draws_other_remaining_classes(tiny):
    m = _method(_run(tiny[0], forget=fu.Classes([3]), B=64))
    labels = m.draw_labels(step_generator(0, 0), m.coefficients(0))
    over = labels.teacher[labels.n_remain:]
    assert (labels.gen[labels.n_remain:] == 3).all() and not (over == 3).any() and over.unique().numel() > 3


def test_default_timesteps_match_official_noise_levels(tiny):
    m = _method(_run(tiny[0]))
    assert (m.opts["t_min"], m.opts["t_init"], m.opts["t_max"]) == (38, 440, 712)  # linear schedule, §5.5
    from diffusers import DDPMScheduler
    from fastunlearn.methods.sfd import matching_timestep, _linear_noise_level
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    got = [matching_timestep(sd.alphas_cumprod, _linear_noise_level(t)) for t in (38, 440, 712)]
    assert abs(got[0] - 20) <= 2 and abs(got[1] - 625) <= 2 and abs(got[2] - 980) <= 2  # SD script, §5.4


def _train(m, steps, start=0, opt=None, opt_state=None):
    opt = opt or make_optimizer("adam", m.trainable_parameters(), 1e-3, betas=(0.0, 0.999))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    train(m, opt, steps, seed=0, start_step=start, progress=False)
    return opt


def test_resume_from_method_state_is_exact(tiny):
    base = tiny[0]
    full = _method(_run(copy.deepcopy(base)))
    _train(full, 4)

    first = _method(_run(copy.deepcopy(base)))
    opt = _train(first, 2)
    weights = {n: p.detach().clone() for n, p in first.roles.named_parameters().items()}  # θ and ψ: what checkpoints save
    state, opt_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())

    resumed = _method(_run(copy.deepcopy(base)))
    with torch.no_grad():
        for n, p in resumed.roles.named_parameters().items():
            p.copy_(weights[n])
    resumed.load_state_dict(state)
    _train(resumed, 4, start=2, opt_state=opt_state)
    for a, b in zip(full.trainable_parameters() + full.psi, resumed.trainable_parameters() + resumed.psi):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ through erase()
def test_erase_is_data_free_and_samples_in_one_network_evaluation(tmp_path, tiny):
    unet, sched = tiny
    res = fu.erase(unet, forget=fu.Classes([3], override=1), retain=fu.Classes([0, 1, 2]), method="sfd",
                   scheduler=sched, steps=2, batch_size=4, progress=False)
    assert res.generator is not None and res.generator is not res.model
    assert res.extras["t_init"] == 440
    assert len(res.history) == 2 and all("loss_fake" in h for h in res.history)
    calls = []
    hook = res.generator.register_forward_hook(lambda *a: calls.append(1))
    x = res.sample(6, class_labels=[3, 3, 0, 1, 2, 3], seed=5)
    hook.remove()
    assert calls == [1] and x.shape == (6, 1, 8, 8) and x.abs().max() <= 1.0
    # x_g = (x_{t*} − σ ε_θ(x_{t*}, t*, c))/γ, x_{t*} = σ z
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    g, s = _schedule(torch.tensor(440))
    with torch.no_grad():
        eps = res.generator(float(s) * z, torch.full((6,), 440), class_labels=torch.tensor([3, 3, 0, 1, 2, 3])).sample
    torch.testing.assert_close(x, ((float(s) * z - float(s) * eps) / float(g)).clamp(-1, 1), rtol=1e-5, atol=1e-5)

    res.save(tmp_path / "r")
    back = fu.load(tmp_path / "r")
    assert back.method == "sfd" and back.generator is not None
    torch.testing.assert_close(back.sample(6, class_labels=[3, 3, 0, 1, 2, 3], seed=5), x)
    for (n, a), (_, b) in zip(res.model.state_dict().items(), back.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_one_step_samples_of_a_latent_pipeline_are_not_clamped(tiny_pipelines, tmp_path):
    """x0 = (x_{t*} − σ ε)/γ is clamped to [-1, 1] on pixel models only: SD's scaled VAE latents have unit
    variance, so the generator's latents go to the VAE decoder as they are (here well past ±1)."""
    pipe = tiny_pipelines["sd"]()
    res = fu.erase(pipe, forget=fu.Concept("a photo of a cat", anchor="a photo of a dog"), method="sfd", steps=1,
                   batch_size=2, progress=False)
    prompts = ["a photo of a cat", "a photo of a dog", "a red car"]
    z = res.sample(3, prompts=prompts, seed=5, output_type="latent")
    ex = res.extras
    s, g, t = ex["sigma_init"], ex["gamma_init"], ex["t_init"]
    noise = torch.randn(3, *Denoiser(res.generator).sample_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps = res.generator(s * noise, torch.full((3,), t), **ex["encode_prompts"](prompts)).sample
    want = (s * noise - s * eps) / g
    assert want.abs().max() > 1.5  # the clamp would cut these
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    assert res.sample(3, prompts=prompts, seed=5, output_type="pt").shape[1] == 3  # decoded through the VAE
    res.save(tmp_path / "r")  # a loaded result knows it is latent (vae_scale_factor in its extras)
    torch.testing.assert_close(get_method("sfd").sample_one_step(fu.load(tmp_path / "r"), 3,
                                                                 ex["encode_prompts"](prompts), seed=5), want,
                               rtol=1e-5, atol=1e-5)


def test_erase_with_lora_returns_plain_modules(tiny, tmp_path):
    unet, sched = tiny
    res = fu.erase(unet, forget=fu.Classes([3], override=1), method="sfd", scheduler=sched, steps=1,
                   batch_size=2, lora_rank=2, progress=False)
    from fastunlearn.lora import has_lora
    assert not has_lora(res.generator) and not has_lora(res.model)
    assert any(not torch.equal(a, b) for a, b in zip(res.generator.parameters(), res.model.parameters()))
    assert res.sample(3, class_labels=3).shape == (3, 1, 8, 8)
    res.save(tmp_path / "r")
    torch.testing.assert_close(fu.load(tmp_path / "r").sample(3, class_labels=3), res.sample(3, class_labels=3))


def test_bad_inputs_are_clear_errors(tiny):
    unet, sched = tiny
    images = torch.zeros(2, 1, 8, 8)
    with pytest.raises(InvalidArgumentError, match="forget"):
        fu.erase(unet, forget=fu.DataPoints(images, labels=torch.tensor([3, 3])), method="sfd", scheduler=sched)
    with pytest.raises(InvalidTypeError, match="retain"):
        fu.erase(unet, forget=fu.Classes([3]), retain=fu.DataPoints(images, labels=torch.tensor([1, 2])),
                 method="sfd", scheduler=sched, progress=False)
    with pytest.raises(InvalidArgumentError, match="retain"):
        fu.erase(unet, forget=fu.Classes([3]), retain=fu.Classes([3, 4]), method="sfd", scheduler=sched,
                 progress=False)
    with pytest.raises(InvalidArgumentError, match="override"):
        fu.erase(unet, forget=fu.Classes([3], override=1), method="sfd", scheduler=sched, override=2,
                 progress=False)
    with pytest.raises(InvalidArgumentError, match="t_max"):
        fu.erase(unet, forget=fu.Classes([3]), method="sfd", scheduler=sched, t_min=500, t_max=400, progress=False)
    for bad in (dict(alpha="x"), dict(g_forget_coef=-1.0), dict(two_stage=-1), dict(lr_fake=0),
                dict(forget_batch_size=0), dict(t_init=1.5)):
        with pytest.raises((InvalidArgumentError, InvalidTypeError), match=next(iter(bad))):
            fu.erase(unet, forget=fu.Classes([3]), method="sfd", scheduler=sched, **bad)


def test_concepts_on_a_text_model():
    """Text models: the forget prompt conditions the generator and the fake score, the anchor the teacher."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    vocab = {}

    def encode(prompts):
        for p in prompts:
            vocab.setdefault(p, torch.randn(3, 8, generator=torch.Generator().manual_seed(len(vocab))))
        return {"encoder_hidden_states": torch.stack([vocab[p] for p in prompts])}

    run = Run(unet, digits_scheduler(), forget=None, retain=None, forget_target=fu.Concept("a cat", anchor="a dog"),
              retain_target=["a tree", "a car"], batch_size=3, seed=0, encode_prompts=encode)
    m = _method(run)
    labels = m.draw_labels(step_generator(0, 0), m.coefficients(0))
    n = labels.n_remain
    cond_gen, cond_teacher = m.cond(labels.gen), m.cond(labels.teacher)
    assert torch.equal(cond_gen["encoder_hidden_states"][n:], vocab["a cat"].expand(3, 3, 8))
    assert torch.equal(cond_teacher["encoder_hidden_states"][n:], vocab["a dog"].expand(3, 3, 8))
    remain = cond_gen["encoder_hidden_states"][:n]
    assert all(any(torch.equal(r, vocab[p]) for p in ("a tree", "a car")) for r in remain)
    th0 = _snapshot(m.theta)
    stats = m.step(0, step_generator(0, 0))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert not any(_changed(m.theta, th0)) and any(p.grad.abs().max() > 0 for p in m.theta)


# ------------------------------------------------------------------------------------------ bundled model
@pytest.mark.slow
def test_sfd_forgets_a_digit_data_free_on_the_bundled_model():
    from fastunlearn.metrics import recognition_rates, summarize_classes

    unet, sched = fu.zoo.digits()
    digit, override = 3, 8
    before = recognition_rates(unet, sched, range(10), n_per_class=50, seed=0)  # the original, 50 DDIM steps
    res = fu.erase(unet, forget=fu.Classes([digit], override=override), method="sfd", scheduler=sched,
                   progress=False)  # no images anywhere
    after = recognition_rates(None, sched, range(10), n_per_class=100, seed=1,
                              sampler=lambda n, labels, seed: res.sample(n, class_labels=labels, seed=seed))
    s = summarize_classes(before, after, [digit])
    assert s["forget_rate_before"] >= 0.75, s
    assert s["forget_rate_after"] <= 0.02, s
    assert s["retain_ratio_min"] >= 0.90, s


def test_lora_adapters_start_from_the_run_seed(tiny):
    """Both adapters (θ and ψ) are drawn from the run's seed, not from the caller's random state."""
    unet = tiny[0]

    def adapters(seed, noise):
        torch.manual_seed(noise)
        m = _method(_run(unet, lora_rank=2, seed=seed))
        return [p.detach().clone() for p in m.theta + m.psi]

    a, b, c = adapters(0, 1), adapters(0, 2), adapters(1, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
