"""Batched sampling with per-row temperature, top-k, top-p and seeds; no host sync.

For row r with logits z: ``logprob = (z / t)[token] − logsumexp(z / t)`` = log softmax(z /
t)[token] (t = 1 for greedy rows), reported before truncation, and only computed when some
row of the batch asks for log-probs (``needs_logprobs``). Greedy rows take argmax z. Other
rows keep the top_k largest and the smallest prefix of the sorted distribution whose mass
reaches top_p, and draw by the inverse CDF: the first token whose cumulative probability
(fp64, in vocabulary order) exceeds u · total for one uniform u ∈ [0, 1) per row — one
uniform per row, not V noise values. A seeded row's u is a counter-based hash
(splitmix64) of its key (the request's seed and sample index) and its draw count, so its
samples depend on neither the batch nor the order of steps, with no per-row generator
call; the other rows' u come from the engine's generator in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingBatch", "counter_uniform", "sample"]


@dataclass(slots=True)
class SamplingBatch:
    temperature: torch.Tensor  # (R,) float32, 0 = greedy (read unless all_greedy)
    top_k: torch.Tensor  # (R,) long, 0 = off (read only if needs_truncation)
    top_p: torch.Tensor  # (R,) float32 (read only if needs_truncation)
    keys: list[int | None]  # per row: the seeded row's noise key; None = the shared generator
    counters: list[int]  # per row: the draws it made before this one
    needs_truncation: bool  # any row with top_k > 0 or top_p < 1
    all_greedy: bool
    needs_logprobs: bool = True  # any row that reports log-probs


_MASK64 = (1 << 64) - 1


def counter_uniform(key: int, counter: int) -> float:
    """u ∈ [0, 1) with 53 random bits: splitmix64's finaliser of key ⊕ counter·φ."""
    z = ((key ^ (counter * 0x9E3779B97F4A7C15)) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def _uniforms(batch: SamplingBatch, shared, device) -> torch.Tensor:
    """(R,) float64: the seeded rows' counter uniforms, the others' from ``shared``."""
    rows = len(batch.keys)
    values = [0.0 if k is None else counter_uniform(k, c) for k, c in zip(batch.keys, batch.counters)]
    u = torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
    unseeded = [i for i, k in enumerate(batch.keys) if k is None]
    if unseeded:
        drawn = torch.rand(rows, generator=shared, dtype=torch.float64, device=device)
        if len(unseeded) == rows:
            return drawn
        keep = torch.tensor([k is None for k in batch.keys], device=device)
        u = torch.where(keep, drawn, u)
    return u


def sample(logits: torch.Tensor, batch: SamplingBatch, shared: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (R, V) -> tokens (R,) long and their log-probs (R,) float32 (None unless
    ``batch.needs_logprobs``), on the device."""
    logits = logits.float()
    if batch.all_greedy:
        scaled = logits
        tokens = logits.argmax(dim=-1)
    else:
        greedy = batch.temperature == 0
        temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = logits / temperature[:, None]
        filtered = scaled
        if batch.needs_truncation:
            filtered = _truncate(scaled, batch.top_k, batch.top_p)
        cdf = torch.softmax(filtered, dim=-1).double().cumsum(dim=-1)  # (R, V)
        target = _uniforms(batch, shared, cdf.device) * cdf[:, -1]  # (R,)
        drawn = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
        drawn = drawn.clamp_(max=cdf.shape[-1] - 1)  # u·total rounding up to the total
        tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    if not batch.needs_logprobs:
        return tokens, None
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def _truncate(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k and top-p set (the most likely token always stays)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
