"""Paged KV-cache bookkeeping: free blocks, reference counts and the prefix cache.

Every ``block_size`` tokens of a sequence live in one block of the pool. A block whose
tokens are all computed is registered under a chained hash
``h_i = hash((h_{i-1}, tokens of block i))``, so a later sequence with the same leading
tokens (a product document shared by many viewers' questions) reuses its KV instead of
prefilling it again. Freed blocks keep their hash until they are reused (least recently
freed first), so a finished request's prefix stays cached while memory allows.
"""

from __future__ import annotations

from collections import OrderedDict

from livethinking.engine.sequence import Sequence

__all__ = ["BlockManager"]


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """The chained hash of one full block (Python's tuple hash of ints is deterministic)."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free = OrderedDict((b, None) for b in range(num_blocks))  # oldest-freed first
        self.hash_of_block: dict[int, int] = {}
        self.block_of_hash: dict[int, int] = {}
        self.tokens_of_block: dict[int, tuple[int, ...]] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _take_fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of_block.pop(block, None)
        if old is not None and self.block_of_hash.get(old) == block:
            del self.block_of_hash[old]
            self.tokens_of_block.pop(block, None)
        self.ref_counts[block] = 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, hash) of the leading full blocks found in the cache; never the block
        holding the last token, which must be computed to give logits."""
        if not self.enable_prefix_caching:
            return []
        found, parent = [], None
        bs = self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = block_hash(parent, tokens)
            block = self.block_of_hash.get(h)
            if block is None or self.tokens_of_block.get(block) != tuple(tokens):
                break
            found.append((block, h))
            parent = h
        return found

    def can_allocate(self, seq: Sequence, extra_blocks: int = 0) -> bool:
        cached = self._cached_prefix(seq)
        revived = sum(1 for b, _ in cached if self.ref_counts[b] == 0)
        fresh = self.blocks_needed(len(seq)) - len(cached)
        return fresh + revived + extra_blocks <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of ``seq``'s tokens; leading cached blocks are shared and count
        as computed (``seq.num_computed`` / ``num_cached_tokens`` set accordingly)."""
        assert not seq.block_table, "sequence already holds blocks"
        cached = self._cached_prefix(seq)
        for block, _ in cached:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = [b for b, _ in cached]
        seq.block_table += [self._take_fresh() for _ in
                            range(self.blocks_needed(len(seq)) - len(cached))]
        seq.num_hashed_blocks = len(cached)
        seq.last_block_hash = cached[-1][1] if cached else None
        seq.num_computed = seq.num_cached_tokens = len(cached) * self.block_size
        self.queried_tokens += len(seq)
        self.hit_tokens += seq.num_computed

    def append_slot(self, seq: Sequence) -> bool:
        """Make room for one more token's KV; False if no block is free."""
        if len(seq) <= len(seq.block_table) * self.block_size:
            return True
        if not self.free:
            return False
        seq.block_table.append(self._take_fresh())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> int | None:
        """Share ``parent``'s blocks with ``child`` (same tokens). Full blocks are shared;
        a partly filled last block is copied: returns that new block (the caller copies
        its KV) or None."""
        bs = self.block_size
        full = parent.num_computed // bs
        for block in parent.block_table[:full]:
            self.ref_counts[block] += 1
        child.block_table = parent.block_table[:full]
        child.num_computed = parent.num_computed
        child.num_hashed_blocks = parent.num_hashed_blocks  # only computed blocks are hashed
        child.last_block_hash = parent.last_block_hash
        copied = None
        if len(parent.block_table) > full:
            copied = self._take_fresh()
            child.block_table.append(copied)
        return copied

    def free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the tail is evicted first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    # ------------------------------------------------------------------ prefix cache
    def register_computed(self, seq: Sequence) -> None:
        """Hash and register ``seq``'s blocks that are now fully computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while seq.num_hashed_blocks < seq.num_computed // bs:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(seq.last_block_hash, list(tokens))
            block = seq.block_table[i]
            if h not in self.block_of_hash and block not in self.hash_of_block:
                self.block_of_hash[h] = block
                self.hash_of_block[block] = h
                self.tokens_of_block[block] = tokens
            seq.num_hashed_blocks += 1
            seq.last_block_hash = h

    def reset_prefix_cache(self) -> None:
        """Forget every hash (after a weight update the cached KV is stale)."""
        self.hash_of_block.clear()
        self.block_of_hash.clear()
        self.tokens_of_block.clear()
