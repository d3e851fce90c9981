"""Roles on one shared base (fastunlearn.roles): one copy of the base weights with LoRA, role switches turning
the right adapters on and off, only the declared roles' tensors trainable, checkpoints saving and restoring
every trained role, and runtime precision and gradient checkpointing reaching every role."""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn import runtime
from fastunlearn.checkpoint import Checkpointer
from fastunlearn.methods import get_method
from fastunlearn.models import Denoiser
from fastunlearn.roles import Roles
from fastunlearn.run import Run


def _run(tiny, lora_rank=None, seed=0):
    unet, sched = tiny
    return Run(unet, sched, forget=None, retain=None, forget_target=fu.Classes([3]), retain_target=None,
               batch_size=2, seed=seed, lora_rank=lora_rank)


def _sfd_roles(run):
    return Roles(run, trained=("generator", "fake_score"))


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([100, 600]), torch.tensor([1, 4])


def _perturb(tensors, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _lora_b(run, adapter):
    return [p for n, p in run.model.named_parameters() if "lora_B" in n and f".{adapter}." in n]


def test_lora_roles_hold_one_copy_of_the_base_weights(tiny):
    run = _run(tiny, lora_rank=2)
    base = {n: p.data_ptr() for n, p in run.model.named_parameters() if "lora_" not in n}
    roles = _sfd_roles(run)
    assert not roles.copies()
    after = {n: p for n, p in run.model.named_parameters() if "lora_" not in n}
    assert {n: p.data_ptr() for n, p in after.items()} == base  # the base was neither copied nor moved
    role_ptrs = {p.data_ptr() for p in roles.parameters()}
    assert role_ptrs.isdisjoint(base.values())
    # every trained tensor is an adapter of the one model
    model_ptrs = {p.data_ptr() for p in run.model.parameters()}
    assert role_ptrs <= model_ptrs
    names = roles.named_parameters()
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[1].split(".")[1] for n in names} == {"default", "fake_score"}


def test_without_lora_only_the_trained_subset_is_copied(tiny):
    run = _run(tiny)
    for n, p in run.model.named_parameters():
        p.requires_grad_(n.startswith("class_embedding."))  # what ESD's class-embedding subset trains
    roles = Roles(run)
    frozen = roles.copies()["teacher"]
    assert list(frozen) == ["class_embedding.weight"]
    own = dict(run.model.named_parameters())["class_embedding.weight"]
    assert frozen["class_embedding.weight"].data_ptr() != own.data_ptr()
    assert torch.equal(frozen["class_embedding.weight"], own)


