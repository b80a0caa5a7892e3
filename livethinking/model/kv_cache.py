"""The model's contract with KV caches, and a contiguous reference cache.

The model never schedules: the caller owns the cache and picks the positions. Two kinds:
- :class:`KVCache` (a protocol): the model hands each layer's new keys/values to
  :meth:`KVCache.update` and attends over what comes back (:class:`StaticKVCache`);
- :class:`AttendingKVCache` (a base class to derive from, so the choice is explicit): the
  cache also does the attention, :meth:`AttendingKVCache.attend` taking q, k, v and
  returning the output (the engine's paged cache, whose decode reads straight from the
  pool). The model asks ``isinstance(cache, AttendingKVCache)``, never probes attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch

__all__ = ["AttendingKVCache", "KVCache", "StaticKVCache"]


@runtime_checkable
class KVCache(Protocol):
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new k, v (B, kv_heads, T, D) of ``layer_idx`` at ``positions`` (B, T).

        Returns ``(k_all, v_all, mask)``: the keys/values to attend over, (B, kv_heads, S, D),
        and a mask broadcastable to (B, heads, T, S), boolean (True = may attend) or
        additive float; ``None`` means every query may see every returned key.
        """
        ...


class AttendingKVCache(ABC):
    """A KV cache that attends itself. Subclasses implement both methods: ``update`` (the
    :class:`KVCache` protocol, for callers that want the keys) and ``attend``, which the
    model calls instead of ``update`` + SDPA."""

    @abstractmethod
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`KVCache.update`."""

    @abstractmethod
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, kv_heads, T, D) of ``layer_idx`` at ``positions`` (B, T) and
        return causal attention of q (B, heads, T, D) over everything the rows hold up to
        each query's position: (B, heads, T, D) in q's dtype."""


class StaticKVCache:
    """Contiguous buffers (layers, B, kv_heads, max_len, D); slot index = position.

    Each row's positions must be < ``max_len``. Query at position p sees the keys at
    positions <= p of its row, so a row must have written every position before p
    (prefill, then one token at a time, or any contiguous chunks). :meth:`reset`
    forgets everything.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, *, dtype=torch.float32,
                  device=None) -> StaticKVCache:
        """A cache sized for a :class:`~livethinking.model.config.ModelConfig`."""
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads,
                   config.head_dim, max_len, dtype=dtype, device=device)

    def reset(self) -> None:
        self.length.zero_()

    def update(self, layer_idx, k, v, positions):
        batch, _, steps, _ = k.shape
        if positions.shape != (batch, steps):
            raise ValueError(f"positions must be (B, T) = {(batch, steps)}, got "
                             f"{tuple(positions.shape)}")
        if batch != self.k.shape[1]:
            raise ValueError(f"batch {batch} != the cache's batch size {self.k.shape[1]}")
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len})")
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer_idx].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer_idx].scatter_(2, index, v.to(self.v.dtype))
        if layer_idx == 0:
            self.length = torch.maximum(self.length, positions.max(dim=1).values + 1)
        span = int(positions.max()) + 1
        key_pos = torch.arange(span, device=positions.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)
        return self.k[layer_idx, :, :, :span], self.v[layer_idx, :, :, :span], mask
