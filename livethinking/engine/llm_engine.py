"""The engine: requests in, one scheduler step at a time, outputs back.

In ``deterministic`` mode every sequence runs alone (batch-invariant samples) and a
finished sequence's log-probs are recomputed the trainer's way (one forward over the
sequence, ``fused_linear_logprobs``), so the trainer's old log-probs equal the engine's
bit for bit; while it runs, the incremental values are reported.

Not thread-safe: one thread owns an :class:`LLMEngine` (the HTTP server runs it in a
background thread and talks to it through a queue). It holds a reference to the model,
never a copy, so a trainer's optimizer steps are seen by the next step; a changed weight
version empties the prefix cache, whose KV would be stale.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from livethinking.engine.block_manager import BlockManager
from livethinking.engine.config import EngineConfig, EngineFullError, EngineStats
from livethinking.engine.detokenizer import IncrementalDetokenizer
from livethinking.engine.model_runner import Chunk, Draw, ModelRunner
from livethinking.engine.outputs import CompletionOutput, RequestOutput
from livethinking.engine.sampling_params import SamplingParams
from livethinking.engine.scheduler import Scheduler
from livethinking.engine.sequence import Sequence, SequenceStatus

__all__ = ["LLMEngine"]


@dataclass(eq=False, slots=True)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens clipped to the context
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)  # seqs[0] is prefilled; others fork
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    first_token_time: float | None = None


def _noise_key(seed: int | None, index: int) -> int | None:
    """The sampler's key of sample ``index`` of a request seeded with ``seed``."""
    if seed is None:
        return None
    return (seed * 0x9E3779B1 + index) % 2**63


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mc = model.config
        limit = mc.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(model, config, self.max_model_len)
        self.blocks = BlockManager(self.runner.cache.num_blocks, config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.requests: dict[str, _Request] = {}
        self.eos_ids = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._seq_ids = itertools.count()
        self._params = list(model.parameters())  # walking the module tree costs ~ms per step
        self._weights_version = self._weight_version()
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.decode_steps = 0
        self.decode_step_seconds = 0.0
        self.decode_model_seconds = 0.0
        self.runner.capture_cuda_graphs()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request. ValueError/TypeError for a bad prompt, params or id (the rules
        of :meth:`validate_request`); EngineFullError when ``max_waiting`` sequences
        already wait. Nothing is queued when it raises."""
        self._check_awake()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.validate_request(prompt, params)
        if not self.has_room():
            raise EngineFullError(f"{len(self.scheduler.waiting)} sequences are waiting "
                                  f"(max_waiting={self.config.max_waiting}); retry later")
        now = time.perf_counter() if arrival_time is None else arrival_time
        request = _Request(request_id, ids, params,
                           min(params.max_tokens, self.max_model_len - len(ids)), now)
        for i in range(params.n):
            request.seqs.append(Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids),
                                         params, _noise_key(params.seed, i)))
            request.detokenizers.append(IncrementalDetokenizer(
                self.tokenizer, params.stop, incremental=params.output_kind == "cumulative"))
        request.seqs[0].needs_fork = params.n > 1
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def validate_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if ``add_request`` would accept (prompt, params) in an
        engine with room; else ValueError/TypeError naming what is wrong. Queues nothing,
        so a batch can be checked whole before any of it is added."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if params.return_routed_experts and not self.runner.records_routes:
            raise ValueError("return_routed_experts needs an MoE model and an engine started "
                             "with enable_return_routed_experts (serve: "
                             "--enable-return-routed-experts)")
        if self.blocks.blocks_needed(len(ids)) + params.n - 1 > self.blocks.num_blocks:
            raise ValueError(f"a prompt of {len(ids)} tokens with n={params.n} needs more KV "
                             f"blocks than the pool has ({self.blocks.num_blocks})")
        return ids

    def has_room(self) -> bool:
        """Whether ``add_request`` admits one more request now (fewer than ``max_waiting``
        sequences wait)."""
        return len(self.scheduler.waiting) < self.config.max_waiting

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got "
                            f"{type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:  # before the per-id check: that is O(len) Python
            raise ValueError(f"prompt has {len(ids)} tokens; the context is {self.max_model_len} "
                             f"tokens, which must leave room for at least one new token")
        vocab = self.model.config.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in ids):  # bool is not an id
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its KV blocks now; returns its last output (unfinished
        samples with finish reason "abort"), or None for an unknown id."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)
        return self._output(request)

    def retract_all(self) -> int:
        """Free every request's KV blocks; they are recomputed (with the weights of that
        time) when stepping resumes, their samples so far kept. Returns the sequences
        retracted."""
        return self.scheduler.retract_all()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ sleep mode
    @property
    def is_sleeping(self) -> bool:
        return self.runner.cache is None

    def sleep(self) -> int:
        """Release the KV pool, the routes buffer and the CUDA graphs (vLLM's sleep level 1
        without the weight offload: the weights stay, shared with a trainer); the prefix
        cache goes with the pool. Returns the bytes released (0 when already asleep).
        RuntimeError while requests are unfinished."""
        if self.is_sleeping:
            return 0
        if self.requests:
            raise RuntimeError(f"cannot sleep with {len(self.requests)} unfinished requests "
                               f"({sorted(self.requests)[:5]}): finish or abort them first")
        return self.runner.release()

    def wake_up(self, num_kv_blocks: int | None = None) -> None:
        """Allocate the KV pool again: ``num_kv_blocks`` blocks (default: as many as before
        sleeping; ValueError when they cannot hold one max_model_len sequence), with an
        empty prefix cache; CUDA graphs are captured again unless ``enforce_eager``."""
        if not self.is_sleeping:
            return
        self.runner.allocate(num_kv_blocks or self.blocks.num_blocks)
        old = self.blocks
        self.blocks = BlockManager(self.runner.cache.num_blocks, self.config.block_size,
                                   enable_prefix_caching=self.config.enable_prefix_caching)
        self.blocks.queried_tokens, self.blocks.hit_tokens = old.queried_tokens, old.hit_tokens
        self.scheduler.blocks = self.blocks
        self.runner.capture_cuda_graphs()

    def _check_awake(self) -> None:
        if self.is_sleeping:
            raise RuntimeError("the engine is asleep (its KV pool is released): call "
                               "wake_up() first")

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (called automatically when the weights change)."""
        self.blocks.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_free=self.blocks.num_free,
            prefix_cache_queried_tokens=self.blocks.queried_tokens,
            prefix_cache_hit_tokens=self.blocks.hit_tokens, prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens, num_preemptions=self.scheduler.num_preemptions,
            decode_steps=self.decode_steps, decode_step_seconds=self.decode_step_seconds,
            decode_model_seconds=self.decode_model_seconds)

    # ------------------------------------------------------------------ stepping
    def _weight_version(self) -> int:
        return sum(p._version for p in self._params)

    def step(self) -> list[RequestOutput]:
        """One forward over a scheduled batch; outputs of the requests that advanced
        (``final_only`` requests: only the step that finished them)."""
        self._check_awake()
        began = time.perf_counter()
        version = self._weight_version()
        if version != self._weights_version:
            self._weights_version = version
            self.reset_prefix_cache()
        chunks = self.scheduler.schedule()
        if not chunks and self.scheduler.has_work():  # a decode step preempted everything
            chunks = self.scheduler.schedule()
            if not chunks:  # admission checks rule this out
                raise RuntimeError("the scheduler cannot place any waiting sequence")
        if not chunks:
            return []
        draws, completing = [], [c for c in chunks if c.completes]
        for row, chunk in enumerate(chunks):
            if chunk.completes:
                seqs = self.requests[chunk.seq.request_id].seqs if chunk.seq.needs_fork \
                    else [chunk.seq]
                draws += [Draw(row, s.params, s.noise_key, s.num_output_tokens) for s in seqs]
        model_began = time.perf_counter()
        tokens, logprobs = self.runner.execute(chunks, draws)
        model_seconds = time.perf_counter() - model_began
        decoding = all(c.seq.status is SequenceStatus.RUNNING for c in chunks)
        if decoding:
            self.decode_tokens += len(chunks)
        else:
            self.prefill_tokens += sum(c.num_tokens for c in chunks)
        self.scheduler.after_step(chunks)
        outputs = self._process(completing, iter(zip(tokens, logprobs)))
        if decoding:
            self.decode_steps += 1
            self.decode_model_seconds += model_seconds
            self.decode_step_seconds += time.perf_counter() - began
        return outputs

    def _process(self, completing: list[Chunk], drawn) -> list[RequestOutput]:
        """Append the drawn tokens of the chunks that reached their sequence's end."""
        now = time.perf_counter()
        touched: dict[str, _Request] = {}
        for chunk in completing:
            request = self.requests[chunk.seq.request_id]
            touched[request.request_id] = request
            if chunk.seq.needs_fork:
                chunk.seq.needs_fork = False
                picks = [next(drawn) for _ in request.seqs]
                for child in request.seqs[1:]:
                    self._fork(chunk.seq, child)
                for seq, (token, logprob) in zip(request.seqs, picks):
                    self._append(request, seq, token, logprob, now)
            else:
                self._append(request, chunk.seq, *next(drawn), now)
        outputs = []
        for request in touched.values():  # final_only: reported once, when finished
            done = all(seq.is_finished for seq in request.seqs)
            if done or request.params.output_kind == "cumulative":
                outputs.append(self._output(request))
            if done:
                del self.requests[request.request_id]
        return outputs

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        partial = parent.num_computed % self.blocks.block_size != 0
        if partial and self.blocks.num_free == 0:  # no block to copy into: recompute later
            self.scheduler.add(child)
            return
        copied = self.blocks.fork(parent, child)
        if copied is not None:
            self.runner.copy_block(parent.block_table[len(child.block_table) - 1], copied)
        child.status = SequenceStatus.RUNNING
        self.scheduler.running.append(child)

    def _append(self, request: _Request, seq: Sequence, token: int, logprob: float,
                now: float) -> None:
        seq.token_ids.append(token)
        if seq.params.logprobs:
            seq.logprobs.append(logprob)
        if request.first_token_time is None:
            request.first_token_time = now
        params = seq.params
        detokenizer = request.detokenizers[seq.index]
        if detokenizer.append(token):
            reason, seq.stop_reason = "stop", detokenizer.matched
        elif token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        elif seq.num_output_tokens >= request.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        else:
            return
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if self.config.deterministic and (params.logprobs or params.return_routed_experts):
            # the trainer's numbers, exactly: one full forward gives log-probs and routes
            logprobs, routes = self.runner.score(seq.token_ids, seq.num_prompt_tokens,
                                                 params.temperature, return_routes=True)
            if params.logprobs:
                seq.logprobs = logprobs
            if params.return_routed_experts:
                seq.routed_experts = routes
        elif params.return_routed_experts:
            seq.routed_experts = self.runner.read_routes(seq)
        self.scheduler.remove(seq)

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for seq, detok in zip(request.seqs, request.detokenizers):
            completions.append(CompletionOutput(
                index=seq.index, token_ids=list(seq.output_token_ids),
                text=detok.visible(seq.is_finished),
                logprobs=list(seq.logprobs) if seq.params.logprobs else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                routed_experts=seq.routed_experts))
        return RequestOutput(request.request_id, request.prompt_ids, completions,
                             request.arrival_time, request.first_token_time,
                             request.seqs[0].num_cached_tokens)
