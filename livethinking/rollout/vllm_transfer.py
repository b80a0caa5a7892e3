"""The trainer's end of vLLM's native NCCL weight transfer, without importing vLLM.

vLLM's workers (``--weight-transfer-config '{"backend": "nccl"}'``) join the trainer in a
``StatelessProcessGroup``: a ``TCPStore`` hosted by the trainer (rank 0) at
``master_address:master_port`` for metadata, and an NCCL communicator for the data. Rank 0
creates the NCCL unique id and publishes it under the store key ``broadcast_from/0/0`` as
a pickled ``vllm.distributed.device_communicators.pynccl_wrapper.ncclUniqueId`` (a ctypes
struct of 128 ``c_byte``); every rank then calls ``ncclCommInitRank`` and all of them run
one warm-up all-reduce of a float32 ``zeros(1)``. Weights then come from rank 0 as
broadcasts of packed uint8 buffers (``packed: true``): tensors are appended in
``update_info`` order until the buffer holds more than ``packed_buffer_size_bytes``, so the
tensor that crosses the limit closes the buffer (vLLM's ``packed_tensor.py``; both sides
cut the same way from the names, dtypes and shapes alone).

vLLM's receiver views each tensor's bytes in place (``buffer.split(sizes)[i].view(dtype)``),
which fails unless the tensor starts at a multiple of its element size in the buffer:
:func:`aligned_order` sends the tensors widest element first, which guarantees that.

Here: :func:`pickled_unique_id` (the store value, written without vLLM's classes),
:func:`rendezvous_store`, :func:`aligned_order`, :func:`packed_chunks` and :func:`pack`,
and
:class:`NcclCommunicator` (``torch.cuda.nccl`` on the trainer's GPU).
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Iterable

import torch
from torch.distributed import TCPStore

__all__ = ["NCCL_UNIQUE_ID_BYTES", "UNIQUE_ID_KEY", "NcclCommunicator", "aligned_order", "pack",
           "packed_chunks", "pickled_unique_id", "rendezvous_store"]

NCCL_UNIQUE_ID_BYTES = 128
UNIQUE_ID_KEY = "broadcast_from/0/0"  # StatelessProcessGroup.broadcast_obj's first key
_UNIQUE_ID_CLASS = ("vllm.distributed.device_communicators.pynccl_wrapper", "ncclUniqueId")


def pickled_unique_id(raw: bytes) -> bytes:
    """The pickle vLLM's ranks load for the NCCL unique id ``raw`` (128 bytes): what
    ``pickle.dumps(ncclUniqueId)`` writes, ``_ctypes._unpickle(ncclUniqueId, ({}, raw))``,
    spelled out in protocol 3 opcodes so the class need not exist here."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"raw must be {NCCL_UNIQUE_ID_BYTES} bytes (an ncclUniqueId), got "
                         f"{len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw)}")
    module, name = _UNIQUE_ID_CLASS
    return (b"\x80\x03"                                   # PROTO 3
            + b"c_ctypes\n_unpickle\n"                    # GLOBAL _ctypes._unpickle
            + f"c{module}\n{name}\n".encode()             # GLOBAL the struct's class
            + b"}"                                        # EMPTY_DICT (its __dict__)
            + b"B" + struct.pack("<I", len(raw)) + bytes(raw)  # BINBYTES: its 128 bytes
            + b"\x86\x86R.")                              # TUPLE2 TUPLE2 REDUCE STOP


def rendezvous_store(master_address: str, master_port: int, world_size: int, *,
                     timeout_s: float = 600.0) -> TCPStore:
    """Host the group's store as rank 0 does in ``StatelessProcessGroup.create``; returns
    once all ``world_size - 1`` other ranks connected (or raises after ``timeout_s``)."""
    if not (isinstance(world_size, int) and world_size >= 2):
        raise ValueError(f"world_size must be an int >= 2, got {world_size!r}")
    if not (isinstance(master_port, int) and 0 < master_port < 65536):
        raise ValueError(f"master_port must be an int in [1, 65535], got {master_port!r}")
    return TCPStore(master_address, master_port, world_size, True,
                    timeout=datetime.timedelta(seconds=timeout_s), use_libuv=False)


def aligned_order(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """``named`` stably sorted by element size, widest first: element sizes are powers of
    two and every tensor's byte count a multiple of its own, so each tensor then starts at
    a multiple of its element size in any buffer cut from the sequence."""
    return sorted(named, key=lambda item: -item[1].element_size())


def packed_chunks(named: Iterable[tuple[str, torch.Tensor]], buffer_bytes: int
                  ) -> list[list[tuple[str, torch.Tensor]]]:
    """vLLM's packing: tensors in order, a chunk closed by the first tensor that takes it
    past ``buffer_bytes`` (so a chunk may exceed it by one tensor; none is empty)."""
    if buffer_bytes < 1:
        raise ValueError(f"buffer_bytes must be >= 1, got {buffer_bytes}")
    chunks: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in named:
        chunks[-1].append((name, t))
        size += t.numel() * t.element_size()
        if size > buffer_bytes:
            chunks.append([])
            size = 0
    return [c for c in chunks if c]


def pack(chunk: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The chunk's bytes end to end: ``cat(t.contiguous().view(uint8).view(-1))``."""
    # (sum of the tensors' bytes,) uint8
    return torch.cat([t.detach().contiguous().view(torch.uint8).view(-1) for _, t in chunk])


class NcclCommunicator:
    """Rank 0 of vLLM's weight-transfer group on the current CUDA device: publishes the
    unique id in ``store``, joins the NCCL communicator of ``world_size`` ranks and runs
    vLLM's warm-up all-reduce."""

    def __init__(self, store: TCPStore, world_size: int, device: torch.device) -> None:
        from torch.cuda import nccl

        if device.type != "cuda":
            raise ValueError("vLLM's NCCL weight transfer needs the policy on a CUDA "
                             f"device, got {device}; use rollout.weight_sync: disk")
        if not nccl.is_available([torch.empty(1, device=device)]):
            raise RuntimeError("this torch build has no NCCL")
        self._nccl, self.device = nccl, device
        uid = nccl.unique_id()
        store.set(UNIQUE_ID_KEY, pickled_unique_id(uid))
        with torch.cuda.device(device):
            self._comm = nccl.init_rank(world_size, uid, 0)
            warm = torch.zeros(1, dtype=torch.float32, device=device)
            nccl.all_reduce([warm], comms=[self._comm])
            torch.cuda.synchronize(device)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (on this device) to every rank; returns when it left."""
        with torch.cuda.device(self.device):
            self._nccl.broadcast([tensor], root=0, comms=[self._comm])
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._comm = None
