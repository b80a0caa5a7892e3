"""Data parallelism with FSDP2 (``fully_shard``) under torchrun: NCCL on GPUs, gloo on CPU.

Each decoder layer and then the whole model are sharded over a 1-D device mesh;
``forward_hidden`` is registered as an FSDP forward method, so parameters (the lm_head
used by a loss ``head`` included) are gathered for it and gradients are reduce-scattered
(averaged over ranks) after backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistributedContext", "all_gather_rows", "all_reduce_max", "all_reduce_min",
           "all_reduce_sum", "barrier", "broadcast_from_main", "end_distributed",
           "copy_into_unsharded", "full_state_dict", "init_distributed", "shard_model"]


@dataclass(slots=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    mesh: object = None
    owns_group: bool = False  # init_distributed created the process group (so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), mesh, owns_group)


def end_distributed(context: DistributedContext) -> None:
    """After a run's last collective, on success only (every rank calls it): wait for all
    ranks, then destroy the process group init_distributed created. On an error it is not
    called: a rank waiting here for a failed peer would hang.

    Destroying is not enough: the device mesh (held by the context and by FSDP's state in
    the model) keeps the gloo group object alive, and destructed at interpreter shutdown
    its worker threads abort the process now and then (SIGABRT, "terminate called without
    an active exception") after a successful run. So the context drops its mesh, and a
    garbage collection at exit (``atexit``: the run's locals are gone, the interpreter is
    still whole) frees whatever else still points at the group."""
    if not context.owns_group:
        return
    import atexit
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    context.mesh = None
    gc.collect()
    atexit.unregister(gc.collect)  # once, however many runs this process made
    atexit.register(gc.collect)


def shard_model(model, context: DistributedContext, *,
                param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> None:
    """Shard each decoder layer, then the rest, over the mesh (FSDP2 ``fully_shard``).

    ``param_dtype`` (bf16 or fp16; as torchtitan does): the sharded parameters become fp32
    — they are the optimizer's masters, so no separate master copy exists — and
    ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`` gathers them in
    ``param_dtype`` for compute and reduce-scatters gradients in fp32. Each layer is cast
    just before it is sharded, so at most one layer is ever held whole in fp32.
    ``cpu_offload``: the shards live in CPU memory (``CPUOffloadPolicy``, pinned on CUDA)
    and are copied to the device for each layer's forward (the frozen reference model)."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    policy, offload = {}, {}
    if param_dtype is not None and param_dtype != torch.float32:
        policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype,
                                                    reduce_dtype=torch.float32)}
    if cpu_offload:
        offload = {"offload_policy": CPUOffloadPolicy(
            pin_memory=context.mesh.device_type == "cuda")}

    def to_fp32(module) -> None:
        for param in module.parameters():
            if policy and not hasattr(param, "placements") and param.is_floating_point():
                param.data = param.data.float()

    for layer in model.model.layers:
        to_fp32(layer)
        fully_shard(layer, mesh=context.mesh, **policy, **offload)
    to_fp32(model)  # what is left: embeddings, final norm, lm_head
    fully_shard(model, mesh=context.mesh, **policy, **offload)
    register_fsdp_forward_method(model, "forward_hidden")


def reshard(model) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state. FSDP2 keeps the root
    module's parameters unsharded after a forward until a backward reshards them, so after
    forwards that no backward follows (no-grad log-probs) they stay whole in memory, and
    ``model.parameters()`` then yields the unsharded tensors: an optimizer built at that
    point (DPO computes its reference log-probs before the optimizer exists) held the
    wrong tensors (measured: a 2-rank DPO step's grad norm 1.65 against one process's
    6.97). A model without FSDP is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _all_reduce(values: list[float], context: DistributedContext, op: str) -> list[float]:
    if context.world_size == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    return _all_reduce(values, context, "SUM")


def all_reduce_max(values: list[float], context: DistributedContext) -> list[float]:
    return _all_reduce(values, context, "MAX")


def all_reduce_min(values: list[float], context: DistributedContext) -> list[float]:
    return _all_reduce(values, context, "MIN")


def all_gather_rows(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Every rank's (n, ...) tensor (the same n on each) stacked in rank order: (world·n, ...)
    on every rank (a collective). A single process gets its own tensor back."""
    if context.world_size == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_from_main(value, context: DistributedContext):
    """Rank 0's ``value`` (any picklable object) on every rank (a collective); other ranks'
    ``value`` is ignored. A single process gets its own value back."""
    if context.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if context.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def full_state_dict(model, context: DistributedContext, *, all_ranks: bool = False,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective: every rank must call it): on rank 0 only, on
    the CPU, by default; on every rank, on the device, with ``all_ranks``. ``dtype``:
    floating tensors cast to it (fp32 masters exported in the run's dtype)."""
    if context.world_size == 1:
        state = model.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=not all_ranks))
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


@torch.no_grad()
def copy_into_unsharded(sharded, copy) -> None:
    """Copy the parameters of an FSDP2-sharded model into an unsharded copy of the same
    architecture (every rank calls this: a collective per tensor, in the same order), one
    tensor at a time: each is all-gathered, copied (cast to the copy's dtype) and dropped,
    so the memory beyond the copy is one parameter, never a full state dict."""
    targets = dict(copy.named_parameters())
    for name, param in sharded.named_parameters():
        targets[name].copy_(param.full_tensor() if hasattr(param, "full_tensor") else param)
