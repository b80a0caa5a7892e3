"""A stand-in for a vLLM server in weight-transfer mode, written from vLLM's sources, for
tests on CPU (vLLM itself needs GPUs and is never imported here):

- the routes of ``vllm/entrypoints/serve/dev/rlhf/api_router.py`` the trainer uses
  (``/get_world_size``, ``/init_weight_transfer_engine``, ``/start_weight_update``,
  ``/update_weights``, ``/finish_weight_update``, ``/pause?mode=``, ``/resume``,
  ``/weight_info``) in front of our engine, whose ``/v1/completions`` (vLLM's shape with
  ``return_token_ids``) does the sampling;
- the worker's side of the NCCL engine's rendezvous as ``StatelessProcessGroup`` does it:
  a ``TCPStore`` client, the unique id read from ``broadcast_from/0/0`` and unpickled as
  ``vllm...pynccl_wrapper.ncclUniqueId`` (a stand-in module holds that class);
- packed receiving as ``packed_nccl_broadcast_consumer`` cuts the buffers (from the
  names, dtypes and shapes, a buffer closed once it holds more than
  ``packed_buffer_size_bytes``), and the disk engine's ``update_info: {path}``.

The data plane is the one thing replaced: NCCL needs GPUs, so both ends broadcast over a
gloo group built on the same store (:class:`GlooCommunicator` is the trainer's end).
"""

from __future__ import annotations

import ctypes
import datetime
import math
import pickle
import sys
import threading
import types
from pathlib import Path

import torch
import torch.distributed as dist
from fastapi import APIRouter, Body, HTTPException, Query
from safetensors.torch import load_file

from livethinking.engine.weight_update import WeightLoader
from livethinking.rollout.vllm_transfer import UNIQUE_ID_KEY, pickled_unique_id

VLLM_NCCL_MODULE = "vllm.distributed.device_communicators.pynccl_wrapper"


class ncclUniqueId(ctypes.Structure):  # noqa: N801 - vLLM's spelling
    _fields_ = [("internal", ctypes.c_byte * 128)]


def install_vllm_unique_id_class() -> None:
    """Make ``vllm.distributed.device_communicators.pynccl_wrapper.ncclUniqueId`` importable
    (only that class), as a vLLM worker's unpickler finds it."""
    parts = VLLM_NCCL_MODULE.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        sys.modules.setdefault(name, types.ModuleType(name))
    ncclUniqueId.__module__ = VLLM_NCCL_MODULE
    sys.modules[VLLM_NCCL_MODULE].ncclUniqueId = ncclUniqueId


def _gloo(store, rank: int, world: int):
    return dist.ProcessGroupGloo(dist.PrefixStore("test-data-plane", store), rank, world,
                                 datetime.timedelta(seconds=120))


class GlooCommunicator:
    """The trainer's end in tests: publishes a unique id as vLLM's rank 0 does, then
    broadcasts over gloo on the rendezvous store (and runs vLLM's warm-up all-reduce)."""

    def __init__(self, store, world_size: int, device) -> None:
        self.unique_id = bytes(torch.randint(0, 256, (128,), dtype=torch.uint8).tolist())
        store.set(UNIQUE_ID_KEY, pickled_unique_id(self.unique_id))
        self.group = _gloo(store, 0, world_size)
        self.group.allreduce([torch.zeros(1)]).wait()
        self.sent = 0

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()
        self.sent += 1

    def close(self) -> None:
        self.group = None


