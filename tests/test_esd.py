"""ESD (spec §6): the loss against the plain formula with an independent frozen copy, the frozen teacher
without a second model, the trajectory pool (exact resume, compute saving), option errors, and the
end-to-end run on the bundled digits model."""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn import ops
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.methods import get_method
from fastunlearn.generation import ddim_states
from fastunlearn.roles import Roles
from fastunlearn.run import Run, step_generator


def _run(tiny, target=None, B=4, lora_rank=None):
    unet, sched = tiny
    return Run(unet, sched, forget=None, retain=None, forget_target=target or fu.Classes([3]), retain_target=None,
               batch_size=B, seed=0, lora_rank=lora_rank)


def _method(run, **opts):
    m = get_method("esd")(run, **{"ddim_steps": 6, **opts})
    m.setup()
    return m


def test_esd_loss_is_the_plain_formula():
    pred, e_from, e_c, e_null = (torch.randn(3, 2, 4, 4) for _ in range(4))
    target = e_from - 1.5 * (e_c - e_null)
    torch.testing.assert_close(ops.esd_loss(pred, e_from, e_c, e_null, 1.5), ((pred - target) ** 2).mean())
    w = torch.tensor([1.0, 0.0, 3.0])
    per_row = ((pred - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ops.esd_loss(pred, e_from, e_c, e_null, 1.5, w), (w * per_row).sum() / 3)


def test_step_gradient_matches_formula_with_an_independent_frozen_copy(tiny):
    run = _run(tiny)
    frozen = copy.deepcopy(run.model).requires_grad_(False)
    m = _method(run, negative_guidance=2.0)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    for s in range(3):  # move the student away from the base first
        m.step(s, step_generator(0, s))
        opt.step()
    x_t, t, ci = m.draw(3, step_generator(0, 3))
    assert (ci == 0).all()  # one forgotten class: condition index 0 = class 3
    c, null = torch.full((4,), 3), torch.full((4,), 10)
    with torch.no_grad():
        e_c = frozen(x_t, t, class_labels=c).sample
        e_null = frozen(x_t, t, class_labels=null).sample
        torch.testing.assert_close(m.teacher(x_t, t, c), e_c, rtol=1e-5, atol=1e-6)  # teacher = base weights
        assert not torch.allclose(run.denoiser(x_t, t, c), e_c, atol=1e-4)          # student moved
    student = copy.deepcopy(run.model)
    loss = ((student(x_t, t, class_labels=c).sample - (e_c - 2.0 * (e_c - e_null))) ** 2).mean()
    ref = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    stats = m.step(3, step_generator(0, 3))
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4)
    for p, r in zip(m.trainable_parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-3, atol=1e-7)


def test_frozen_teacher_keeps_only_the_trained_tensors(tiny):
    run = _run(tiny)
    for name, p in run.model.named_parameters():
        p.requires_grad_(name.startswith("class_embedding"))
    frozen = Roles(run).copies()["teacher"]
    assert list(frozen) == ["class_embedding.weight"]
    total = sum(p.numel() * 4 for p in run.model.parameters())
    assert sum(t.numel() * t.element_size() for t in frozen.values()) < 0.05 * total


