"""Runs the model on a scheduled batch: builds the paged-attention inputs, replays CUDA
graphs for decode, and samples.

A batch is a list of :class:`Chunk` s, each computing ``seq.token_ids[start:start + n]``
with ``start = seq.num_computed``; rows are padded to the longest chunk (padding writes go
to the pool's trash slot). Only rows whose chunk reaches the end of their sequence get
logits, and only at their last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livethinking import ops
from livethinking.engine.config import EngineConfig
from livethinking.engine.paged_cache import PagedKVCache
from livethinking.engine.sampler import SamplingBatch, sample
from livethinking.engine.sampling_params import SamplingParams
from livethinking.engine.sequence import Sequence

__all__ = ["Chunk", "Draw", "ModelRunner"]


@dataclass(slots=True)
class Chunk:
    seq: Sequence
    num_tokens: int  # computes token_ids[seq.num_computed : seq.num_computed + num_tokens]

    @property
    def completes(self) -> bool:
        return self.seq.num_computed + self.num_tokens == len(self.seq)


@dataclass(slots=True)
class Draw:
    """One token to draw from the logits of chunk ``row``."""

    row: int
    params: SamplingParams
    key: int | None  # the seeded sample's noise key (None: the engine's generator)
    counter: int  # tokens the sample drew before this one


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int) -> None:
        self.model = model
        self.config = config
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        mc = model.config
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        per_block = PagedKVCache.bytes_per_block(mc.num_hidden_layers, self.block_size,
                                                 mc.num_key_value_heads, mc.head_dim, self.dtype)
        self.per_block = per_block
        self.cache: PagedKVCache | None = None
        self.routes: torch.Tensor | None = None
        self.allocate(config.num_kv_blocks or self._auto_num_blocks(per_block))
        self.shared_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_blocks = 0
        self.static: dict[str, torch.Tensor] = {}

    def allocate(self, num_blocks: int) -> None:
        """The paged KV pool of ``num_blocks`` blocks (zeros) and, when routes are recorded,
        the experts each MoE layer chose for the token in each slot (+ the trash slot)."""
        mc, config = self.model.config, self.config
        if num_blocks < self.max_blocks_per_seq:  # else a long sequence could never run
            raise ValueError(f"num_kv_blocks={num_blocks} cannot hold one sequence of "
                             f"max_model_len={self.max_blocks_per_seq * self.block_size} "
                             f"({self.max_blocks_per_seq} blocks of {self.block_size}); raise "
                             f"it or lower max_model_len")
        self.cache = PagedKVCache(mc.num_hidden_layers, num_blocks, self.block_size,
                                  mc.num_key_value_heads, mc.head_dim, dtype=self.dtype,
                                  device=self.device, decode_kernel=config.paged_decode_kernel)
        moe_layers = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
        if config.enable_return_routed_experts and moe_layers:
            self.routes = torch.zeros(self.cache.trash_slot + 1, moe_layers,
                                      mc.num_experts_per_tok, dtype=torch.int16,
                                      device=self.device)

    def release(self) -> int:
        """Drop the KV pool, the routes buffer and the CUDA graphs (with their static
        buffers and memory pool); returns the bytes of the pool and routes released."""
        freed = sum(t.numel() * t.element_size() for t in
                    (self.cache.k, self.cache.v, self.routes) if t is not None)
        self.cache, self.routes = None, None
        self.graphs, self.static, self.graph_blocks = {}, {}, 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def budget_blocks(self, gpu_memory_utilization: float) -> int:
        """Blocks the pool may take now: on CUDA ``gpu_memory_utilization`` of the GPU less
        what is allocated (the weights, a trainer's state) and a profiled forward's
        activations (`_cuda_kv_budget`); elsewhere ``cpu_kv_cache_bytes``."""
        if self.device.type != "cuda":
            return self.config.cpu_kv_cache_bytes // self.per_block
        saved = self.config.gpu_memory_utilization
        self.config.gpu_memory_utilization = gpu_memory_utilization
        try:
            return max(0, self._cuda_kv_budget()) // self.per_block
        finally:
            self.config.gpu_memory_utilization = saved

    def _auto_num_blocks(self, per_block: int) -> int:
        cfg = self.config
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = cfg.cpu_kv_cache_bytes
        wanted = cfg.max_num_seqs * self.max_blocks_per_seq
        blocks = min(wanted, budget // per_block)
        if blocks < self.max_blocks_per_seq:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds {blocks} blocks, fewer "
                             f"than one sequence of max_model_len needs "
                             f"({self.max_blocks_per_seq}); lower max_model_len or raise the budget")
        return blocks

    @torch.no_grad()
    def _cuda_kv_budget(self) -> int:
        """Bytes for the KV pool: ``gpu_memory_utilization`` of the GPU's total memory, less
        what is allocated now (weights) and the activation peak of a profiled forward of
        ``max_num_batched_tokens`` tokens (with logits for ``max_num_seqs`` rows), less 10%."""
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        tokens = min(self.config.max_num_batched_tokens, self.max_blocks_per_seq * self.block_size)
        ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
        hidden = self.model.forward_hidden(ids).hidden_states[0]
        self.model.compute_logits(hidden[-min(tokens, self.config.max_num_seqs):]).float()
        del hidden
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - resident
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(device)
        return int(0.9 * (total * self.config.gpu_memory_utilization - resident - activations))

    # ------------------------------------------------------------------ inputs
    def _inputs(self, chunks: list[Chunk], pad_rows: int = 0, pad_blocks: int = 0):
        bs, trash = self.block_size, self.cache.trash_slot
        steps = max(c.num_tokens for c in chunks)
        ids, pos, slots, tables, ctx = [], [], [], [], []
        blocks = max(pad_blocks, max(-(-(c.seq.num_computed + c.num_tokens) // bs)
                                     for c in chunks))
        for c in chunks:
            start, n, table = c.seq.num_computed, c.num_tokens, c.seq.block_table
            span = range(start, start + n)
            pad = steps - n
            ids.append(c.seq.token_ids[start:start + n] + [0] * pad)
            pos.append(list(span) + [0] * pad)
            slots.append([table[p // bs] * bs + p % bs for p in span] + [trash] * pad)
            tables.append(table[:blocks] + [0] * (blocks - min(blocks, len(table))))
            ctx.append(start + n)
        for _ in range(pad_rows):
            ids.append([0] * steps)
            pos.append([0] * steps)
            slots.append([trash] * steps)
            tables.append([0] * blocks)
            ctx.append(1)

        def tensor(rows):
            return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

        return tensor(ids), tensor(pos), tensor(slots), tensor(tables), tensor(ctx)

    # ------------------------------------------------------------------ routes
    @property
    def records_routes(self) -> bool:
        """Whether each KV slot also keeps its token's experts."""
        return self.routes is not None

    def copy_block(self, src: int, dst: int) -> None:
        """Copy a block's KV (and routes) into another block (copy-on-write of a fork)."""
        self.cache.copy_block(src, dst)
        if self.routes is not None:
            bs = self.block_size
            self.routes[dst * bs:(dst + 1) * bs] = self.routes[src * bs:(src + 1) * bs]

    def read_routes(self, seq: Sequence) -> torch.Tensor:
        """The experts recorded for ``seq``'s tokens but the last (those are all computed
        once it finished): (len − 1, MoE layers, k) int16 on the CPU."""
        bs, table = self.block_size, seq.block_table
        slots = [table[p // bs] * bs + p % bs for p in range(len(seq) - 1)]
        return self.routes[torch.tensor(slots, dtype=torch.long, device=self.device)].cpu()

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def _forward(self, ids, pos, slots, tables, ctx, fresh: bool = False) -> torch.Tensor:
        self.cache.set_batch(pos, slots, tables, ctx, fresh=fresh)
        if self.routes is None:
            return self.model.forward_step_hidden(ids, pos, self.cache)  # (B, T, H)
        hidden, routes = self.model.forward_step_hidden(ids, pos, self.cache,
                                                        return_routes=True)
        # (B·T, layers, k) into the slots just written (padding: the trash slot)
        self.routes[slots.reshape(-1)] = routes.reshape(-1, *routes.shape[2:]).to(torch.int16)
        return hidden

    def _last_hidden(self, chunks: list[Chunk]) -> torch.Tensor:
        """Final hidden state at each chunk's last token, (B, H)."""
        decode = all(c.num_tokens == 1 for c in chunks)
        graph_size = self._graph_size(len(chunks), chunks) if decode else None
        if graph_size is not None:
            return self._replay(chunks, graph_size)
        inputs = self._inputs(chunks)
        fresh = all(c.seq.num_computed == 0 and c.num_tokens == chunks[0].num_tokens
                    for c in chunks)
        hidden = self._forward(*inputs, fresh=fresh)
        if all(c.num_tokens == hidden.shape[1] for c in chunks):  # no padding: the last column
            return hidden[:, -1]
        last = torch.tensor([c.num_tokens - 1 for c in chunks], device=self.device)
        return hidden[torch.arange(len(chunks), device=self.device), last]

    def execute(self, chunks: list[Chunk], draws: list[Draw]) -> tuple[list[int], list[float]]:
        """Run the batch; return the drawn tokens and their log-probs (one host transfer;
        NaN log-probs when no draw reports them)."""
        if self.config.deterministic:  # every row on its own: batch-invariant numerics
            hidden = torch.cat([self._last_hidden([c]) for c in chunks])
        else:
            hidden = self._last_hidden(chunks)
        if not draws:
            return [], []
        if [d.row for d in draws] != list(range(hidden.shape[0])):  # forks repeat a row
            hidden = hidden[torch.tensor([d.row for d in draws], device=self.device)]  # (R, H)
        logits = self.model.compute_logits(hidden, fast=True).float()  # (R, V)
        batch = self._sampling_batch(draws)
        tokens, logprobs = sample(logits, batch, self.shared_generator)
        if logprobs is None:  # no row reports them
            return tokens.cpu().tolist(), [float("nan")] * len(draws)
        out = torch.stack([tokens.double(), logprobs.double()]).cpu()
        return [int(t) for t in out[0].tolist()], out[1].tolist()

    def _sampling_batch(self, draws: list[Draw]) -> SamplingBatch:
        params = [d.params for d in draws]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        all_greedy = all(p.greedy for p in params)
        truncation = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        empty = torch.empty(0, device=self.device)  # a field the sampler will not read
        return SamplingBatch(  # tensors only for what the sampler reads
            temperature=empty if all_greedy else tensor([p.temperature for p in params],
                                                        torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long) if truncation else empty,
            top_p=tensor([p.top_p for p in params], torch.float32) if truncation else empty,
            keys=[d.key for d in draws], counters=[d.counter for d in draws],
            needs_truncation=truncation, all_greedy=all_greedy,
            needs_logprobs=any(p.logprobs for p in params))

    @torch.no_grad()
    def score(self, token_ids: list[int], num_prompt: int, temperature: float, *,
              return_routes: bool = False):
        """Log-probs of ``token_ids[num_prompt:]`` the way the trainer computes them: one
        full forward of the sequence to hidden states, then ``fused_linear_logprobs``.
        ``return_routes``: (log-probs, that forward's experts for every token but the last,
        (len − 1, MoE layers, k) int16 on the CPU, or None for a dense model)."""
        ids = torch.tensor([token_ids], device=self.device)
        out = self.model.forward_hidden(ids, return_routes=return_routes)
        hidden = out.hidden_states[0, num_prompt - 1:-1]
        logprobs = ops.fused_linear_logprobs(hidden, self.model.lm_head.weight,
                                             ids[0, num_prompt:], temperature=temperature or 1.0)
        if not return_routes:
            return logprobs.tolist()
        routes = out.routed_experts
        routes = None if routes is None else routes[0, :-1].to(torch.int16).cpu()
        return logprobs.tolist(), routes

    # ------------------------------------------------------------------ CUDA graphs
    def capture_cuda_graphs(self, max_context: int = 4096) -> None:
        """Capture decode (one token per row) for each configured batch size, with block
        tables padded to ``max_context`` tokens; longer contexts decode eagerly."""
        sizes = [b for b in self.config.cuda_graph_batch_sizes if b <= self.config.max_num_seqs]
        if self.device.type != "cuda" or self.config.enforce_eager or not sizes:
            return
        self.graph_blocks = min(self.max_blocks_per_seq, -(-max_context // self.block_size))
        largest = sizes[-1]
        long = dict(dtype=torch.long, device=self.device)
        self.static = dict(ids=torch.zeros(largest, 1, **long), pos=torch.zeros(largest, 1, **long),
                           slots=torch.full((largest, 1), self.cache.trash_slot, **long),
                           tables=torch.zeros(largest, self.graph_blocks, **long),
                           ctx=torch.ones(largest, **long))
        pool = None
        for size in reversed(sizes):
            s = {k: v[:size] for k, v in self.static.items()}
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (Triton autotuning, allocator) off the graph
                    self._forward(s["ids"], s["pos"], s["slots"], s["tables"], s["ctx"])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(s["ids"], s["pos"], s["slots"], s["tables"], s["ctx"])[:, 0]
            pool = graph.pool()
            self.graphs[size] = (graph, out)

    def _graph_size(self, rows: int, chunks: list[Chunk]) -> int | None:
        if not self.graphs:
            return None
        if any(len(c.seq.block_table) > self.graph_blocks for c in chunks):
            return None
        return next((size for size in sorted(self.graphs) if size >= rows), None)

    def _replay(self, chunks: list[Chunk], size: int) -> torch.Tensor:
        ids, pos, slots, tables, ctx = self._inputs(chunks, pad_rows=size - len(chunks),
                                                    pad_blocks=self.graph_blocks)
        s = self.static
        s["ids"][:size].copy_(ids)
        s["pos"][:size].copy_(pos)
        s["slots"][:size].copy_(slots)
        s["tables"][:size].copy_(tables)
        s["ctx"][:size].copy_(ctx)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:len(chunks)]
