"""Batched sampling with per-row temperature, top-k, top-p and seeds; no host sync.

For row r with logits z: ``logprob = (z / t)[token] − logsumexp(z / t)`` = log softmax(z /
t)[token] (t = 1 for greedy rows), reported before truncation, and only computed when some
row of the batch asks for log-probs (``needs_logprobs``). Greedy rows take argmax z. Other rows keep the top_k largest
and the smallest prefix of the sorted distribution whose mass reaches top_p, and draw
``argmax_i p_i / q_i`` with q_i ~ Exp(1) (the exponential race, equivalent to sampling
from p). Seeded rows draw q from their own generator, so their samples do not depend on
what else is in the batch; the others share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingBatch", "sample"]


@dataclass(slots=True)
class SamplingBatch:
    temperature: torch.Tensor  # (R,) float32, 0 = greedy
    top_k: torch.Tensor  # (R,) long, 0 = off
    top_p: torch.Tensor  # (R,) float32
    generators: list[torch.Generator | None]  # per row; None = the shared generator
    needs_truncation: bool  # any row with top_k > 0 or top_p < 1
    all_greedy: bool
    needs_logprobs: bool = True  # any row that reports log-probs


def _exponential_noise(shape, generators, shared, device) -> torch.Tensor:
    noise = torch.empty(shape, device=device, dtype=torch.float32)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_(generator=shared)
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    return noise


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
        probs = torch.softmax(filtered, dim=-1)
        noise = _exponential_noise(probs.shape, batch.generators, shared, probs.device)
        drawn = (probs / noise).argmax(dim=-1)
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
