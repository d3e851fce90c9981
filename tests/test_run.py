"""The run's shared state (fastunlearn.run): a copy of the caller's model, γ_t/σ_t of its scheduler, batches drawn
only from the step's generator, and the trainable set the run was asked for."""
import torch

from fastunlearn.lora import merge_in_place
from fastunlearn.run import Run, step_generator


def _run(tiny, digits_split, **kw):
    unet, sched = tiny
    forget, retain = digits_split
    return Run(unet, sched, forget=(forget.images, forget.labels), retain=(retain.images, retain.labels),
               forget_target=forget, retain_target=retain, batch_size=4, seed=0, **kw)


def test_the_run_trains_a_copy_and_reads_the_schedule(tiny, digits_split):
    run = _run(tiny, digits_split)
    assert run.model is not tiny[0] and all(p.requires_grad for p in run.model.parameters())
    for p in run.trainable_parameters():
        p.data.add_(1.0)
    assert not any(torch.equal(a, b) for a, b in zip(run.model.parameters(), tiny[0].parameters()))
    t = torch.tensor([0, 500, 999])
    g, s = run.gamma_sigma(t)
    torch.testing.assert_close(g ** 2 + s ** 2, torch.ones(3))
    torch.testing.assert_close(g ** 2, tiny[1].alphas_cumprod[t].float())


def test_batches_come_from_the_step_generator_alone(tiny, digits_split):
    run = _run(tiny, digits_split)
    torch.manual_seed(1)
    a = run.forget_batch(step_generator(0, 7), 4)
    torch.manual_seed(2)  # the global random state plays no part
    b = run.forget_batch(step_generator(0, 7), 4)
    c = run.forget_batch(step_generator(0, 8), 4)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.cond, b.cond)
    assert not torch.equal(a.x0, c.x0)
    assert (a.cond == 3).all() and (run.retain_batch(step_generator(0, 7), 16).cond != 3).all()


def test_trainable_subset_and_lora(tiny, digits_split):
    run = _run(tiny, digits_split, trainable=lambda name: name.startswith("class_embedding"))
    assert [n for n in run.named_trainable()] == ["class_embedding.weight"]
    lora = _run(tiny, digits_split, lora_rank=2)
    assert lora.named_trainable() and all("lora_" in n for n in lora.named_trainable())
    again = _run(tiny, digits_split, lora_rank=2)  # adapters start from the run's seed
    assert all(torch.equal(a, b) for a, b in zip(lora.trainable_parameters(), again.trainable_parameters()))
    assert not any("lora_" in n for n, _ in tiny[0].named_parameters())  # the caller's model has none


def test_a_lora_run_shares_the_callers_weights_and_never_writes_them(tiny, digits_split):
    unet = tiny[0]
    flags = [p.requires_grad for p in unet.parameters()]
    before = [p.detach().clone() for p in unet.parameters()]
    run = _run(tiny, digits_split, lora_rank=2)
    ptrs = {p.data_ptr() for p in unet.parameters()}
    base = [p for n, p in run.model.named_parameters() if "lora_" not in n]
    assert base and all(p.data_ptr() in ptrs for p in base)  # one copy of the weights in memory, not two
    assert [p.requires_grad for p in unet.parameters()] == flags  # the copy's flags are its own
    for p in run.trainable_parameters():  # a non-zero adapter (peft starts lora_B at 0)
        p.data.fill_(0.05)
    merged = merge_in_place(run.model)  # a merge writes each layer's new weight into a fresh tensor
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), before))
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), before))
