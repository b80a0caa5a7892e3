"""Moving weights from a trainer to rollout servers over ``torch.distributed``: the process
group both sides join, and the broadcast of named tensors (one by one or as one flat
bucket), in SGLang's conventions so a trainer drives SGLang servers and ours alike.

The group: ``world_size`` processes rendezvous at ``tcp://master_address:master_port``
(the trainer, rank 0, hosts the store) under a store prefix ``group_name``; it exists
beside any default process group (a server has none), gloo on CPU, NCCL on GPU.
Tensors always come from rank 0. A flattened bucket is the tensors' bytes concatenated
in order (each ``t.contiguous().view(uint8)``), broadcast as one uint8 tensor and cut
back by (dtype, shape) on the receiving side, as SGLang's ``FlattenedTensorBucket``.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

__all__ = ["BACKENDS", "broadcast_tensors", "bucket_nbytes", "destroy_transfer_group",
           "flatten_bucket", "new_transfer_group", "parse_dtype", "receive_tensors",
           "unflatten_bucket"]

BACKENDS = ("gloo", "nccl")


def new_transfer_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                       group_name: str, backend: str, timeout_s: float = 600.0):
    """Join (rank 0: host) the transfer group; blocks until all ``world_size`` joined."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not (isinstance(world_size, int) and world_size >= 2):
        raise ValueError(f"world_size must be an int >= 2, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if not (isinstance(master_port, int) and 0 < master_port < 65536):
        raise ValueError(f"master_port must be an int in [1, 65535], got {master_port!r}")
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                       world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store,
                                              group_name=group_name, backend_options=None,
                                              timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_transfer_group(group) -> None:
    """Leave and free a group made by :func:`new_transfer_group`."""
    dist.destroy_process_group(group)


def parse_dtype(name) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16`` (floating types only)."""
    text = str(name).removeprefix("torch.")
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must name a floating-point torch dtype, got {name!r}")
    return dtype


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, concatenated in order: (Σ nbytes,) uint8."""
    if not tensors:
        raise ValueError("a bucket needs at least one tensor")
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unflatten_bucket(flat: torch.Tensor, dtypes: Sequence[torch.dtype],
                     shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Cut a :func:`flatten_bucket` tensor back into tensors (views of ``flat`` where
    the bytes are aligned for the dtype, copies where they are not)."""
    needed = bucket_nbytes(dtypes, shapes)
    if needed != flat.numel():
        raise ValueError(f"the bucket holds {flat.numel()} bytes; the tensors need {needed}")
    out, start = [], 0
    for dtype, shape in zip(dtypes, shapes):
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * size
        piece = flat[start:start + nbytes]
        if start % size:  # after an odd-sized tensor: a dtype view needs aligned bytes
            piece = piece.clone()
        out.append(piece.view(dtype).reshape(tuple(shape)))
        start += nbytes
    return out


def bucket_nbytes(dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]) -> int:
    """Bytes a flat bucket of these tensors holds."""
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
               for d, s in zip(dtypes, shapes))


def broadcast_tensors(group, tensors: Sequence[torch.Tensor], *, flattened: bool) -> None:
    """Rank 0's side: send ``tensors`` to every rank (one flat bucket when ``flattened``)."""
    if flattened:
        dist.broadcast(flatten_bucket(tensors), src=0, group=group)
        return
    for t in tensors:
        dist.broadcast(t.detach().contiguous(), src=0, group=group)


def receive_tensors(group, dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]], *,
                    device, flattened: bool) -> list[torch.Tensor]:
    """A receiving rank's side of :func:`broadcast_tensors`: fresh tensors on ``device``."""
    if flattened:
        flat = torch.empty(bucket_nbytes(dtypes, shapes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        return unflatten_bucket(flat, dtypes, shapes)
    out = []
    for dtype, shape in zip(dtypes, shapes):
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.broadcast(t, src=0, group=group)
        out.append(t)
    return out
