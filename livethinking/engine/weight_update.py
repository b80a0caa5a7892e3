"""Weights into a live model in place: what a rollout server does when the trainer pushes.

Names are transformers' (a Qwen3 / Qwen3-MoE checkpoint's keys): a model parameter's own
name (fused experts ``<layer>.mlp.experts.gate_up_proj`` (E, 2I, H) and ``.down_proj``
(E, H, I)), a tied alias (``lm_head.weight`` when the embeddings are tied), or one
expert's projection as on disk (``<layer>.mlp.experts.<e>.gate_proj.weight`` (I, H) =
rows [0, I) of ``gate_up_proj[e]``, ``up_proj`` rows [I, 2I), ``down_proj`` =
``down_proj[e]``). Loading copies into the existing parameters (``Tensor.copy_``: the
storage, and so the engine's CUDA graphs and the trainer's shared references, stay
valid; the dtype is cast to the parameter's) after every name and shape of the batch was
checked, so a bad batch changes nothing. A copy bumps the parameters' version counters,
which is how `LLMEngine` notices new weights and empties its prefix cache.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import torch

__all__ = ["WeightLoader", "hf_named_tensors", "hf_state_items", "weights_checksum"]

_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class WeightLoader:
    """Copies named tensors into ``model``'s parameters in place (names: the module doc)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        # every name, tied aliases included, -> the parameter it names
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def destination(self, name: str) -> torch.Tensor:
        """The parameter, or the slice of a fused expert parameter, that ``name`` fills;
        ValueError naming ``name`` when the model has nothing by that name."""
        if not isinstance(name, str):
            raise ValueError(f"a weight name must be a string, got {name!r}")
        param = self.params.get(name)
        if param is not None:
            return param
        m = _EXPERT_KEY.match(name)
        if m is not None:
            prefix, expert, proj = m[1], int(m[2]), m[3]
            kind = "down_proj" if proj == "down_proj" else "gate_up_proj"
            fused = self.params.get(f"{prefix}.{kind}")
            if fused is not None and expert < fused.shape[0]:
                if proj == "down_proj":
                    return fused[expert]
                half = fused.shape[1] // 2
                return fused[expert, :half] if proj == "gate_proj" else fused[expert, half:]
        raise ValueError(f"the model has no weight named {name!r}")

    def load_(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy every ``(name, tensor)`` into the model; returns how many were copied.
        Everything is checked first (a known name, the destination's shape, a floating
        tensor); nothing is written when any check fails."""
        plan = []
        for name, tensor in named:
            dest = self.destination(name)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise ValueError(f"weight {name!r} must be a floating-point tensor, got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}; the model's "
                                 f"is {tuple(dest.shape)}")
            plan.append((dest, tensor))
        with torch.no_grad():
            for dest, tensor in plan:
                dest.copy_(tensor)
        return len(plan)

    def unique_names(self) -> list[str]:
        """One name per parameter tensor (tied aliases once), in the model's order."""
        return list(dict(self.model.named_parameters()))


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s parameters under the checkpoint's on-disk names (one tensor per expert
    and projection, tied ``lm_head.weight`` left out), as detached views: what a trainer
    sends a server that loads transformers' names (ours, SGLang, vLLM)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return hf_state_items(model.named_parameters(), tie_word_embeddings=tied)


def hf_state_items(items: Iterable[tuple[str, torch.Tensor]], *, tie_word_embeddings: bool
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`hf_named_tensors` of ``(name, tensor)`` pairs in our names (a state dict's
    items, e.g. gathered from FSDP shards)."""
    for name, tensor in items:
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        t = tensor.detach()
        m = _FUSED_KEY.match(name)
        if m is None:
            yield name, t
        elif m[2] == "down_proj":
            for e in range(t.shape[0]):
                yield f"{m[1]}.{e}.down_proj.weight", t[e]
        else:
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{m[1]}.{e}.gate_proj.weight", t[e, :half]
                yield f"{m[1]}.{e}.up_proj.weight", t[e, half:]


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every parameter (tied ones once), in
    the model's order: equal on two processes exactly when their weights are bit-equal."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        t = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