def test_switching_roles_turns_the_right_adapters_on_and_off(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    run = _run(tiny, lora_rank=2)
    roles = _sfd_roles(run)
    x, t, c = _inputs()
    plain = Denoiser(tiny[0])
    with torch.no_grad():
        base = plain(x, t, c)
        _perturb(_lora_b(run, "fake_score"), seed=1)  # only ψ's adapter has an effect
        torch.testing.assert_close(roles.eps("generator", x, t, c), base)
        torch.testing.assert_close(roles.eps("teacher", x, t, c), base)
        fake = roles.eps("fake_score", x, t, c)
        assert not torch.allclose(fake, base, atol=1e-4)
        _perturb(_lora_b(run, "default"), seed=2)  # now θ's too
        gen = roles.eps("generator", x, t, c)
        assert not torch.allclose(gen, base, atol=1e-4) and not torch.allclose(gen, fake, atol=1e-4)
        torch.testing.assert_close(roles.eps("teacher", x, t, c), base)  # adapters off: the input model
        torch.testing.assert_close(roles.eps("fake_score", x, t, c), fake)  # θ's adapter plays no part
    layers = [m for m in run.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(not m.disable_adapters and m.active_adapters == ["default"] for m in layers)
    with pytest.raises(KeyError, match="student"):
        roles.eps("student", x, t, c)


def _modes_during(roles, role, train=False):
    """Every module's training flag while ``role`` runs (a forward pre-hook on the model), and after."""
    seen = {}
    model = roles.model
    h = model.register_forward_pre_hook(lambda m, a: seen.update(during={n: x.training for n, x in m.named_modules()}))
    try:
        x, t, c = _inputs()
        with torch.no_grad():
            roles.eps(role, x, t, c, train=train)
    finally:
        h.remove()
    return seen["during"], {n: x.training for n, x in model.named_modules()}


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_a_role_call_sets_every_module_mode_and_restores_it(tiny, lora_rank):
    run = _run(tiny, lora_rank=lora_rank)
    roles = _sfd_roles(run)
    assert run.model.training
    during, after = _modes_during(roles, "teacher", train=True)  # the teacher always runs in eval mode
    assert not any(during.values()) and all(after.values())
    during, after = _modes_during(roles, "fake_score", train=True)
    assert all(during.values()) and all(after.values())
    run.model.eval()
    during, after = _modes_during(roles, "generator", train=True)
    assert all(during.values()) and not any(after.values())


def test_a_module_with_its_own_train_gets_its_own_train_called(tiny):
    run = _run(tiny, lora_rank=2)
    calls = []

    class Logged(torch.nn.Identity):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    run.model.add_module("logged", Logged())
    roles = _sfd_roles(run)
    _modes_during(roles, "teacher")
    assert calls == [False, True]  # model.train() reached it: into eval for the call, back to train after


def test_copies_evaluate_like_separate_models(tiny):
    run = _run(tiny)
    roles = _sfd_roles(run)
    x, t, c = _inputs()
    _perturb(roles.parameters("fake_score"), seed=1)
    _perturb(roles.parameters("generator"), seed=2)
    fake = roles.plain_module("fake_score")
    assert fake is not run.model and roles.plain_module("generator") is run.model
    with torch.no_grad():
        torch.testing.assert_close(roles.eps("fake_score", x, t, c), Denoiser(fake)(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(roles.eps("teacher", x, t, c), Denoiser(tiny[0])(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(roles.eps("generator", x, t, c), run.denoiser(x, t, c), rtol=0, atol=0)


def test_the_last_plain_module_merges_into_the_base_itself(tiny):
    """With LoRA the roles end as standalone models: the first as a merged copy (new tensors for its adapted layers
    only), the last merged into the run's own base (no third full model at the end of an SFD run); each evaluates
    as its role did."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    run = _run(tiny, lora_rank=2)
    roles = _sfd_roles(run)
    x, t, c = _inputs()
    _perturb(_lora_b(run, "fake_score"), seed=1)
    _perturb(_lora_b(run, "default"), seed=2)
    adapted = {n for n, m in run.model.named_modules() if isinstance(m, BaseTunerLayer)}
    with torch.no_grad():
        want_gen, want_fake = roles.eps("generator", x, t, c), roles.eps("fake_score", x, t, c)
        gen = roles.plain_module("generator")
        fake = roles.plain_module("fake_score", last=True)
        assert gen is not run.model and fake is run.model
        assert not any(isinstance(m, BaseTunerLayer) for m in list(gen.modules()) + list(fake.modules()))
        torch.testing.assert_close(Denoiser(gen)(x, t, c), want_gen, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(Denoiser(fake)(x, t, c), want_fake, rtol=1e-5, atol=1e-6)
    # Each adapted layer's merged weight is its own; every other tensor is the base's, held once by both
    gen_p, fake_p = dict(gen.named_parameters()), dict(fake.named_parameters())
    own = {n for n in gen_p if n.rsplit(".", 1)[0] in adapted and n.endswith(".weight")}
    assert own and gen_p.keys() == fake_p.keys()
    assert {n for n in gen_p if gen_p[n].data_ptr() != fake_p[n].data_ptr()} == own


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_only_the_declared_roles_train(tiny, lora_rank):
    run = _run(tiny, lora_rank=lora_rank)
    roles = _sfd_roles(run)
    trained = {id(p) for p in roles.parameters()}
    assert trained == {id(p) for p in roles.parameters("generator")} | {id(p) for p in roles.parameters("fake_score")}
    x, t, c = _inputs()
    for role in ("teacher", "fake_score", "generator"):  # a switch changes no requires_grad
        roles.eps(role, x, t, c)
        assert {id(p) for p in run.model.parameters() if p.requires_grad} | {
            id(p) for p in roles.parameters("fake_score")} == trained
        assert all(p.requires_grad for p in roles.parameters())
        assert not any(t_.requires_grad for t_ in roles.copies().get("teacher", {}).values())
    if lora_rank is not None:
        assert all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)


def test_a_switch_keeps_a_trained_subset_of_the_adapters(tiny):
    """ESD-x with LoRA trains the cross-attention adapters only; peft's switch back from the teacher marks every
    adapter trainable, and Roles must freeze the others again."""
    run = _run(tiny, lora_rank=2)
    for n, p in run.model.named_parameters():
        p.requires_grad_("lora_" in n and ".to_q." in n)  # the declared subset
    subset = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert subset and subset != {n for n in dict(run.model.named_parameters()) if "lora_" in n}
    roles = Roles(run)
    x, t, c = _inputs()
    for role in ("teacher", "student", "teacher"):
        roles.eps(role, x, t, c)
        assert {n for n, p in run.model.named_parameters() if p.requires_grad} == subset
    assert {id(p) for p in run.trainable_parameters()} == {id(p) for p in roles.parameters()}


def test_a_method_without_declared_roles_trains_the_run_model_alone(tiny):
    run = _run(tiny)
    m = get_method("naive")(run)
    m.setup()
    assert m.roles.names == ("student",) and not m.roles.copies()
    assert [id(p) for p in m.roles.parameters()] == [id(p) for p in m.trainable_parameters()]


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_checkpoints_save_and_restore_every_trained_role(tiny, tmp_path, lora_rank):
    run = _run(tiny, lora_rank=lora_rank)
    m = get_method("sfd")(run, forget_batch_size=1)
    m.setup()
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-3)
    ckpt = Checkpointer.prepare(tmp_path, every=1, keep=2, resume=False, fingerprint={}, steps=2)
    assert ckpt.restore(run, m, opt) == (0, [])
    _perturb(m.psi, seed=1)
    _perturb(m.theta, seed=2)
    saved = {n: p.detach().clone() for n, p in m.roles.named_parameters().items()}
    assert any(n.startswith("fake_score") or ".fake_score." in n for n in saved)
    ckpt.save(1, [])

    run2 = _run(tiny, lora_rank=lora_rank)
    m2 = get_method("sfd")(run2, forget_batch_size=1)
    m2.setup()
    opt2 = torch.optim.Adam(m2.trainable_parameters(), lr=1e-3)
    assert not all(torch.equal(saved[n], p) for n, p in m2.roles.named_parameters().items())
    again = Checkpointer.prepare(tmp_path, every=1, keep=2, resume=True, fingerprint={}, steps=2)
    assert again.restore(run2, m2, opt2)[0] == 1
    for n, p in m2.roles.named_parameters().items():
        assert torch.equal(p, saved[n]), n


def test_runtime_precision_reaches_every_role(tiny):
    run = _run(tiny)
    m = get_method("sfd")(run, forget_batch_size=1)
    m.setup()
    applied = runtime.apply(run, runtime.Runtime(precision="bf16"), method=m)
    try:
        assert all(t.dtype == torch.bfloat16 for t in m.roles.copies()["teacher"].values())  # frozen: low precision
        assert all(p.dtype == torch.float32 for p in m.roles.parameters())                 # trained: fp32
    finally:
        applied.release()


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_gradient_checkpointing_recomputes_every_role_as_it_ran(tiny, lora_rank):
    """The fake score and the teacher run forward, the generator's weights (copies) or adapter (LoRA) are back
    in place when the backward recomputes their blocks: the gradients equal those without checkpointing."""
    x, t, c = _inputs()

    def grads(checkpointing):
        run = _run(tiny, lora_rank=lora_rank)
        roles = _sfd_roles(run)
        if lora_rank is None:
            _perturb(roles.parameters("fake_score"), seed=1)
        else:
            _perturb(_lora_b(run, "fake_score"), seed=1)
            _perturb(_lora_b(run, "default"), seed=2)
        if checkpointing:
            runtime.enable_checkpointing(run.model)
        xi = x.clone().requires_grad_(True)
        fake = roles.eps("fake_score", xi, t, c, train=True)
        teacher = roles.eps("teacher", xi, t, c)
        loss = (fake ** 2).sum() + (teacher * fake.detach()).sum()
        params = [xi, *roles.parameters("fake_score")]
        return torch.autograd.grad(loss, params)

    ref, ours = grads(False), grads(True)
    assert len(ref) == len(ours) and ref[0].abs().max() > 0
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
