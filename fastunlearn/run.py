"""The state one unlearning run shares between ``erase()``, the method and the training loop."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .conditioning import cond_to as _to, take_cond as _index_cond
from .lora import add_lora, shared_base_copy
from .models import Denoiser


@dataclass
class Batch:
    """Clean samples and their conditioning (class ids, prompt embeddings or None)."""

    x0: torch.Tensor
    cond: Any = None


class Run:
    """Holds the student denoiser (a copy of the user's model), the scheduler's γ_t/σ_t, the forget and
    retain data as tensors, and the per-run settings. Methods draw batches through it so that every
    random choice comes from the per-step generator (exact resume)."""

    def __init__(self, model: torch.nn.Module, scheduler, *, forget, retain, forget_target, retain_target,
                 batch_size: int, seed: int, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                 lora_targets=None, trainable=None, share_input: bool = True, encode_prompts=None, device=None,
                 progress: bool = False,
                 latent: bool = False, sdxl: bool = False, pipeline_guidance: Optional[float] = None):
        self.original = model
        # The user's model is never modified. With LoRA its weights are not copied either: the base stays frozen,
        # so the run's model shares the caller's tensors (host memory holds one UNet, not two). ``share_input=False``
        # (the planner) copies them, as the model is on an accelerator: a copy of the offloaded input.
        share = lora_rank is not None and share_input
        self.model = shared_base_copy(model) if share else copy.deepcopy(model)
        if device is not None:  # the user's model was moved off the accelerator first (runtime.InputOffload)
            self.model.to(device)
        self.model.train()
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.seed = seed
        self.forget_target = forget_target
        self.retain_target = retain_target
        self.encode_prompts = encode_prompts
        self.lora_rank = lora_rank
        self.progress = progress  # show the progress of what a method generates (erase(progress=...))
        # What methods size their generated data by: a latent pipeline (a VAE: SD / SDXL) or pixel space, SDXL,
        # and the guidance scale the pipeline's __call__ uses by default (None for a bare UNet).
        self.latent, self.sdxl, self.pipeline_guidance = bool(latent), bool(sdxl), pipeline_guidance
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        ac = scheduler.alphas_cumprod.double()
        self._gamma = ac.sqrt().float()
        self._sigma = (1.0 - ac).sqrt().float()
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.forget = forget  # (x0 [N, ...] or None, cond or None)
        self.retain = retain
        if lora_rank is not None:
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # adapters start from `seed`, not the caller's RNG state
                torch.manual_seed(seed)
                add_lora(self.model, lora_rank, lora_alpha, lora_targets)
        else:
            self.model.requires_grad_(False)
            for name, param in self.model.named_parameters():
                if trainable is None or trainable(name):
                    param.requires_grad_(True)
        self.denoiser = Denoiser(self.model)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ schedule
    def gamma_sigma(self, t: torch.Tensor):
        return self._gamma[t.cpu()], self._sigma[t.cpu()]

    @staticmethod
    def bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    # ------------------------------------------------------------------ data
    def _take(self, data, idx) -> Batch:
        x0, cond = data
        cond = _index_cond(cond, idx)
        if isinstance(cond, list):  # a text model's prompts, one per image: encoded (and cached) per batch
            cond = self.encode_prompts(cond)
        return Batch(x0[idx], cond)

    def forget_batch(self, gen: torch.Generator, n: int) -> Batch:
        x0 = self.forget[0]
        return self._take(self.forget, torch.randint(0, x0.shape[0], (n,), generator=gen))

    def retain_batch(self, gen: torch.Generator, n: int) -> Batch:
        x0 = self.retain[0]
        return self._take(self.retain, torch.randint(0, x0.shape[0], (n,), generator=gen))

    def to_device(self, *items):
        out = []
        for it in items:
            if isinstance(it, Batch):
                out.append(Batch(it.x0.to(self.device), _to(it.cond, self.device)))
            else:
                out.append(_to(it, self.device))
        return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """Every random draw of step ``step`` comes from this generator: resuming at any step replays the
    same data order, timesteps and noise without saving sampler state."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