def test_lora_teacher_is_the_model_with_adapters_off(tiny):
    run = _run(tiny, lora_rank=2)
    m = _method(run)
    assert not m.roles.copies()  # no copy of any weight: the teacher is the base with adapters off
    for p in m.trainable_parameters():
        p.data.add_(0.05)  # a trained adapter
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([500, 20]), torch.tensor([3, 3])
    with torch.no_grad():
        torch.testing.assert_close(m.teacher(x, t, c), tiny[0](x, t, class_labels=c).sample, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(run.denoiser(x, t, c), m.teacher(x, t, c), atol=1e-4)


def test_pool_states_are_the_frozen_models_ddim_trajectories(tiny):
    run = _run(tiny)
    m = _method(run, pool_size=3, start_guidance=3.0)
    m.draw(0, step_generator(0, 0))
    states, ci, ts = m._pool
    assert states.shape == (6, 3, 1, 8, 8) and len(ts) == 6
    # Rebuild trajectory 0 directly with CFG w = 3 between class 3 and the null class.
    own, _ = ddim_states(m.teacher, run.scheduler, states[0, :1], torch.tensor([3]), 6, 5, 3.0, torch.tensor([10]))
    # batch 1 vs 3 changes the conv summation order: float32 jitter of ~1e-5 that DDIM steps amplify
    torch.testing.assert_close(torch.stack(own)[:, 0], states[:, 0], rtol=1e-3, atol=2e-4)


def test_pool_is_rebuilt_identically_on_resume(tiny):
    run = _run(tiny)
    a = _method(run, pool_refresh=4)
    for s in range(6):
        xa, ta, _ = a.draw(s, step_generator(0, s))
    b = _method(_run(tiny), pool_refresh=4)  # a resumed run starts at step 5 (pool built at step 4)
    xb, tb, _ = b.draw(5, step_generator(0, 5))
    torch.testing.assert_close(xa, xb)
    assert torch.equal(ta, tb)


def test_pool_saves_unet_evaluations(tiny):
    counts = {}
    for pool in (True, False):
        run = _run(tiny, B=4)
        m = _method(run, trajectory_pool=pool, ddim_steps=10, pool_size=4, pool_refresh=20)
        for s in range(20):
            m.step(s, step_generator(0, s))
        counts[pool] = m.evals["sampling_rows"]
    assert counts[True] == 2 * 4 * 9  # one pool of 4 trajectories × 9 DDIM steps × (c, ∅)
    assert counts[False] > 3 * counts[True]


def test_esd_x_on_a_model_without_cross_attention_is_refused(tiny):
    unet, sched = tiny
    with pytest.raises(InvalidArgumentError, match="^params.*cross-attention"):
        fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, params="esd-x", progress=False)


def test_model_without_null_class_uses_the_class_mean_and_says_so(make_tiny_unet, caplog):
    """No null class: ε(x_t, ∅) defaults to the mean of the frozen model's predictions over the K classes,
    stated in the log and the result; ``null_class=<id>`` stays the override."""
    import logging

    from fastunlearn.models import digits_scheduler

    unet, sched = make_tiny_unet(null=False), digits_scheduler()
    with caplog.at_level(logging.INFO, logger="fastunlearn.methods.esd"):
        res = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=2, batch_size=2,
                       ddim_steps=4, progress=False)
    assert "mean of the model's predictions over its 10 classes" in res.extras["null"]
    assert any("no null class" in r.getMessage() for r in caplog.records)
    assert len(res.history) == 2 and res.extras["params"] == "class-embedding"
    # (1 + 10) rows per sampling row: one pool of 4·B = 8 trajectories × 3 DDIM steps
    assert res.extras["unet_evals"]["sampling_rows"] == 11 * 8 * 3
    res = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=2, batch_size=2,
                   null_class=9, ddim_steps=4, progress=False)
    assert res.extras["null"] == "class 9 as a stand-in for the null class"


def test_class_mean_null_is_the_mean_over_classes(make_tiny_unet):
    from fastunlearn.methods.esd import NULL_MEAN, ClassMeanNull

    unet = make_tiny_unet(null=False).eval()
    eps = lambda x, t, c: unet(x, t, class_labels=c).sample  # noqa: E731
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([900, 500, 20])
    cond = torch.tensor([NULL_MEAN, 4, NULL_MEAN])
    with torch.no_grad():
        got = ClassMeanNull(eps, 10)(x, t, cond)
        for i in (0, 2):
            ref = torch.stack([eps(x[i:i + 1], t[i:i + 1], torch.tensor([k])) for k in range(10)]).mean(0)[0]
            torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], eps(x[1:2], t[1:2], torch.tensor([4]))[0], rtol=1e-4, atol=1e-5)


def test_the_class_mean_step_matches_the_formula(make_tiny_unet):
    """The loss with the class mean as ∅ against the plain formula: target = ε_c − η(ε_c − mean_k ε_k)."""
    from fastunlearn.models import digits_scheduler

    unet = make_tiny_unet(null=False)
    run = Run(unet, digits_scheduler(), forget=None, retain=None, forget_target=fu.Classes([3]),
              retain_target=None, batch_size=3, seed=0)
    m = _method(run, negative_guidance=4.0, params="full")
    x_t, t, ci = m.draw(0, step_generator(0, 0))
    frozen = copy.deepcopy(unet).requires_grad_(False)
    c = torch.full((3,), 3)
    with torch.no_grad():
        e_c = frozen(x_t, t, class_labels=c).sample
        e_null = torch.stack([frozen(x_t, t, class_labels=torch.full((3,), k)).sample for k in range(10)]).mean(0)
    loss = ((unet(x_t, t, class_labels=c).sample - (e_c - 4.0 * (e_c - e_null))) ** 2).mean()
    got = m.loss(x_t, t, ci)
    assert got.item() == pytest.approx(loss.item(), rel=1e-4)


