"""The tensors of a GRPO update: rollouts -> padded rows and completion windows; log-probs
of completions under a model; the policy-loss backward on one minibatch.

A row is prompt + completion (right-padded). Completion token j of row b is predicted by
the hidden state at position ``prompt_len_b − 1 + j``; those states are gathered into a
(B, Tc) window so ``fused_linear_grpo_loss`` sees completions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livethinking import ops
from livethinking.train.config import LossConfig
from livethinking.train.rollout import Rollout

__all__ = ["GRPOBatch", "build_batch", "completion_logprobs", "micro_batches",
           "micro_loss_scale", "policy_loss_backward", "rollout_routes", "router_disagreement",
           "trim"]


@dataclass(slots=True)
class GRPOBatch:
    input_ids: torch.Tensor  # (N, T) long, right-padded with 0
    window: torch.Tensor  # (N, Tc) long: position predicting completion token j
    targets: torch.Tensor  # (N, Tc) long: completion tokens (0 past the end)
    mask: torch.Tensor  # (N, Tc) float: 1 on completion tokens
    sampler_logprobs: torch.Tensor | None  # (N, Tc) float32 from the sampler, when all had them
    loss_positions: torch.Tensor  # (N, T) float: 1 at the positions predicting a completion token
    routed_experts: torch.Tensor | None = None  # (N, T, MoE layers, k) int32: to replay
    # (N, Tc) long: a multi-turn row's model turn per completion token (−1: environment);
    # the mask is then 0 between turns
    chunk_ids: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "GRPOBatch":
        pick = (lambda t: None if t is None else t[index])
        return GRPOBatch(self.input_ids[index], self.window[index], self.targets[index],
                         self.mask[index], pick(self.sampler_logprobs),
                         self.loss_positions[index], pick(self.routed_experts),
                         pick(self.chunk_ids))


def build_batch(rollouts: list[Rollout], device: torch.device) -> GRPOBatch:
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    steps = max(lengths)
    comp = max(1, max(len(r.completion_ids) for r in rollouts))
    n = len(rollouts)
    ids = torch.zeros(n, steps, dtype=torch.long)
    window = torch.zeros(n, comp, dtype=torch.long)
    targets = torch.zeros(n, comp, dtype=torch.long)
    mask = torch.zeros(n, comp)
    positions = torch.zeros(n, steps)
    have_logprobs = all(r.logprobs is not None for r in rollouts)
    sampler = torch.zeros(n, comp) if have_logprobs else None
    for b, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[b, :p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        window[b] = torch.clamp(torch.arange(comp) + p - 1, max=steps - 1)
        targets[b, :c] = torch.tensor(r.completion_ids, dtype=torch.long)
        mask[b, :c] = 1.0
        positions[b, p - 1:p - 1 + c] = 1.0
        if sampler is not None:
            sampler[b, :c] = torch.tensor(r.logprobs[:c])
    to = (lambda t: None if t is None else t.to(device))
    return GRPOBatch(ids.to(device), window.to(device), targets.to(device), mask.to(device),
                     to(sampler), positions.to(device))


def _window(hidden: torch.Tensor, batch: GRPOBatch) -> torch.Tensor:
    """(N, T, H) hidden states -> (N, Tc, H) at the positions predicting completion tokens."""
    return hidden.gather(1, batch.window[..., None].expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def completion_logprobs(model, batch: GRPOBatch, temperature: float, chunk: int = 8, *,
                        return_routes: bool = False, groups: list[list[int]] | None = None,
                        num_forwards: int = 0):
    """log softmax(logits / temperature) at each completion token, (N, Tc) fp32 (0 off-mask),
    replaying ``batch.routed_experts`` when set; with ``return_routes`` also the experts
    every MoE layer used, (N, T, layers, k). One forward per group of rows (``groups``,
    e.g. :func:`micro_batches`, padding trimmed; default: ``chunk`` rows at a time), and
    at least ``num_forwards`` forwards (the extra ones repeat the first group, their
    results unused: under FSDP every rank must forward as often)."""
    n, steps = batch.input_ids.shape
    device = batch.input_ids.device
    if groups is None:
        groups = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=device)
    routes = None
    for k in range(max(len(groups), num_forwards)):
        filler = k >= len(groups)
        index = torch.tensor(groups[0] if filler else groups[k], device=device)
        part = trim(batch.rows(index))

        def head(hidden, weight, part=part):
            window = _window(hidden, part)
            return ops.fused_linear_logprobs(window.reshape(-1, window.shape[-1]), weight,
                                             part.targets.reshape(-1), temperature=temperature)

        result = model.forward_hidden(part.input_ids, head=head, return_routes=return_routes,
                                      routed_experts=part.routed_experts)
        if filler:
            continue
        comp = part.targets.shape[1]
        out[index, :comp] = result.head_output.reshape(part.targets.shape) * part.mask
        if result.routed_experts is not None:
            used = result.routed_experts  # (rows, T_part, layers, k)
            if routes is None:
                routes = torch.zeros(n, steps, *used.shape[2:], dtype=used.dtype, device=device)
            routes[index, :used.shape[1]] = used
            routes[index, used.shape[1]:] = used[:, -1:]  # padding: any valid experts
    if return_routes:
        return out, routes
    return out


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of row indices whose padded size (rows × the longest row) stays
    within ``budget`` tokens; a row longer than the budget goes alone."""
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


