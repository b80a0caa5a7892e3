"""AdamW on fp32 master weights with warmup + cosine, writing back into the model in place.

For fp32 parameters the master *is* the parameter. For bf16/fp16 parameters a fp32 copy
takes the optimizer step and the model's tensor is overwritten in place (``copy_`` under
no_grad bumps its version), so an inference engine sharing the tensors sees the update.

lr(s) = lr · (s + 1) / warmup for s < warmup, then
lr · (m + (1 − m) · ½(1 + cos(π · p))), p = (s − warmup) / max(1, total − warmup), m = min_lr_ratio.
"""

from __future__ import annotations

import math

import torch

from livethinking.train.config import OptimConfig

__all__ = ["MasterWeightAdamW", "lr_factor"]


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """The multiplier of ``config.lr`` at optimizer step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    m = config.min_lr_ratio
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


class MasterWeightAdamW:
    def __init__(self, params, config: OptimConfig, total_steps: int) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone()
                       for p in self.params]
        self.config = config
        self.optimizer = torch.optim.AdamW(self.master, lr=config.lr, betas=tuple(config.betas),
                                           eps=config.eps, weight_decay=config.weight_decay,
                                           foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config, total_steps))

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.master):
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Clip (global L2 norm), step, write back; returns grad_norm and the lr used."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        grads = [m.grad for m in self.master if m.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: DTensor grads give a DTensor norm
            norm = norm.full_tensor()
        if self.config.grad_clip > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(grads, self.config.grad_clip, norm, foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        for p, m in zip(self.params, self.master):
            if m is not p:
                p.copy_(m)
        self.zero_grad()
        return {"grad_norm": float(norm), "lr": lr}

    def state_dict(self) -> dict:
        """Optimizer, schedule and low-precision masters. Under FSDP2 every sharded tensor is
        gathered to a full CPU tensor (a collective: every rank must call this)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "master": [m if m is not p else None for p, m in zip(self.params, self.master)]}
        return _gathered(state)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` wrote; full tensors are re-sharded like their
        parameters when the parameters are FSDP2 shards."""
        optimizer_state = state["optimizer"]
        for index, values in optimizer_state["state"].items():
            master = self.master[int(index)]
            for key, value in list(values.items()):
                values[key] = _like(value, master)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        for p, m, saved in zip(self.params, self.master, state["master"]):
            if saved is not None:
                m.copy_(_like(saved, m))
                p.copy_(m)


def _gathered(value):
    if hasattr(value, "full_tensor"):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {k: _gathered(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_gathered(v) for v in value]
    return value


def _like(value, param):
    """A full tensor shaped like ``param`` becomes a shard placed like it (FSDP2 DTensors)."""
    if not hasattr(param, "placements") or not isinstance(value, torch.Tensor) \
            or tuple(value.shape) != tuple(param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
