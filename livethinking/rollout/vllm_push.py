"""Pushing the trainer's weights to vLLM servers through vLLM's native weight-transfer API
(``vllm serve ... --weight-transfer-config '{"backend": "nccl" | "disk"}'`` with
``VLLM_SERVER_DEV_MODE=1``; routes of ``vllm/entrypoints/serve/dev/rlhf/api_router.py``).

The group (``distributed``, NCCL only: vLLM has no CPU transport): the trainer is rank 0;
each server's workers take the next ``GET /get_world_size`` ranks (``rank_offset``, in
pool order); ``POST /init_weight_transfer_engine {init_info: {master_address,
master_port, rank_offset, world_size}}`` to every server while rank 0 hosts the store and
joins the NCCL communicator (:mod:`livethinking.rollout.vllm_transfer`). ``disk``: the
weights are written as a safetensors checkpoint directory and every server loads it
(``init_info: {}``; ``update_info: {path}``).

One push, to the servers that answer ``/health``: the pool stops sending them requests
and waits for this client's in-flight ones (:meth:`ServerPool.updating`); ``POST
/pause?mode=wait`` (other clients' running requests finish on the old weights), ``POST
/start_weight_update``, ``POST /update_weights {update_info: {names, dtype_names, shapes,
packed: true, packed_buffer_size_bytes, packed_num_buffers}}`` while rank 0 broadcasts
the packed buffers, ``POST /finish_weight_update {weight_version}``, ``POST /resume``.
vLLM has no route to leave the group: a rebuilt group re-initialises the servers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import torch

from livethinking.rollout.vllm_transfer import (NcclCommunicator, aligned_order, pack,
                                                packed_chunks, rendezvous_store)
from livethinking.rollout.weight_push import WeightPusher, _free_port

__all__ = ["VllmWeightPusher"]

PACKED_NUM_BUFFERS = 2  # vLLM's default; the receiver's double buffering


@dataclass(kw_only=True, slots=True)
class VllmWeightPusher(WeightPusher):
    """Rank 0's side of weight sync with the vLLM servers of ``pool``. ``communicator``
    builds the data plane from (store, world size, device): NCCL by default."""

    communicator: Callable[..., object] = NcclCommunicator
    _store: object = field(default=None, init=False)

    def _push_disk(self, named, version, save) -> tuple[int, list[str]]:
        if save is None:
            raise ValueError("disk weight sync needs save(path)")
        path = Path(save(Path(self.disk_dir) / "weights")).resolve()
        self._check_members()
        servers = self.pool.healthy_urls()
        if not servers:
            raise RuntimeError("no rollout server is up")
        fresh = [url for url in servers if url not in self._members]
        self._each(fresh, lambda url: self.pool.post(
            url, "/init_weight_transfer_engine", {"init_info": {}}, timeout=self.timeout_s))
        self._members = servers
        self._update(servers, version, {"path": str(path)})
        return sum(t.numel() * t.element_size() for _, t in named), servers

    def _push_distributed(self, named, version) -> tuple[int, list[str]]:
        device = named[0][1].device
        if device.type != "cuda" and self.communicator is NcclCommunicator:
            raise ValueError("vLLM's weight transfer over NCCL needs the policy on a CUDA "
                             f"device, got {device}; use rollout.weight_sync: disk")
        self._check_members()
        if self._group is None or self._members != self.pool.healthy_urls() \
                or device != self._device:
            self._rebuild(device)
        named = aligned_order(named)  # vLLM views each tensor in place in its buffer
        chunks = packed_chunks(named, self.bucket_bytes)
        info = {"names": [n for n, _ in named],
                "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "packed": True,
                "packed_buffer_size_bytes": self.bucket_bytes,
                "packed_num_buffers": PACKED_NUM_BUFFERS}

        def send():
            for chunk in chunks:
                self._group.broadcast(pack(chunk))

        self._update(self._members, version, info, while_running=send)
        return sum(t.numel() * t.element_size() for _, t in named), list(self._members)

    def _update(self, urls: list[str], version: str, update_info: dict, *,
                while_running=None) -> None:
        """One update cycle on ``urls``, held away from new requests (see the module)."""
        post = self.pool.post
        with self.pool.updating(urls):
            self._each(urls, lambda url: post(url, "/pause?mode=wait", {},
                                              timeout=self.timeout_s))
            try:
                self._each(urls, lambda url: post(url, "/start_weight_update",
                                                  {"is_checkpoint_format": True},
                                                  timeout=self.timeout_s))
                self._each(urls, lambda url: post(url, "/update_weights",
                                                  {"update_info": update_info},
                                                  timeout=self.timeout_s),
                           while_running=while_running)
                self._each(urls, lambda url: post(url, "/finish_weight_update",
                                                  {"weight_version": version},
                                                  timeout=self.timeout_s))
            finally:
                for url in urls:
                    try:
                        post(url, "/resume", {}, timeout=60.0)
                    except httpx2.HTTPError:
                        self.pool.mark_down(url)
            for url in urls:
                self.pool.set_version(url, version)

    def _rebuild(self, device: torch.device) -> None:
        self._drop_group()
        members = self.pool.healthy_urls()
        if not members:
            raise RuntimeError("no rollout server is up")
        sizes = [int(self.pool.get(url, "/get_world_size")["world_size"]) for url in members]
        offsets = [1 + sum(sizes[:i]) for i in range(len(members))]
        world = 1 + sum(sizes)
        port = self.master_port or _free_port(self.master_address)
        holder: dict = {}

        def join():
            holder["store"] = rendezvous_store(self.master_address, port, world,
                                               timeout_s=self.timeout_s)
            holder["group"] = self.communicator(holder["store"], world, device)

        self._each(members, lambda url: self.pool.post(url, "/init_weight_transfer_engine", {
            "init_info": {"master_address": self.master_address, "master_port": port,
                          "rank_offset": offsets[members.index(url)], "world_size": world}},
            timeout=self.timeout_s), while_running=join)
        self._store, self._group = holder["store"], holder["group"]
        self._members, self._device = members, device

    def _drop_group(self) -> None:
        if self._group is not None:
            close = getattr(self._group, "close", None)
            if close is not None:
                close()
        self._group, self._store, self._members = None, None, []
