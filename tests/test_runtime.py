"""Runtime switches (fastunlearn.runtime): precision, gradient checkpointing, attention, 8-bit AdamW, TF32.

Each switch is checked where it acts: on the run's model during training (through a wrapper around the
training loop), on the result, and for bad input as a clear error before any work."""
import copy
import sys
import warnings

import pytest
import torch

import fastunlearn as fu
import fastunlearn.trainer as trainer
from fastunlearn import runtime
from fastunlearn.errors import InvalidArgumentError


@pytest.fixture
def siss_args(tiny):
    unet, sched = tiny
    g = torch.Generator().manual_seed(1)
    forget = fu.DataPoints(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, labels=torch.full((4,), 3))
    retain = fu.DataPoints(torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, labels=torch.arange(8) % 3)
    return unet, dict(forget=forget, retain=retain, method="siss", scheduler=sched, steps=2, batch_size=4,
                      progress=False)


@pytest.fixture
def spy_training(monkeypatch):
    """Replaces erase()'s training loop by a wrapper that records the run's model as training starts."""
    seen = {}
    real = trainer.loop

    def wrapper(method, optimizer, *a, **k):
        model = method.run.model
        seen["dtypes"] = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        seen["optimizer"] = optimizer
        seen["checkpointing"] = [m.gradient_checkpointing for m in model.modules()
                                 if hasattr(m, "gradient_checkpointing")]
        seen["ckpt_func"] = [getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()
                             if getattr(m, "gradient_checkpointing", False)]
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32
        out = {}

        def record(mod, inputs, output):  # returns None: the output is left as it is
            out.setdefault("dtype", output.dtype)

        h = model.conv_in.register_forward_hook(record)
        try:
            return real(method, optimizer, *a, **k)
        finally:
            h.remove()
            seen["compute_dtype"] = out.get("dtype")

    monkeypatch.setattr(trainer, "loop", wrapper)
    return seen


def test_bf16_keeps_trainable_weights_fp32_and_gives_back_the_input_precision(siss_args, spy_training):
    unet, kw = siss_args
    res = fu.erase(unet, precision="bf16", lora_rank=2, **kw)
    dt = spy_training["dtypes"]
    trainable = {n: d for n, (d, rg) in dt.items() if rg}
    frozen = {n: d for n, (d, rg) in dt.items() if not rg}
    assert trainable and all(d == torch.float32 for d in trainable.values())        # LoRA adapters: fp32
    assert all("lora_" in n for n in trainable)
    assert frozen and all(d == torch.bfloat16 for d in frozen.values())            # the base: bf16
    assert spy_training["compute_dtype"] == torch.bfloat16                         # forwards under autocast
    assert res.meta["runtime"]["precision"] == "bf16"
    # After training the frozen base is the input's fp32 weights again, bit for bit.
    base = {n.replace(".base_layer", ""): p for n, p in res.model.named_parameters() if "lora_" not in n}
    orig = dict(unet.named_parameters())
    assert base.keys() == orig.keys()
    assert all(p.dtype == torch.float32 and torch.equal(p, orig[n]) for n, p in base.items())
    # ... and the input's own tensors, not a second copy (frozen: never written)
    assert all(p.data_ptr() == orig[n].data_ptr() for n, p in base.items())


def test_bf16_full_weights_train_in_fp32(siss_args, spy_training):
    unet, kw = siss_args
    res = fu.erase(unet, precision="bf16", **kw)
    assert all(d == torch.float32 for d, rg in spy_training["dtypes"].values() if rg)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(res.model.parameters(), unet.parameters()))


def test_default_precision_is_fp32_on_cpu_and_follows_a_low_precision_model(tiny):
    unet, _ = tiny
    assert runtime.resolve(model=unet).precision == "fp32"
    assert runtime.resolve(model=copy.deepcopy(unet).to(torch.bfloat16)).precision == "bf16"
    assert runtime.resolve(model=copy.deepcopy(unet).to(torch.float16)).precision == "fp16"
    assert runtime.resolve(model=unet).tf32 is False  # TF32 defaults on only for CUDA models


