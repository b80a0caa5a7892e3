"""The MoE load-balancing loss counts only the trained tokens: against transformers'
``load_balancing_loss_func`` with an attention mask, in the model and in the SFT and GRPO
steps (the same router logits fed to both)."""

import pytest
import torch

from livethinking.model import CausalLM
from livethinking.model.model import load_balancing_loss

qwen3_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")


def _theirs(router_logits, config, mask=None):
    return qwen3_moe.load_balancing_loss_func(tuple(router_logits), config.num_experts,
                                              config.num_experts_per_tok, attention_mask=mask)


def test_masked_balance_loss_equals_transformers(tiny_checkpoint, generator):
    model = CausalLM.from_pretrained(tiny_checkpoint)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=generator)
    mask = torch.ones(3, 11)
    mask[0, 7:] = 0  # right padding
    mask[1, :4] = 0  # a prompt
    mask[2, 1::2] = 0
    out = model.forward_hidden(ids, token_mask=mask)
    theirs = _theirs(out.router_logits, config, mask)
    assert torch.allclose(out.aux_loss, theirs, rtol=1e-6, atol=1e-7)
    assert torch.allclose(load_balancing_loss(out.router_logits, config.num_experts,
                                              config.num_experts_per_tok, mask), theirs,
                          rtol=1e-6, atol=1e-7)
    unmasked = model.forward_hidden(ids).aux_loss
    assert torch.allclose(unmasked, _theirs(out.router_logits, config), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(unmasked, theirs)  # the mask matters on this input
    with pytest.raises(ValueError, match="token_mask must have input_ids' shape"):
        model.forward_hidden(ids, token_mask=mask[:, :5])


def _capture_forwards(model, monkeypatch):
    """Record (token_mask, output) of every forward_hidden call."""
    calls = []
    original = model.forward_hidden

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs.get("token_mask"), out))
        return out

    monkeypatch.setattr(model, "forward_hidden", spy)
    return calls


def test_sft_step_balance_loss_counts_response_tokens_only(tiny_checkpoint, monkeypatch):
    from livethinking.train.packing import pack_examples
    from livethinking.train.sft import sft_step

    model = CausalLM.from_pretrained(tiny_checkpoint).train()
    examples = [([5, 6, 7, 8, 9], [10, 11]), ([12, 13, 14], [15, 16, 17])]
    rows, _ = pack_examples(examples, 24)  # one row: two documents and padding
    (row,) = rows
    calls = _capture_forwards(model, monkeypatch)
    stats = sft_step(model, rows, torch.device("cpu"))
    (_, out), = calls
    theirs = _theirs(out.router_logits, model.config, row.loss_mask[None].float())
    assert stats["aux_loss"] == pytest.approx(float(theirs.detach()), rel=1e-6)
    unmasked = _theirs(out.router_logits, model.config).detach()
    assert stats["aux_loss"] != pytest.approx(float(unmasked), rel=1e-6)


def test_grpo_step_balance_loss_counts_completion_tokens_only(tiny_checkpoint, monkeypatch):
    from livethinking.data import LivestreamRecord
    from livethinking.train.config import LossConfig
    from livethinking.train.grpo_step import build_batch, policy_loss_backward
    from livethinking.train.rollout import Rollout

    model = CausalLM.from_pretrained(tiny_checkpoint).train()
    record = LivestreamRecord(id="r", product_doc="doc", history=[], question="q")
    shapes = [([3, 4, 5, 6], [7, 8]), ([3, 4], [9, 10, 11, 12, 13]), ([3, 4, 5], [14])]
    batch = build_batch([Rollout(record, p, c, "", None) for p, c in shapes],
                        torch.device("cpu"))
    expected = torch.zeros(batch.input_ids.shape)
    for b, (p, c) in enumerate(shapes):  # the positions predicting completion tokens
        expected[b, len(p) - 1:len(p) - 1 + len(c)] = 1
    assert torch.equal(batch.loss_positions, expected)
    calls = _capture_forwards(model, monkeypatch)
    policy_loss_backward(model, batch, torch.tensor([1.0, -1.0, 0.5]), old_logprobs=None,
                         ref_logprobs=None, rollout_is_weights=None, loss=LossConfig(),
                         temperature=1.0, max_completion_length=8)
    (_, out), = calls
    theirs = _theirs(out.router_logits, model.config, expected)
    assert torch.allclose(out.aux_loss, theirs, rtol=1e-6, atol=1e-7)