def consumer_cuts(names, dtypes, shapes, buffer_bytes):
    """vLLM's consumer: (name, shape, dtype, nbytes) lists, one per packed buffer."""
    cuts, current, size = [], [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        nbytes = math.prod(shape) * dtype.itemsize
        current.append((name, shape, dtype, nbytes))
        size += nbytes
        if size > buffer_bytes:
            cuts.append(current)
            current, size = [], 0
    if current:
        cuts.append(current)
    return cuts


class FakeVllm:
    """vLLM's weight-transfer routes over ``engine`` (an ``AsyncEngine``); ``calls``
    records the control-plane calls in order."""

    def __init__(self, engine, *, backend: str, world_size: int = 1) -> None:
        install_vllm_unique_id_class()
        self.engine, self.backend, self.world_size = engine, backend, world_size
        self.loader = WeightLoader(engine.engine.model)
        self.version: str | None = None
        self.calls: list[str] = []
        self.unique_ids: list[bytes] = []
        self.group = None
        self.store = None
        self.updating = False
        self.paused = False
        self.lock = threading.Lock()

    def router(self) -> APIRouter:
        r = APIRouter()

        @r.get("/get_world_size")
        def get_world_size(include_dp: bool = Query(True)):
            return {"world_size": self.world_size}

        @r.post("/init_weight_transfer_engine")
        def init(body: dict = Body(...)):
            info = body.get("init_info")
            if info is None:
                raise HTTPException(400, "Missing 'init_info' in request body")
            self.calls.append("init")
            if self.backend == "nccl":
                self._join(**info)
            elif info:
                raise HTTPException(400, f"Invalid init_info for disk: {info}")
            return {"message": "Weight transfer initialized"}

        @r.post("/start_weight_update")
        def start(body: dict = Body(default={})):
            if self.updating:
                raise HTTPException(500, "A weight update is already active")
            self.updating = True
            self.calls.append("start")
            return {"message": "Weight update started"}

        @r.post("/update_weights")
        async def update(body: dict = Body(...)):
            info = body.get("update_info")
            if info is None:
                raise HTTPException(400, "Missing 'update_info' in request body")
            if not self.updating:
                raise HTTPException(500, "start_weight_update must be called first")
            self.calls.append("update")
            named = await self._blocking(self._receive, info)
            await self.engine.call(lambda e: (self.loader.load_(named),
                                              e.reset_prefix_cache()))
            return {"message": "Weights updated"}

        @r.post("/finish_weight_update")
        def finish(weight_version: str | None = Body(None, embed=True)):
            self.updating = False
            self.calls.append("finish")
            if weight_version is not None:
                self.version = weight_version
            return {"message": "Weight update finished"}

        @r.post("/pause")
        def pause(mode: str = Query("abort")):
            if mode not in ("abort", "wait", "keep"):
                raise HTTPException(422, f"mode must be abort, wait or keep, got {mode!r}")
            self.paused = True
            self.calls.append(f"pause:{mode}")
            return {"status": "paused"}

        @r.post("/resume")
        def resume():
            self.paused = False
            self.calls.append("resume")
            return {"status": "resumed"}

        @r.get("/weight_info")
        def weight_info():
            return {"weight_version": self.version}

        return r

    async def _blocking(self, fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _join(self, master_address, master_port, rank_offset, world_size):
        rank = rank_offset  # one worker: worker_rank 0
        self.store = dist.TCPStore(master_address, master_port, world_size, False,
                                   timeout=datetime.timedelta(seconds=120), use_libuv=False)
        loaded = pickle.loads(self.store.get(UNIQUE_ID_KEY))
        assert type(loaded).__module__ == VLLM_NCCL_MODULE, type(loaded)
        self.unique_ids.append(bytes(bytearray(b & 0xFF for b in loaded.internal)))
        self.group = _gloo(self.store, rank, world_size)
        self.group.allreduce([torch.zeros(1)]).wait()

    def _receive(self, info: dict) -> list[tuple[str, torch.Tensor]]:
        if self.backend == "disk":
            path = Path(info["path"])
            if not (path.is_absolute() and path.is_dir()):
                raise HTTPException(400, "`path` must be an absolute local directory")
            named: list[tuple[str, torch.Tensor]] = []
            for file in sorted(path.glob("*.safetensors")):
                named.extend(load_file(file).items())
            return named
        if not info.get("packed"):
            raise HTTPException(400, "this stand-in receives packed updates only")
        dtypes = [getattr(torch, d) for d in info["dtype_names"]]
        named = []
        for cut in consumer_cuts(info["names"], dtypes, info["shapes"],
                                 info["packed_buffer_size_bytes"]):
            buffer = torch.empty(sum(c[3] for c in cut), dtype=torch.uint8)
            self.group.broadcast(buffer, 0).wait()
            for (name, shape, dtype, _), part in zip(cut, buffer.split([c[3] for c in cut])):
                named.append((name, part.contiguous().view(dtype).view(*shape).clone()))
        return named