def test_pool_is_shown_counted_and_cached_across_runs(tiny, monkeypatch, tmp_path, capsys, one_thread):
    """Each pool shows in the progress display (trajectories, DDIM steps, guidance, UNet evaluations) and is
    cached on disk: a second run takes both pools from the cache (no sampling row) and ends identical."""
    unet, sched = tiny
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(forget=fu.Classes([3]), method="esd", scheduler=sched, steps=3, batch_size=2, ddim_steps=4,
              pool_refresh=2)
    capsys.readouterr()
    first = fu.erase(unet, progress=True, **kw)
    # 4·B = 8 trajectories × 3 DDIM steps × (c, ∅), at steps 0 and 2
    assert "generating 8 trajectories for ESD's pool: 3 DDIM steps, guidance 3, 48 UNet evaluations" in \
        capsys.readouterr().err
    pools = first.extras["generated"]["pool"]
    assert [(p["rows"], p["unet_evals"], p["cached"]) for p in pools] == [(8, 48, False)] * 2
    assert first.extras["unet_evals"]["sampling_rows"] == 96
    second = fu.erase(unet, progress=False, **kw)
    assert second.extras["unet_evals"]["sampling_rows"] == 0
    assert [(p["unet_evals"], p["cached"]) for p in second.extras["generated"]["pool"]] == [(0, True)] * 2
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    for (k, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k
    third = fu.erase(unet, progress=False, cache_generated=False, **kw)
    assert third.extras["unet_evals"]["sampling_rows"] == 96
    assert [h["loss"] for h in third.history] == [h["loss"] for h in first.history]


def test_the_cache_option_does_not_block_a_resume(tiny, tmp_path, one_thread):
    """cache_generated changes no number (a hit is bit for bit), so a run resumes with it changed."""
    unet, sched = tiny
    kw = dict(forget=fu.Classes([3]), method="esd", scheduler=sched, batch_size=2, ddim_steps=3,
              output_dir=tmp_path / "run", checkpoint_every=1, progress=False)
    fu.erase(unet, steps=1, **kw)
    res = fu.erase(unet, steps=2, resume=True, cache_generated=False, **kw)
    assert res.meta["resumed_from_step"] == 1 and len(res.history) == 2


def test_pool_size_scales_with_the_model(tiny):
    """4·B trajectories on pixel models, 2·B on latent pipelines (SD / SDXL), whose trajectories cost most."""
    unet, sched = tiny
    assert get_method("esd")(_run(tiny)).opts["pool_size"] is None
    assert _method(_run(tiny, B=3)).pool_size == 12
    run = Run(unet, sched, forget=None, retain=None, forget_target=fu.Classes([3]), retain_target=None,
              batch_size=3, seed=0, latent=True)
    assert _method(run).pool_size == 6 and _method(run, pool_size=5).pool_size == 5


@pytest.mark.parametrize("opts,name", [
    (dict(params="bogus"), "params"),
    (dict(negative_guidance=-1.0), "negative_guidance"),
    (dict(trajectory_pool="yes"), "trajectory_pool"),
    (dict(pool_size=0), "pool_size"),
    (dict(pool_size=10**6), "pool_size"),
    (dict(cache_generated=1), "cache_generated"),
    (dict(ddim_steps=0), "ddim_steps"),
    (dict(erase_from="a cat"), "erase_from"),
    (dict(null_class="median"), "null_class"),
])
def test_bad_options_name_the_option(tiny, opts, name):
    unet, sched = tiny
    with pytest.raises((InvalidArgumentError, TypeError), match=f"^{name}"):
        fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=1, progress=False, **opts)