def micro_loss_scale(loss_type: str, rows: int, tokens: float, total_rows: int,
                     total_tokens: float) -> float:
    """The factor that makes a microbatch's loss (computed on its own ``rows`` and
    ``tokens``) its share of the minibatch's: grpo and dr_grpo average over sequences
    (rows / total_rows), bnpo over tokens (tokens / total_tokens); dapo and cispo divide by
    ``num_items_in_batch``, which the caller sets to the minibatch's count (1)."""
    if loss_type in ("grpo", "dr_grpo"):
        return rows / max(total_rows, 1)
    if loss_type == "bnpo":
        return tokens / max(total_tokens, 1.0)
    return 1.0


def trim(batch: GRPOBatch) -> GRPOBatch:
    """``batch`` without the padding columns beyond its longest row (prompt + completion)
    and its longest completion (a completion ends at its last masked token: multi-turn
    rows have unmasked environment tokens inside)."""
    index = torch.arange(1, batch.mask.shape[1] + 1, device=batch.mask.device)
    completions = ((batch.mask > 0) * index).amax(-1).long()  # (N,)
    lengths = batch.window[:, 0] + 1 + completions  # prompt + completion per row
    steps = min(max(1, int(lengths.max())), batch.input_ids.shape[1])
    comp = max(1, int(completions.max()))
    cut = (lambda t, n: None if t is None else t[:, :n])
    return GRPOBatch(batch.input_ids[:, :steps], batch.window[:, :comp].clamp(max=steps - 1),
                     batch.targets[:, :comp], batch.mask[:, :comp],
                     cut(batch.sampler_logprobs, comp), batch.loss_positions[:, :steps],
                     cut(batch.routed_experts, steps), cut(batch.chunk_ids, comp))