def test_gradient_checkpointing_turns_on_and_gives_the_same_result(siss_args, spy_training):
    unet, kw = siss_args
    plain = fu.erase(unet, **kw)
    assert not any(spy_training["checkpointing"])
    ckpt = fu.erase(unet, gradient_checkpointing=True, **kw)
    assert spy_training["checkpointing"] and all(spy_training["checkpointing"])
    assert all(f is runtime.checkpoint_in_role for f in spy_training["ckpt_func"])
    assert ckpt.meta["runtime"]["gradient_checkpointing"] is True
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_recomputes_each_lora_role_as_it_was_in_the_forward():
    """SFD-style roles on one base: the fake-score adapter and the teacher (adapters off) run forward,
    the generator's adapter is active again when the backward recomputes the blocks. Plain diffusers
    checkpointing recomputes with the wrong adapter (metadata error here); checkpoint_in_role gives the
    gradients of the run without checkpointing exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fastunlearn.lora import add_lora
    from fastunlearn.text import tiny_text_pipeline

    unet = tiny_text_pipeline().unet
    add_lora(unet, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_lora(unet, 4, adapter_name="fake")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at 0; give both adapters an effect

    def role(m, r):
        for layer in m.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(r != "teacher")
                if r != "teacher":
                    layer.set_adapter(r)
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)

    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    t, c = torch.tensor([10, 500]), torch.randn(2, 16, 32)

    def grads(m):
        role(m, "fake")
        m.train(True)
        y_fake = m(x, t, encoder_hidden_states=c).sample
        role(m, "teacher")
        m.eval()
        y_teacher = m(x, t, encoder_hidden_states=c).sample
        role(m, "default")
        loss = (y_fake ** 2).sum() + (y_teacher * y_fake.detach()).sum()
        params = [x] + [p for n, p in m.named_parameters() if "lora_" in n]
        return [torch.zeros(()) if g is None else g for g in torch.autograd.grad(loss, params, allow_unused=True)]

    ref = grads(copy.deepcopy(unet))
    ours = copy.deepcopy(unet)
    runtime.enable_checkpointing(ours)
    for a, b in zip(ref, grads(ours)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = copy.deepcopy(unet)
    plain.enable_gradient_checkpointing()
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grads(plain)


@pytest.mark.skipif(runtime.xformers_available(), reason="xformers is installed here")
def test_xformers_without_xformers_is_a_clear_error_before_any_work(siss_args, spy_training):
    unet, kw = siss_args
    with pytest.raises(InvalidArgumentError, match=r"^attention: .*xformers is not installed"):
        fu.erase(unet, attention="xformers", **kw)
    assert not spy_training  # no training started


def test_sdpa_attention_sets_torch_sdpa_processors():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from fastunlearn.text import tiny_text_pipeline

    unet = tiny_text_pipeline().unet
    unet.set_attn_processor(AttnProcessor())
    runtime.set_attention(unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_adamw8bit_trains_with_8bit_state_on_cpu(siss_args, spy_training):
    unet, kw = siss_args
    res = fu.erase(unet, optimizer="adamw8bit", **{**kw, "steps": 3})
    opt = spy_training["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    states = [s for s in opt.state.values() if s]
    big = [s for s in states if s["state1"].numel() >= 4096]  # bitsandbytes quantizes tensors of >= 4096 entries
    assert big and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    assert res.meta["optimizer"] == "adamw8bit" and not any(h["skipped"] for h in res.history)
    assert any(not torch.equal(a, b) for a, b in zip(res.model.parameters(), unet.parameters()))


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    from fastunlearn.trainer import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(InvalidArgumentError, match=r"^optimizer: .*bitsandbytes is not installed"):
        make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3)


def test_tf32_is_set_for_the_run_and_restored(siss_args, spy_training):
    unet, kw = siss_args
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        res = fu.erase(unet, tf32=True, **kw)
        assert spy_training["tf32"] is True
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the run
        assert res.meta["runtime"]["tf32"] is True
        fu.erase(unet, tf32=False, **kw)
        assert spy_training["tf32"] is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("kwargs, arg", [
    (dict(precision="fp8"), "precision"),
    (dict(attention="flash"), "attention"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing"),
    (dict(tf32=1), "tf32"),
    (dict(compile="always"), "compile"),
])
def test_bad_switches_name_the_argument(kwargs, arg):
    with pytest.raises(fu.errors.FastUnlearnError, match=rf"^{arg}: expected"):
        runtime.resolve(**kwargs)


def test_compile_regions_picks_the_repeated_blocks():
    from fastunlearn.text import tiny_text_pipeline

    unet = tiny_text_pipeline().unet
    # diffusers lists the transformer blocks as UNet2DConditionModel's repeated blocks
    n_blocks = sum(type(m).__name__ in unet._repeated_blocks for m in unet.modules())
    assert n_blocks > 0
    assert runtime.compile_regions(unet) == n_blocks
