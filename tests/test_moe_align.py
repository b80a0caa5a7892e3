"""moe_align against its reference and against the invariants that define it."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from livethinking.ops import MoeAlignment, moe_align
from livethinking.ops.reference import moe_align_reference

FIELDS = ["sorted_ids", "expert_offsets", "block_experts", "num_rows_padded", "row_of_pair",
          "tokens_per_expert"]


def routing_ids(num_tokens, num_experts, top_k, generator, experts_used=None):
    """Distinct expert ids per token (as top-k gives), drawn from a random subset of
    ``experts_used`` experts so that the others receive no token."""
    experts_used = max(top_k, experts_used or num_experts)
    subset = torch.randperm(num_experts, generator=generator)[:experts_used]
    scores = torch.rand(num_tokens, experts_used, generator=generator)
    return subset[scores.argsort(dim=1)[:, :top_k]].to(torch.int32)


def check_invariants(alignment: MoeAlignment, topk_ids, num_experts, block_size):
    """The definition of an alignment, checked directly (independent of the reference)."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    sorted_ids, offsets = alignment.sorted_ids.long(), alignment.expert_offsets.long()
    experts = topk_ids.reshape(-1).long()
    counts = torch.bincount(experts, minlength=num_experts)
    assert torch.equal(alignment.tokens_per_expert.long(), counts)
    assert offsets[0] == 0 and torch.all(offsets[1:] >= offsets[:-1])
    assert torch.all(offsets % block_size == 0)
    segment = offsets[1:] - offsets[:-1]
    assert torch.all((segment >= counts) & (segment < counts + block_size))
    assert torch.all((segment == 0) == (counts == 0))
    assert alignment.num_rows_padded.tolist() == [offsets[-1].item()]
    assert sorted_ids.numel() % block_size == 0 and sorted_ids.numel() >= offsets[-1]
    # each expert's segment: its pairs in ascending order, then sentinels
    for e in range(num_experts):
        rows = sorted_ids[offsets[e]: offsets[e + 1]]
        expected = torch.nonzero(experts == e).flatten()
        assert torch.equal(rows[: counts[e]], expected)
        assert torch.all(rows[counts[e]:] == num_pairs)
    assert torch.all(sorted_ids[offsets[-1]:] == num_pairs)
    # row_of_pair is the inverse of sorted_ids on real rows
    row_of_pair = alignment.row_of_pair.long().reshape(-1)
    assert alignment.row_of_pair.shape == (num_tokens, top_k)
    assert torch.equal(sorted_ids[row_of_pair], torch.arange(num_pairs))
    # block b belongs to the expert whose segment holds its rows; -1 past the end
    block_starts = torch.arange(alignment.block_experts.numel()) * block_size
    owner = torch.searchsorted(offsets, block_starts, right=True) - 1
    owner[block_starts >= offsets[-1]] = -1
    assert torch.equal(alignment.block_experts.long(), owner)


def check_against_reference(topk_ids, num_experts, block_size):
    alignment = moe_align(topk_ids, num_experts, block_size)
    assert alignment.block_size == block_size
    expected = moe_align_reference(topk_ids, num_experts, block_size)
    for name in FIELDS:
        actual = getattr(alignment, name)
        assert actual.dtype == torch.int32, name
        assert torch.equal(actual, expected[name]), name
    return alignment


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97, 1025])
@pytest.mark.parametrize("num_experts", [8, 60, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_matches_reference(num_tokens, num_experts, top_k, block_size, generator):
    topk_ids = routing_ids(num_tokens, num_experts, top_k, generator, experts_used=num_experts // 3)
    alignment = check_against_reference(topk_ids, num_experts, block_size)
    check_invariants(alignment, topk_ids, num_experts, block_size)


def test_all_tokens_to_two_experts(generator):
    topk_ids = torch.tensor([[3, 5]] * 50 + [[5, 3]] * 47, dtype=torch.int32)
    alignment = check_against_reference(topk_ids, 60, 16)
    check_invariants(alignment, topk_ids, 60, 16)
    assert alignment.tokens_per_expert[[3, 5]].tolist() == [97, 97]
    assert alignment.num_rows_padded.item() == 2 * 112


def test_capacity_is_tight():
    # T*k pairs on min(E, T*k) experts: each can waste block_size - 1 rows, no more.
    topk_ids = torch.arange(8, dtype=torch.int32)[None, :]  # one token, eight experts
    alignment = moe_align(topk_ids, 128, 64)
    assert alignment.sorted_ids.numel() == 8 * 64 == alignment.num_rows_padded.item()
    assert alignment.block_experts.tolist() == list(range(8))


def test_int64_ids_are_accepted(generator):
    topk_ids = routing_ids(33, 16, 4, generator)
    a32, a64 = moe_align(topk_ids, 16, 16), moe_align(topk_ids.long(), 16, 16)
    for name in FIELDS:
        assert torch.equal(getattr(a32, name), getattr(a64, name))


def test_non_contiguous_ids(generator):
    topk_ids = routing_ids(40, 32, 8, generator)[::3, 1:6]
    check_against_reference(topk_ids, 32, 16)


@given(num_tokens=st.integers(0, 300), num_experts=st.integers(1, 300),
       block_size=st.sampled_from([1, 2, 3, 16, 64, 128]), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(num_tokens, num_experts, block_size, data, seed):
    top_k = data.draw(st.integers(1, min(num_experts, 16)), label="top_k")
    used = data.draw(st.integers(1, num_experts), label="experts_used")
    topk_ids = routing_ids(num_tokens, num_experts, top_k, torch.Generator().manual_seed(seed), used)
    alignment = check_against_reference(topk_ids, num_experts, block_size)
    check_invariants(alignment, topk_ids, num_experts, block_size)


@pytest.mark.parametrize("shape", [(13, 4), (0, 2), (1, 1)])
def test_opcheck(shape, generator):
    topk_ids = routing_ids(shape[0], 24, shape[1], generator)
    for block_size in (1, 16):
        torch.library.opcheck(torch.ops.livethinking.moe_align.default, (topk_ids, 24, block_size))
