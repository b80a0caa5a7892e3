"""The paged KV pool the model writes through (implements ``livethinking.model.KVCache``).

Pool tensors (layers, blocks + 1, block_size, kv_heads, head_dim); the extra last block is
a write-only trash slot for padding tokens, so writes need no boolean indexing (no host
sync) and a padded decode batch can be captured in a CUDA graph.

Before each forward the runner calls :meth:`PagedKVCache.set_batch` with, per row, the
slots its new tokens go to and its block table; :meth:`update` scatters a layer's new k/v
into the pool, gathers each row's keys in position order through its block table and
returns them with the mask "key position <= query position and < context length".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PagedBatch", "PagedKVCache"]


@dataclass(slots=True)
class PagedBatch:
    slot_mapping: torch.Tensor  # (B, T) long: pool slot of each new token; trash for padding
    block_tables: torch.Tensor  # (B, max_blocks) long; padding entries may be any block
    mask: torch.Tensor  # (B, 1, T, max_blocks · block_size) bool


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.trash_slot = num_blocks * block_size
        self.batch: PagedBatch | None = None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def set_batch(self, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        """positions, slot_mapping (B, T) long; block_tables (B, max_blocks) long;
        context_lens (B,) long = tokens with KV after this step. Pure tensor ops (capturable)."""
        key_pos = torch.arange(block_tables.shape[1] * self.block_size, device=positions.device)
        mask = ((key_pos[None, None, :] <= positions[:, :, None])
                & (key_pos[None, None, :] < context_lens[:, None, None]))[:, None]
        self.batch = PagedBatch(slot_mapping, block_tables, mask)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's KV in every layer (forking a partly filled block)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, kv_heads, T, D) -> keys/values (B, kv_heads, S, D) and mask (B, 1, T, S)."""
        batch = self.batch
        if batch is None or batch.slot_mapping.shape != positions.shape:
            raise RuntimeError("PagedKVCache.set_batch must describe this batch before the "
                               "forward (slot_mapping shape must equal positions' (B, T))")
        heads, dim = k.shape[1], k.shape[3]
        slots = batch.slot_mapping.reshape(-1)
        k_pool = self.k[layer_idx].view(-1, heads, dim)  # (slots, kv_heads, D)
        v_pool = self.v[layer_idx].view(-1, heads, dim)
        k_pool.index_copy_(0, slots, k.transpose(1, 2).reshape(-1, heads, dim).to(k_pool.dtype))
        v_pool.index_copy_(0, slots, v.transpose(1, 2).reshape(-1, heads, dim).to(v_pool.dtype))
        rows = batch.block_tables.shape[0]
        k_all = self.k[layer_idx][batch.block_tables].view(rows, -1, heads, dim).transpose(1, 2)
        v_all = self.v[layer_idx][batch.block_tables].view(rows, -1, heads, dim).transpose(1, 2)
        return k_all, v_all, batch.mask
