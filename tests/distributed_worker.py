"""Launched by tests/test_distributed.py under ``accelerate launch`` (two processes): each process's input model
differs from process 0's in a frozen layer; erase() with LoRA must start every process from process 0's weights and
leave each process's own input model as it was. Exit status 0 when both hold."""
import sys

import torch

import fastunlearn as fu


def main():
    rank = int(__import__("os").environ.get("RANK", "0"))
    unet, sched = fu.zoo.digits()
    with torch.no_grad():  # conv_in has no adapter (LoRA targets the ResNet convolutions): a frozen, shared tensor
        unet.conv_in.weight.add_(0.01 * rank)
    before = {n: t.clone() for n, t in unet.state_dict().items()}
    res = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=sched, steps=1, batch_size=2, lora_rank=2,
                   progress=False)
    untouched = all(torch.equal(before[n], t) for n, t in unet.state_dict().items())
    base = dict(res.model.named_parameters())["conv_in.weight"]
    from_zero = torch.allclose(base, before["conv_in.weight"] - 0.01 * rank)  # process 0's value
    print(f"rank {rank}: input untouched {untouched}, base from process 0 {from_zero}, "
          f"drift {res.meta.get('process_weight_drift')}", flush=True)
    sys.exit(0 if untouched and from_zero and res.meta.get("process_weight_drift") == 0.0 else 1)


if __name__ == "__main__":
    main()
