"""Continuous batching with chunked prefill and recompute preemption.

Each step is either a prefill step or a decode step:
- prefill (preferred while sequences wait, for time to first token): waiting sequences in
  arrival order get blocks (prefix-cache hits count as computed) and a chunk of their
  uncomputed tokens, until ``max_num_batched_tokens`` is spent or ``max_num_seqs`` run;
  a long prompt is spread over several steps;
- decode: every running sequence computes its one new token. If the pool runs dry, the
  most recently admitted running sequence is preempted: its blocks are freed and it waits
  again, to be recomputed (mostly from the prefix cache) later.
"""

from __future__ import annotations

from collections import deque

from livethinking.engine.block_manager import BlockManager
from livethinking.engine.config import EngineConfig
from livethinking.engine.model_runner import Chunk
from livethinking.engine.sequence import Sequence, SequenceStatus

__all__ = ["Scheduler"]


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)

    @property
    def num_active(self) -> int:
        """Sequences holding blocks (running, or waiting part-way through prefill)."""
        return len(self.running) + sum(1 for s in self.waiting if s.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        chunks = self._schedule_prefill()
        return chunks if chunks else self._schedule_decode()

    def _schedule_prefill(self) -> list[Chunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        active = self.num_active
        for seq in list(self.waiting):
            if budget <= 0:
                break
            extra = seq.params.n - 1 if seq.needs_fork else 0  # blocks the fork will copy
            if not seq.block_table:
                if active + 1 + extra > self.config.max_num_seqs:
                    break
                if not self.blocks.can_allocate(seq, extra_blocks=extra):
                    break
                self.blocks.allocate(seq)
                active += 1 + extra
            n = min(seq.num_uncomputed, budget)
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks

    def _schedule_decode(self) -> list[Chunk]:
        scheduled: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.append_slot(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return [Chunk(seq, 1) for seq in scheduled]

    def retract_all(self) -> int:
        """Free the KV blocks of every sequence holding some (running ones and those part-
        way through prefill); they wait again, first, to be recomputed. Returns how many."""
        holding = list(self.running) + [s for s in self.waiting if s.block_table]
        for seq in reversed(self.running):
            self._preempt(seq)
        for seq in self.waiting:
            if seq.block_table:
                self.blocks.free_blocks(seq)
                seq.num_computed = 0
        return len(holding)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def after_step(self, chunks: list[Chunk]) -> None:
        """Account the computed tokens; sequences fully computed start decoding."""
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            self.blocks.register_computed(seq)
            if seq.status is SequenceStatus.WAITING and seq.num_computed == len(seq):
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
