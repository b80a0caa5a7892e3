"""Packing (prompt, response) examples into fixed-length rows for SFT.

Each example is a document ``prompt + response`` in the row; attention never crosses
documents (``cu_seqlens``) and positions restart per document. The loss covers the
positions whose *next* token belongs to the response: target[i] = tokens[i + 1].
First-fit over examples in a seeded order; an example longer than the row loses the
tail of its response (counted).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["PackedRow", "pack_examples", "pack_masked"]


@dataclass(slots=True)
class PackedRow:
    input_ids: torch.Tensor  # (T,) long, padded with 0 after the last document
    targets: torch.Tensor  # (T,) long: the next token (0 where not trained)
    loss_mask: torch.Tensor  # (T,) bool: positions predicting a response token
    cu_seqlens: torch.Tensor  # (docs + 1,) int32; the padding is a last document

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def pack_examples(examples: list[tuple[list[int], list[int]]], row_tokens: int, *,
                  seed: int = 0) -> tuple[list[PackedRow], int]:
    """Rows of ``row_tokens`` from (prompt_ids, response_ids) pairs; returns (rows, number
    of truncated examples). Examples whose prompt alone fills a row are dropped (counted)."""
    return pack_masked([(list(p) + list(r), [0] * len(p) + [1] * len(r))
                        for p, r in examples], row_tokens, seed=seed)


def pack_masked(examples: list[tuple[list[int], list[int]]], row_tokens: int, *,
                seed: int = 0) -> tuple[list[PackedRow], int]:
    """Rows of ``row_tokens`` from (token ids, token mask) pairs, ``mask[i] = 1`` where
    token i is trained (a multi-turn trajectory: the model's turns, not the environment's);
    returns (rows, number of truncated examples). An example is truncated to the row; one
    with no trained token left in the row (or none at all, or a trained first token, which
    nothing predicts) is dropped and counted."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[tuple[list[int], list[int]]]] = []  # per row: (tokens, token mask)
    space: list[int] = []
    truncated = 0
    for i in order:
        tokens, mask = examples[i]
        if len(tokens) != len(mask):
            raise ValueError(f"examples[{i}]: {len(tokens)} tokens but {len(mask)} mask values")
        tokens, mask = list(tokens), list(mask)
        if len(tokens) > row_tokens:
            tokens, mask = tokens[:row_tokens], mask[:row_tokens]
            truncated += 1
            if not any(mask[1:]):
                continue
        elif not any(mask[1:]):
            truncated += 1
            continue
        for r, free in enumerate(space):
            if len(tokens) <= free:
                rows[r].append((tokens, mask))
                space[r] -= len(tokens)
                break
        else:
            rows.append([(tokens, mask)])
            space.append(row_tokens - len(tokens))
    return [_build_row(docs, row_tokens) for docs in rows], truncated


def _build_row(docs: list[tuple[list[int], list[int]]], row_tokens: int) -> PackedRow:
    ids = torch.zeros(row_tokens, dtype=torch.long)
    targets = torch.zeros(row_tokens, dtype=torch.long)
    mask = torch.zeros(row_tokens, dtype=torch.bool)
    bounds, at = [0], 0
    for tokens, token_mask in docs:
        n = len(tokens)
        ids[at:at + n] = torch.tensor(tokens)
        targets[at:at + n - 1] = torch.tensor(tokens[1:])
        # position j predicts token j + 1: trained where that token is
        mask[at:at + n - 1] = torch.tensor(token_mask[1:], dtype=torch.bool)
        at += n
        bounds.append(at)
    if at < row_tokens:
        bounds.append(row_tokens)
    return PackedRow(ids, targets, mask, torch.tensor(bounds, dtype=torch.int32))
