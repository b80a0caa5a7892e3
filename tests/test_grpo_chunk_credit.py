"""IPA-style interaction-chunk credit of fused_linear_grpo_loss: ``chunk_ids``,
``importance_sampling_level="chunk"`` and ``loss_type="chunk"``, against an fp64 reference
written with Python loops over rows and chunks."""

import pytest
import torch
import torch.nn.functional as F

from livethinking.ops import fused_linear_grpo_loss

# Error budget against fp64, normwise (max |error| vs max |exact|, or vs the sum of |terms|
# for the signed loss): the op computes log-probs in fp32 (one log-sum-exp over V: a few ulps
# of |logp| ≈ 4, about 1e-6 absolute), then O(T) fp32 sums per chunk and over the batch. A
# token's gradient coefficient −A·r + β·(1 − e^(ref − logp)) carries that 1e-6 relative to
# |A|·r or to |ref − logp|: inputs keep |A| ≥ 0.5 and |ref − logp| ≥ 0.3 (make_case,
# reference_logprobs), so no coefficient cancels and a few hundred fp32 ulps, 1e-5, bound it.
RTOL = 1e-5


def make_case(generator, batch, length, *, hidden_size=8, vocab=61, one_chunk_per_row=False):
    """Inputs with multi-turn completions: turns of 1–6 tokens (single-token turns too),
    masked environment gaps between them, masked holes inside some turns, a turn that reuses
    an earlier id of its row (one chunk in two places), ids neither consecutive nor increasing
    and the same across rows, garbage ids where the mask is 0; the last row all masked when
    batch > 2."""
    hidden = torch.randn(batch, length, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    chunk_ids = torch.randint(-3, 50, (batch, length), generator=generator)  # garbage where masked

    def draw(high):
        return int(torch.randint(0, high, (1,), generator=generator))

    for b in range(batch):
        if one_chunk_per_row:
            mask[b] = torch.rand(length, generator=generator) < 0.8
            chunk_ids[b] = 3 * b + 5
            continue
        t, turn = draw(2), 0
        while t < length:
            size = min(1 if draw(3) == 0 else 1 + draw(6), length - t)
            turn_id = 1000 - 7 * turn if turn < 2 or draw(4) else 1000 - 7 * draw(turn)
            chunk_ids[b, t:t + size] = turn_id
            mask[b, t:t + size] = True
            if size > 2 and draw(3) == 0:
                mask[b, t + 1 + draw(size - 2)] = False  # a masked hole inside the turn
            t += size + draw(4)  # environment tokens, masked out
            turn += 1
    mask[0, 0] = True
    if batch > 2:
        mask[-1] = False
    advantages = (0.5 + torch.rand(batch, generator=generator)) * (
        torch.randint(0, 2, (batch,), generator=generator) * 2 - 1)  # |A| in [0.5, 1.5)
    return hidden, weight, targets, mask, advantages, chunk_ids


def exact_logprobs(hidden, weight, targets, dtype=torch.float64):
    logits = hidden.to(dtype) @ weight.to(dtype).T  # full (B, T, V) logits
    return F.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def reference_loss(hidden, weight, targets, mask, advantages, chunk_ids, *, old=None, ref=None,
                   beta=0.0, epsilon_low=0.2, epsilon_high=0.28, delta=None, level="chunk",
                   loss_type="chunk", num_items_in_batch=None, is_weights=None,
                   dtype=torch.float64):
    """Row by row and chunk by chunk in ``dtype``: returns loss, stats, and the sum of |terms|
    (the scale of the loss's rounding)."""
    logp = exact_logprobs(hidden, weight, targets, dtype)
    batch, length = targets.shape
    chunks = []  # (row, [positions])
    for b in range(batch):
        ids = []
        for t in range(length):
            if mask[b, t] and int(chunk_ids[b, t]) not in ids:
                ids.append(int(chunk_ids[b, t]))
        for c in ids:
            chunks.append((b, [t for t in range(length) if mask[b, t] and int(chunk_ids[b, t]) == c]))

    def token_log_ratio(b, s):
        return logp[b, s] - (logp[b, s].detach() if old is None else old[b, s].to(dtype))

    loss_t, ratios, low, high = {}, {}, {}, {}
    for b, positions in chunks:
        row = [t for t in range(length) if mask[b, t]]
        for t in positions:
            a = (advantages[b] if advantages.dim() == 1 else advantages[b, t]).to(dtype)
            if level == "token":
                log_ratio = token_log_ratio(b, t)
            elif level == "chunk":  # the chunk's geometric-mean ratio
                log_ratio = sum(token_log_ratio(b, s) for s in positions) / len(positions)
            else:
                log_ratio = sum(token_log_ratio(b, s) for s in row) / len(row)
            r = torch.exp(log_ratio)
            first = r if delta is None else torch.clamp(r, max=delta)
            value = -torch.minimum(first * a, torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high) * a)
            if is_weights is not None:
                value = value * is_weights[b, t].to(dtype)
            if beta > 0:
                d = ref[b, t].to(dtype) - logp[b, t]
                value = value + beta * (torch.exp(d) - d - 1)
            loss_t[b, t], ratios[b, t] = value, r.detach()
            low[b, t] = float(r < 1 - epsilon_low and a < 0)
            high[b, t] = float(r > 1 + epsilon_high and a > 0)
    tokens = max(len(loss_t), 1)
    if loss_type == "chunk":
        terms = [sum(loss_t[b, t] for t in ps) / len(ps) for b, ps in chunks]
        denominator = max(len(chunks), 1) if num_items_in_batch is None else num_items_in_batch
    else:  # dapo
        terms = list(loss_t.values())
        denominator = tokens if num_items_in_batch is None else num_items_in_batch
    loss = sum(terms) / denominator if terms else (hidden.sum() + weight.sum()) * 0
    magnitude = sum(x.detach().abs().item() for x in terms) / denominator
    stats = {"ratio": sum(float(v) for v in ratios.values()) / tokens,
             "clip_ratio_low": sum(low.values()) / tokens,
             "clip_ratio_high": sum(high.values()) / tokens,
             "clip_ratio_region": sum(max(low[k], high[k]) for k in low) / tokens,
             "num_chunks": len(chunks)}
    return loss, stats, magnitude


