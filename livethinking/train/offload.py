"""A frozen model's decoder layers kept in CPU memory, on the device only while each runs.

For the GRPO reference model (``loss.reference_offload``) in one process: the reference
takes no gradients, so swapping its tensors' storage is safe. Under torchrun the trainer
uses FSDP2's ``CPUOffloadPolicy`` on the sharded reference instead (`shard_model`).
"""

from __future__ import annotations

import torch

__all__ = ["offload_layers"]


def offload_layers(model, device: torch.device) -> int:
    """Keep ``model``'s decoder-layer parameters on the CPU (pinned when ``device`` is
    CUDA) and everything else (embeddings, final norm, lm_head, buffers) on ``device``; a
    forward pre-hook on each layer copies its parameters to ``device`` and a forward hook
    drops that copy, so at most one layer's weights are on the device at a time. The
    copies are synchronous (no prefetch): a reference forward costs one host-to-device
    transfer of the layers' weights. For frozen models only. Returns the bytes kept off
    the device."""
    device = torch.device(device)
    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if id(tensor) not in in_layers:
                tensor.data = tensor.data.to(device)
    pin = device.type == "cuda"
    kept = 0
    for layer in layers:
        stored = []
        for param in layer.parameters():
            if param.requires_grad:
                raise ValueError("offload_layers is for frozen models: call "
                                 "requires_grad_(False) first")
            host = param.data.to("cpu")
            param.data = host.pin_memory() if pin else host
            stored.append((param, param.data))
            kept += host.numel() * host.element_size()

        def bring(module, args, stored=stored):
            for param, host in stored:
                param.data = host.to(device, non_blocking=True, copy=True)

        def drop(module, args, output, stored=stored):
            for param, host in stored:
                param.data = host

        layer.register_forward_pre_hook(bring)
        layer.register_forward_hook(drop)
    return kept