def test_class_defaults_train_only_the_erased_rows(tiny):
    """fu.Classes: only class_embedding rows of the erased classes move, so every other label's samples are
    bit-identical; and the class defaults (lr 3e-2, η = 20) apply only to that subset."""
    unet, sched = tiny
    res = fu.erase(unet, forget=fu.Classes([3, 5]), method="esd", scheduler=sched, steps=3, batch_size=4,
                   ddim_steps=4, progress=False)
    assert res.extras["params"] == "class-embedding" and res.meta["lr"] == 3e-2
    assert res.extras["negative_guidance"] == 20.0
    before, after = unet.state_dict(), res.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"class_embedding.weight"}
    rows = (before["class_embedding.weight"] != after["class_embedding.weight"]).any(1).nonzero().flatten()
    assert rows.tolist() == [3, 5]
    full = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=1, batch_size=2,
                    ddim_steps=2, params="full", progress=False)
    assert full.meta["lr"] == 1e-4  # an explicit subset keeps the general default


def test_classes_without_data_default_to_esd(tiny):
    unet, sched = tiny
    res = fu.erase(unet, forget=fu.Classes([3, 5]), scheduler=sched, steps=3, batch_size=4, ddim_steps=5,
                   progress=False)
    assert res.method == "esd"
    ev = res.extras["unet_evals"]
    # one pool: 4·B = 16 trajectories × 4 DDIM steps × (c, ∅)
    assert ev["student_rows"] == 12 and ev["teacher_rows"] == 24 and ev["sampling_rows"] == 2 * 16 * 4


@pytest.mark.slow
def test_esd_forgets_one_digit_and_keeps_the_rest(digits_rates_before):
    """The issue's acceptance run: the class alone, no data (class defaults: the class-embedding rows, η = 20)."""
    import time

    from fastunlearn.metrics import recognition_rates, summarize_classes

    unet, sched = fu.zoo.digits()
    t0 = time.perf_counter()
    res = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, progress=False)
    seconds = time.perf_counter() - t0
    after = recognition_rates(res.model, sched, range(10), n_per_class=100, seed=0)
    s = summarize_classes(digits_rates_before, after, [3])
    print(f"esd: {s['forget_rate_before']:.2f} -> {s['forget_rate_after']:.2f}, retain "
          f"{s['retain_rate_before']:.3f} -> {s['retain_rate_after']:.3f}, kept {s['retain_ratio_mean']:.3f} "
          f"(min {s['retain_ratio_min']:.3f}), {res.meta['steps']} steps, {seconds:.0f} s, lr {res.meta['lr']}, "
          f"{res.extras['unet_evals']}")
    assert res.extras["params"] == "class-embedding" and res.meta["lr"] == 3e-2
    assert s["forget_rate_before"] >= 0.75, s
    assert s["forget_rate_after"] <= 0.02, s
    assert s["retain_ratio_mean"] >= 0.95, s


@pytest.mark.slow
def test_esd_forgets_a_digit_on_the_model_with_its_null_class_hidden():
    """The bundled model as a plain ``UNet2DModel(num_class_embeds=10)`` (no null class, as most class models are
    trained): the default ε(x_t, ∅), the mean over the 10 classes, forgets digit 3 and keeps the others, as the
    real null class does (README: 95% → 0% with both, other digits kept 100%)."""
    import importlib.util
    from pathlib import Path

    from fastunlearn.metrics import recognition_rates, summarize_classes

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "method_checks.py"
    spec = importlib.util.spec_from_file_location("method_checks", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    unet, sched = fu.zoo.digits()
    plain = checks.without_null_class(unet)
    assert plain.config.num_class_embeds == 10 and fu.models.Denoiser(plain).null_class is None
    before = recognition_rates(plain, sched, range(10), n_per_class=100, seed=0)
    res = fu.erase(plain, forget=fu.Classes([3]), method="esd", scheduler=sched, progress=False)
    assert res.extras["null"] == "mean of the model's predictions over its 10 classes"
    after = recognition_rates(res.model, sched, range(10), n_per_class=100, seed=0)
    s = summarize_classes(before, after, [3])
    print(f"esd, null hidden: {s['forget_rate_before']:.2f} -> {s['forget_rate_after']:.2f}, kept "
          f"{s['retain_ratio_mean']:.3f} (min {s['retain_ratio_min']:.3f})")
    assert s["forget_rate_before"] >= 0.75, s
    assert s["forget_rate_after"] <= 0.02, s
    assert s["retain_ratio_mean"] >= 0.95 and s["retain_ratio_min"] >= 0.95, s