def grads(loss_fn, hidden, weight, *args, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats, *rest = loss_fn(h, w, *args, **kwargs)
    loss.backward()
    return (loss.detach(), h.grad, w.grad), stats, rest


def off_policy_old(generator, hidden, weight, targets, advantages):
    """Old log-probs off by a row shift of ±0.45 toward clipping on even rows (0 on odd rows)
    plus 0.3 per token: ratios away from 1, some clipped, some not."""
    shift = 0.45 * advantages.sign() * (torch.arange(len(advantages)) % 2 == 0)
    return (exact_logprobs(hidden, weight, targets) - shift[:, None]
            + 0.3 * torch.randn(targets.shape, generator=generator, dtype=torch.float64)).float()


def reference_logprobs(generator, hidden, weight, targets):
    """Reference log-probs 0.3–0.6 away from the current ones, either side."""
    offset = (0.3 + 0.3 * torch.rand(targets.shape, generator=generator, dtype=torch.float64)) \
        * (torch.randint(0, 2, targets.shape, generator=generator) * 2 - 1)
    return (exact_logprobs(hidden, weight, targets) + offset).float()


SHAPES = [(1, 1), (3, 7), (2, 97)]
COMBOS = [("chunk", "chunk", 0.0), ("chunk", "dapo", 0.0), ("token", "chunk", 0.0),
          ("chunk", "chunk", 0.05)]


@pytest.mark.parametrize("batch,length", SHAPES)
@pytest.mark.parametrize("level,loss_type,beta", COMBOS)
@pytest.mark.parametrize("with_old", [False, True])
def test_matches_float64_chunk_reference(batch, length, level, loss_type, beta, with_old, generator):
    hidden, weight, targets, mask, advantages, chunk_ids = make_case(generator, batch, length)
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level,
                  loss_type=loss_type, beta=beta)
    if with_old:  # per-token rollout weights: a gradient that stopped at each token's own
        # logp instead of flowing through its chunk's mean would differ
        kwargs.update(old_logprobs=off_policy_old(generator, hidden, weight, targets, advantages),
                      delta=1.5, rollout_is_weights=0.5 + torch.rand(targets.shape, generator=generator))
    if beta > 0:  # per-token advantages too, |A| still >= 0.5
        kwargs["ref_logprobs"] = reference_logprobs(generator, hidden, weight, targets)
        advantages = advantages[:, None] * (1 + 0.5 * torch.rand(targets.shape, generator=generator))
    ours, stats, _ = grads(fused_linear_grpo_loss, hidden, weight, targets, mask, advantages,
                           chunk_ids=chunk_ids, **kwargs)
    renames = {"old_logprobs": "old", "ref_logprobs": "ref", "importance_sampling_level": "level",
               "rollout_is_weights": "is_weights"}
    exact, exact_stats, (magnitude,) = grads(
        reference_loss, hidden.double(), weight.double(), targets, mask, advantages, chunk_ids,
        **{renames.get(k, k): v for k, v in kwargs.items()})
    for name, o, e, scale in zip(["loss", "d hidden", "d weight"], ours, exact,
                                 [max(magnitude, 1e-6), None, None]):
        scale = scale or e.abs().max().item()
        error = (o.double() - e).abs().max().item()
        assert error <= RTOL * max(scale, 1e-6), (name, error, scale)
    assert stats["num_chunks"].item() == exact_stats["num_chunks"]
    for name in ("ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert stats[name].item() == pytest.approx(exact_stats[name], rel=1e-5, abs=1e-6), name
    if with_old and length >= 97:  # row 0 is pushed 0.45 toward clipping: of its ~15 chunks,
        # each clips unless its token noise (0.3 a token) undoes over half of that
        assert stats["clip_ratio_region"].item() > 0
    if not with_old:
        assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_ratio_region"].item() == 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 9)])
def test_one_chunk_per_row_is_the_sequence_level(loss_type, batch, length, generator):
    hidden, weight, targets, mask, advantages, chunk_ids = make_case(
        generator, batch, length, one_chunk_per_row=True)
    old = off_policy_old(generator, hidden, weight, targets, advantages)
    runs = [grads(fused_linear_grpo_loss, hidden, weight, targets, mask, advantages, old_logprobs=old,
                  loss_type=loss_type, importance_sampling_level=level, chunk_ids=chunk_ids)
            for level in ("sequence", "chunk")]
    (sequence, sequence_stats, _), (chunk, chunk_stats, _) = runs
    for s, c in zip(sequence, chunk):
        if length == 1:  # sums of one term: bitwise equal
            assert torch.equal(s, c)
        else:  # the chunk sums (index_add) may add in another order than the row sums (sum(-1)):
            # a few fp32 ulps per term at most (bitwise equal on this CPU at T = 9)
            assert torch.allclose(s, c, rtol=4 * length * 2.0**-24, atol=1e-7), (s - c).abs().max()
    for name in ("ratio", "clip_ratio_region"):
        assert chunk_stats[name].item() == pytest.approx(sequence_stats[name].item(), rel=1e-6)


def test_num_items_in_batch_splits_microbatches(generator):
    hidden, weight, targets, mask, advantages, chunk_ids = make_case(generator, 4, 13)
    old = off_policy_old(generator, hidden, weight, targets, advantages)
    kwargs = dict(importance_sampling_level="chunk", loss_type="chunk")
    whole, stats, _ = grads(fused_linear_grpo_loss, hidden, weight, targets, mask, advantages,
                            old_logprobs=old, chunk_ids=chunk_ids, **kwargs)
    total = stats["num_chunks"].item()
    assert total == reference_loss(hidden, weight, targets, mask, advantages, chunk_ids)[1]["num_chunks"]
    halves = [grads(fused_linear_grpo_loss, hidden[rows], weight, targets[rows], mask[rows],
                    advantages[rows], old_logprobs=old[rows], chunk_ids=chunk_ids[rows],
                    num_items_in_batch=total, **kwargs)[0] for rows in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(halves[0][0] + halves[1][0], whole[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(torch.cat([halves[0][1], halves[1][1]]), whole[1], rtol=1e-6, atol=1e-8)
    assert torch.allclose(halves[0][2] + halves[1][2], whole[2], rtol=1e-5, atol=1e-8)


def test_ids_where_masked_do_not_matter_and_empty_batch(generator):
    hidden, weight, targets, mask, advantages, chunk_ids = make_case(generator, 3, 11)
    kwargs = dict(importance_sampling_level="chunk", loss_type="chunk", old_logprobs=off_policy_old(
        generator, hidden, weight, targets, advantages))
    first = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, chunk_ids=chunk_ids, **kwargs)
    other = torch.where(mask, chunk_ids, torch.randint(-99, 99, mask.shape, generator=generator))
    second = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, chunk_ids=other, **kwargs)
    assert torch.equal(first[0], second[0]) and first[1]["num_chunks"] == second[1]["num_chunks"]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(h, w, targets, torch.zeros_like(mask), advantages,
                                         chunk_ids=chunk_ids.int(), **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and stats["num_chunks"].item() == 0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("kwargs,message", [
    (dict(importance_sampling_level="chunk"), "importance_sampling_level='chunk' needs chunk_ids"),
    (dict(loss_type="chunk"), "loss_type='chunk' needs chunk_ids"),
    (dict(chunk_ids=torch.zeros(3, 4, dtype=torch.long)), r"chunk_ids must have shape \(3, 5\)"),
    (dict(chunk_ids=torch.zeros(3, 5)), "chunk_ids must have an integer dtype, got torch.float32"),
    (dict(chunk_ids=torch.zeros(3, 5, dtype=torch.bool)), "chunk_ids must have an integer dtype"),
    (dict(chunk_ids=[[0] * 5] * 3), "chunk_ids must be a"),
])
def test_bad_chunk_input(kwargs, message, generator):
    hidden, weight, targets, mask, advantages, _ = make_case(generator, 3, 5)
    with pytest.raises(ValueError, match=message):
        fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, **kwargs)
