"""AdamW on fp32 master weights with warmup + cosine, writing back into the model in place.

For fp32 parameters the master *is* the parameter. For bf16/fp16 parameters a fp32 copy
takes the optimizer step and the model's tensor is overwritten in place (``copy_`` under
no_grad bumps its version), so an inference engine sharing the tensors sees the update.

lr(s) = lr · (s + 1) / warmup for s < warmup, then
lr · (m + (1 − m) · ½(1 + cos(π · p))), p = (s − warmup) / max(1, total − warmup), m = min_lr_ratio.

Adam's moments exist from construction (zeros, exactly what AdamW creates at its first
step), so their memory is allocated before anything is sized after it (the engine's KV
pool) and a checkpoint loads into them in place. Checkpoints: `save_sharded` writes the
masters, moments and step counts with ``torch.distributed.checkpoint`` — under FSDP2 each
rank writes its own shards and no rank ever holds the whole fp32 state — and `load_sharded`
reads them back into any sharding (a different number of ranks, or one process), keyed by
parameter name.
"""

from __future__ import annotations

import contextlib
import math
import warnings

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
    """``params``: parameters, or (name, parameter) pairs (``model.named_parameters()``);
    the names key the sharded checkpoint (unnamed: ``param.i``)."""

    def __init__(self, params, config: OptimConfig, total_steps: int) -> None:
        items = list(params)
        named = items if items and isinstance(items[0], tuple) else \
            [(f"param.{i}", p) for i, p in enumerate(items)]
        named = [(name, p) for name, p in named if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone()
                       for p in self.params]
        self.config = config
        self.optimizer = torch.optim.AdamW(self.master, lr=config.lr, betas=tuple(config.betas),
                                           eps=config.eps, weight_decay=config.weight_decay,
                                           foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config, total_steps))
        for m in self.master:  # the moments AdamW would create lazily at its first step
            state = self.optimizer.state[m]
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)

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

    # ------------------------------------------------------------------ sharded checkpoints
    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {master, exp_avg, exp_avg_sq, step}}: the live tensors (FSDP2
        shards stay DTensor shards), what ``torch.distributed.checkpoint`` saves and loads
        into in place."""
        out = {}
        for name, m in zip(self.names, self.master):
            state = self.optimizer.state[m]
            out[name] = {"master": m.detach(), "exp_avg": state["exp_avg"],
                         "exp_avg_sq": state["exp_avg_sq"], "step": state["step"]}
        return out

    def save_sharded(self, path, *, distributed: bool) -> dict:
        """Write masters, moments and step counts under ``path`` with
        ``torch.distributed.checkpoint`` (``distributed``: a collective, every rank writes
        its shards into the same folder; else one process writes everything). Returns the
        small rest (schedule, lr, names) for the trainer state file."""
        import torch.distributed.checkpoint as dcp

        with _single_process_quietly():
            dcp.save(self._tensors(), checkpoint_id=str(path), no_dist=not distributed)
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self.optimizer.param_groups]
        return {"format": "dcp", "names": list(self.names), "param_groups": groups,
                "scheduler": self.scheduler.state_dict()}

    @torch.no_grad()
    def load_sharded(self, path, meta: dict, *, distributed: bool) -> None:
        """Read what `save_sharded` wrote into this optimizer's tensors, resharded to this
        run's layout (any number of ranks; a collective when ``distributed``), and copy
        the masters into low-precision parameters. ``meta``: its return value."""
        import torch.distributed.checkpoint as dcp

        if list(meta["names"]) != self.names:
            missing = sorted(set(self.names) - set(meta["names"]))
            extra = sorted(set(meta["names"]) - set(self.names))
            raise ValueError(f"the checkpoint's optimizer state does not match this model's "
                             f"parameters (missing: {missing[:5]}, unexpected: {extra[:5]})")
        with _single_process_quietly():
            dcp.load(self._tensors(), checkpoint_id=str(path), no_dist=not distributed)
        for group, saved in zip(self.optimizer.param_groups, meta["param_groups"]):
            group.update(saved)
        self.scheduler.load_state_dict(meta["scheduler"])
        for p, m in zip(self.params, self.master):
            if m is not p:
                p.copy_(m)

    # ------------------------------------------------------------------ gathered state
    def state_dict(self) -> dict:
        """Optimizer, schedule and low-precision masters in one dict (the format of
        checkpoints before `save_sharded`). Under FSDP2 every sharded tensor is gathered to
        a full CPU tensor (a collective: every rank must call this)."""
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


@contextlib.contextmanager
def _single_process_quietly():
    """torch.distributed.checkpoint warns that it assumes a single process even when told
    so (``no_dist=True``); that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
