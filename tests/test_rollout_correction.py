"""Rollout importance correction: every mode's weights and diagnostics against an fp64
reference written row by row from the formulas (TRL's truncate, verl's mask), on random
inputs of awkward sizes with poisoned padding and an all-masked row."""

import math

import pytest
import torch

from livethinking.ops import rollout_correction

MODES = ["none", "token_tis", "seq_tis", "token_mis", "seq_mis"]


def _reference(old, samp, mask, mode, cap, low, high):
    """fp64, one row and one token at a time."""
    B, T = len(old), len(old[0])
    weights = [[0.0] * T for _ in range(B)]
    k3, diffs, capped, masked, count = 0.0, [], 0, 0, 0
    for b in range(B):
        tokens = [t for t in range(T) if mask[b][t]]
        seq = math.exp(sum(old[b][t] - samp[b][t] for t in tokens))
        for t in tokens:
            d = old[b][t] - samp[b][t]
            r = seq if mode.startswith("seq") else math.exp(d)
            count += 1
            diffs.append(abs(d))
            k3 += math.exp(d) - 1 - d
            if mode.endswith("tis"):
                weights[b][t] = min(r, cap)
                capped += r > cap
            elif mode.endswith("mis"):
                keep = low <= r <= high
                weights[b][t] = r if keep else 0.0
                masked += not keep
    n = max(count, 1)
    return (weights, {"kl_k3": k3 / n, "logprob_abs_diff": sum(diffs) / n,
                      "logprob_abs_diff_max": max(diffs, default=0.0),
                      "frac_capped": capped / n, "frac_masked": masked / n})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 97)])
def test_weights_and_diagnostics_match_the_formulas(mode, shape, generator):
    B, T = shape
    old = -torch.rand(B, T, generator=generator, dtype=torch.float64) * 3
    samp = old + torch.randn(B, T, generator=generator, dtype=torch.float64) * 0.6
    mask = torch.rand(B, T, generator=generator) < 0.8
    mask[0, 0] = True
    if B > 2:
        mask[1] = False  # an all-masked row
    poison = ~mask
    old = old.masked_fill(poison, 1e4)  # padding must not reach an exponential
    samp = samp.masked_fill(poison, -1e4)
    cap, low, high = 1.7, 0.6, 1.5
    weights, stats = rollout_correction(old.float(), samp.float(), mask, mode=mode, cap=cap,
                                        low=low, high=high)
    ref_w, ref_stats = _reference(old.tolist(), samp.tolist(), mask.tolist(), mode, cap, low,
                                  high)
    if mode == "none":
        assert weights is None
    else:
        assert weights.dtype == torch.float32 and weights.shape == (B, T)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights.double(), torch.tensor(ref_w, dtype=torch.float64),
                                   rtol=2e-6 * T, atol=1e-7)
        assert (weights[~mask] == 0).all()
    for key, value in ref_stats.items():
        assert getattr(stats, key) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_bounds_act_where_they_should():
    old = torch.zeros(2, 3)
    samp = torch.tensor([[0.0, -1.0, 1.0], [-0.1, -0.1, -0.1]])  # r = 1, e, 1/e; e^0.1 each
    mask = torch.ones(2, 3, dtype=torch.bool)
    w, s = rollout_correction(old, samp, mask, mode="token_tis", cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-1)])
    assert s.frac_capped == pytest.approx(1 / 6)
    w, s = rollout_correction(old, samp, mask, mode="token_mis", low=0.5, high=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert s.frac_masked == pytest.approx(2 / 6)
    w, _ = rollout_correction(old, samp, mask, mode="seq_tis", cap=1.2)
    assert w[0].tolist() == pytest.approx([1.0] * 3)  # e^0 for the row
    assert w[1].tolist() == pytest.approx([1.2] * 3)  # e^0.3 = 1.35, capped
    w, _ = rollout_correction(old, samp, mask, mode="seq_mis", low=0.5, high=1.3)
    assert w[1].tolist() == [0.0] * 3


@pytest.mark.parametrize("kwargs, fragment", [
    ({"mode": "token_clip"}, "mode must be one of"),
    ({"cap": 0.0}, "cap > 0"),
    ({"low": 2.0, "high": 1.0}, "low <= high"),
])
def test_bad_arguments_are_named(kwargs, fragment):
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=fragment):
        rollout_correction(x, x, x.bool(), **kwargs)
    with pytest.raises(ValueError, match="same"):
        rollout_correction(x, torch.zeros(2, 3), x.bool())
