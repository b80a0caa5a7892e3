"""The paged KV pool the model writes through (a ``livethinking.model.AttendingKVCache``).

Pool tensors (layers, blocks + 1, block_size, kv_heads, head_dim); the extra last block is
a write-only trash slot for padding tokens, so writes need no boolean indexing (no host
sync) and a padded decode batch can be captured in a CUDA graph.

Before each forward the runner calls :meth:`PagedKVCache.set_batch` with, per row, the
slots its new tokens go to and its block table; :meth:`update` scatters a layer's new k/v
into the pool, gathers each row's keys in position order through its block table and
returns them with the mask "key position <= query position and < context length".
:meth:`attend` does the attention too. Decode (one token per row) reads K/V straight from
the pool up to each row's own context length, no gather, through
``livethinking.ops.paged_decode_attention``: its Triton kernel on CUDA (the cost under CUDA
graphs follows the real context, not the padded block table), its C++ op on CPU (~4× the
gather + SDPA at 64 rows × 80 tokens). ``decode_kernel``: None (default) that; True the
Triton kernel on any device (on CPU under the Triton interpreter); False the gather of
:meth:`update` and a masked SDPA. Prefill and chunks with a cached prefix always take the
gather + SDPA, its mask built once per batch and shared by the layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livethinking.model.kv_cache import AttendingKVCache
from livethinking.ops import paged_decode_attention

__all__ = ["PagedBatch", "PagedKVCache"]


@dataclass(slots=True)
class PagedBatch:
    slot_mapping: torch.Tensor  # (B, T) long: pool slot of each new token; trash for padding
    block_tables: torch.Tensor  # (B, max_blocks) long; padding entries may be any block
    context_lens: torch.Tensor  # (B,) long: tokens with KV after this step
    positions: torch.Tensor  # (B, T) long
    mask: torch.Tensor | None = None  # (B, 1, T, max_blocks · block_size) bool, on first use
    fresh: bool = False  # every row starts at position 0 with no padding: plain causal


class PagedKVCache(AttendingKVCache):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str,
                 decode_kernel: bool | None = None) -> None:
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.trash_slot = num_blocks * block_size
        # decode attention in place: None the op's default (Triton on CUDA, C++ on CPU),
        # True the Triton kernel (under the interpreter on CPU), False gather + SDPA
        self.decode_kernel = decode_kernel
        self.batch: PagedBatch | None = None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def set_batch(self, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                  fresh: bool = False) -> None:
        """positions, slot_mapping (B, T) long; block_tables (B, max_blocks) long;
        context_lens (B,) long = tokens with KV after this step. ``fresh``: the caller
        knows every row is a whole prompt from position 0 without padding, so attention is
        plain causal over the new keys (no gather, no mask: the fast SDPA kernels)."""
        self.batch = PagedBatch(slot_mapping, block_tables, context_lens, positions, fresh=fresh)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's KV in every layer (forking a partly filled block)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> PagedBatch:
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
        return batch

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, kv_heads, T, D) -> keys/values (B, kv_heads, S, D) and mask (B, 1, T, S)."""
        batch = self._write(layer_idx, k, v, positions)
        heads, dim = k.shape[1], k.shape[3]
        rows = batch.block_tables.shape[0]
        k_all = self.k[layer_idx][batch.block_tables].view(rows, -1, heads, dim).transpose(1, 2)
        v_all = self.v[layer_idx][batch.block_tables].view(rows, -1, heads, dim).transpose(1, 2)
        if batch.mask is None:  # key position <= query position, < context length
            key_pos = torch.arange(batch.block_tables.shape[1] * self.block_size,
                                   device=positions.device)
            batch.mask = ((key_pos[None, None, :] <= batch.positions[:, :, None])
                          & (key_pos[None, None, :] < batch.context_lens[:, None, None]))[:, None]
        return k_all, v_all, batch.mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, kv_heads, T, D) and attend q (B, heads, T, D) -> (B, heads, T, D)."""
        if self.batch is not None and self.batch.fresh:
            self._write(layer_idx, k, v, positions)
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        if self.decode_kernel is not False and q.shape[2] == 1:  # query at context − 1
            batch = self._write(layer_idx, k, v, positions)
            out = paged_decode_attention(q[:, :, 0], self.k[layer_idx], self.v[layer_idx],
                                         batch.block_tables, batch.context_lens,
                                         use_kernel=self.decode_kernel)
            return out[:, :, None]
        k_all, v_all, mask = self.update(layer_idx, k, v, positions)
        return F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype),
                                              attn_mask=mask,
                                              enable_gqa=k_all.shape[1] != q.shape[1])