def policy_loss_backward(model, batch: GRPOBatch, advantages: torch.Tensor, *,
                         old_logprobs, ref_logprobs, rollout_is_weights, loss: LossConfig,
                         temperature: float, max_completion_length: int,
                         num_items_in_batch: float | None = None,
                         aux_loss: bool = True, loss_scale: float = 1.0,
                         aux_scale: float = 1.0) -> dict[str, float]:
    """Backward of the GRPO-family loss (+ MoE balance loss over the completion tokens'
    positions, ``loss_positions``: no prompt, no padding) on one minibatch (or one
    microbatch of it: the policy loss is multiplied by ``loss_scale`` and the balance loss
    by ``aux_scale`` before the backward, and ``loss`` is the scaled value). With
    ``loss.credit == "chunk"`` the ratio and the normalisation are per model turn
    (``batch.chunk_ids``: importance_sampling_level and loss_type "chunk"). With
    ``batch.routed_experts`` the forward replays those experts, and
    ``router_disagreement`` is the fraction of (loss position, MoE layer) pairs whose own
    top-k set differs from the replayed one (``router_disagreement/{i}`` per layer)."""
    loss_type, level = loss.loss_type, loss.importance_sampling_level
    if loss.credit == "chunk":
        if batch.chunk_ids is None:
            raise ValueError("loss.credit chunk needs multi-turn rows (batch.chunk_ids)")
        loss_type = level = "chunk"

    def head(hidden, weight):
        return ops.fused_linear_grpo_loss(
            _window(hidden, batch), weight, batch.targets, batch.mask, advantages,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, temperature=temperature,
            beta=loss.beta, epsilon_low=loss.epsilon_low, epsilon_high=loss.epsilon_high,
            delta=loss.delta, loss_type=loss_type, importance_sampling_level=level,
            max_completion_length=max_completion_length, kl_estimator=loss.kl_estimator,
            rollout_is_weights=rollout_is_weights, num_items_in_batch=num_items_in_batch,
            chunk_ids=batch.chunk_ids)

    out = model.forward_hidden(batch.input_ids, head=head, token_mask=batch.loss_positions,
                               routed_experts=batch.routed_experts)
    value, stats = out.head_output
    total = value * loss_scale
    if aux_loss and out.weighted_aux_loss is not None:
        total = total + out.weighted_aux_loss * aux_scale
    total.backward()
    result = {"loss": float(value.detach()) * loss_scale}
    for key in ("entropy", "kl", "clip_ratio_region", "clip_ratio_low", "clip_ratio_high",
                "ratio"):
        if key in stats:
            result[key] = float(stats[key])
    if batch.routed_experts is not None:
        result |= router_disagreement(out.router_logits, batch.routed_experts,
                                      batch.loss_positions)
    return result


def rollout_routes(rollouts: list[Rollout], batch: GRPOBatch, layers: int, top_k: int,
                   own_routes) -> tuple[torch.Tensor, float]:
    """The sampler's experts for every row of ``batch``, (N, T, layers, k) int32, for
    routing replay (R3). A row needs p + c − 1 rows of routes (its last token and the
    padding influence no loss term; they repeat the last known row). Positions a sampler
    did not report take the trainer's own experts (``own_routes()``, (N, T, layers, k),
    computed once if needed); returns the routes and the fraction of needed positions so
    filled."""
    n, steps = batch.input_ids.shape
    out = torch.zeros(n, steps, layers, top_k, dtype=torch.int32)
    own, filled, needed = None, 0, 0
    for b, r in enumerate(rollouts):
        want = len(r.prompt_ids) + len(r.completion_ids) - 1
        needed += want
        got = 0
        if r.routed_experts is not None:
            routes = torch.as_tensor(r.routed_experts).reshape(-1, layers, top_k)
            got = min(want, routes.shape[0])
            out[b, :got] = routes[:got].int()
        if got < want:
            if own is None:
                own = own_routes().cpu()
            out[b, got:want] = own[b, got:want]
            filled += want - got
        last = max(want, 1)
        out[b, last:] = out[b, last - 1]
    return out.to(batch.input_ids.device), filled / max(needed, 1)


@torch.no_grad()
def router_disagreement(router_logits, routes: torch.Tensor, positions: torch.Tensor
                        ) -> dict[str, float]:
    """Per MoE layer i, the fraction of positions (weights ``positions`` (N, T)) where the
    router's own top-k set differs from ``routes[..., i, :]``; and their mean."""
    weight = positions.reshape(-1).float()
    total = weight.sum().clamp(min=1.0)
    k = routes.shape[-1]
    flat = routes.reshape(-1, routes.shape[-2], k).long()  # (N·T, layers, k)
    out = {}
    for i, logits in enumerate(router_logits):  # (N·T, E)
        own = logits.float().topk(k, dim=-1).indices.sort(-1).values
        differs = (own != flat[:, i].sort(-1).values).any(-1).float()
        out[f"router_disagreement/{i}"] = float((differs * weight).sum() / total)
    out["router_disagreement"] = sum(out.values()) / max(len(router_logits), 1)
    return out
