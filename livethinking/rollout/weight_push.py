"""Pushing the trainer's weights to the rollout servers after each optimizer step, with
SGLang's endpoints (ours speak them too).

``distributed``: the trainer (rank 0) and the servers (ranks 1..n, in pool order) form one
process group (``/init_weights_update_group``; gloo for CPU tensors, NCCL for CUDA ones);
each push sends the weights in flat buckets of at most ``bucket_bytes`` (a tensor larger
than a bucket goes alone): for each bucket every server is told its names, dtypes and
shapes (``/update_weights_from_distributed``, ``load_format: flattened_bucket``) while
rank 0 broadcasts it; the last bucket carries the new ``weight_version``. ``disk``: the
weights are written as a safetensors checkpoint (atomically) and every server loads it
(``/update_weights_from_disk``); the path must be readable by the servers.

A server that is down is dropped: before each push the group is rebuilt over the servers
that answer ``/health`` whenever that set changed, and a push that fails part-way is
retried once over the servers still up. Names are transformers' (one tensor per expert),
which every server kind loads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import torch

from livethinking.engine.weight_transfer import (broadcast_tensors, destroy_transfer_group,
                                                 new_transfer_group)
from livethinking.rollout.servers import ServerPool

__all__ = ["PushResult", "WeightPusher", "buckets"]


@dataclass(slots=True)
class PushResult:
    """What one push did: seconds, bytes sent per server, and the servers that got it."""

    seconds: float
    nbytes: int
    servers: list[str]

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9) / 1e9


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``bucket_bytes`` bytes (an oversized tensor alone)."""
    out: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += nbytes
    return [b for b in out if b]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass(kw_only=True, slots=True)
class WeightPusher:
    """Rank 0's side of weight sync with the servers of ``pool``."""

    pool: ServerPool
    mode: str = "distributed"  # or "disk"
    bucket_bytes: int = 512 * 1024**2
    master_address: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, picked again at each (re)build of the group
    disk_dir: Path | None = None  # where "disk" writes the checkpoint
    timeout_s: float = 600.0
    _group: object = field(default=None, init=False)
    _members: list[str] = field(default_factory=list, init=False)
    _generation: int = field(default=0, init=False)
    _device: torch.device | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("distributed", "disk"):
            raise ValueError(f"mode must be distributed or disk, got {self.mode!r}")
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.mode == "disk" and self.disk_dir is None:
            raise ValueError("disk weight sync needs disk_dir")

    # ------------------------------------------------------------------ pushing
    def push(self, named: list[tuple[str, torch.Tensor]], version: str, *,
             save: Callable[[Path], Path] | None = None) -> PushResult:
        """Send ``named`` (transformers' names) to every healthy server as ``version``;
        ``save(path)`` writes the checkpoint for ``disk``. Retries once over the servers
        still up when one fails mid-push."""
        for attempt in range(2):
            began = time.perf_counter()
            try:
                if self.mode == "disk":
                    nbytes, servers = self._push_disk(named, version, save)
                else:
                    nbytes, servers = self._push_distributed(named, version)
                return PushResult(time.perf_counter() - began, nbytes, servers)
            except (httpx2.HTTPError, RuntimeError) as exc:
                if attempt == 1:
                    raise RuntimeError(f"pushing weights version {version} failed: {exc}") \
                        from exc
                self._check_members()
                self._drop_group()
        raise AssertionError("unreachable")

    def _check_members(self) -> None:
        self.pool.refresh_health(all_servers=True)

    def _push_disk(self, named, version, save) -> tuple[int, list[str]]:
        if save is None:
            raise ValueError("disk weight sync needs save(path)")
        path = save(Path(self.disk_dir) / "weights")
        self._check_members()
        servers = self.pool.healthy_urls()
        if not servers:
            raise RuntimeError("no rollout server is up")
        self._each(servers, lambda url: self.pool.post(url, "/update_weights_from_disk", {
            "model_path": str(path), "weight_version": version}, timeout=self.timeout_s))
        return sum(t.numel() * t.element_size() for _, t in named), servers

    def _push_distributed(self, named, version) -> tuple[int, list[str]]:
        self._check_members()
        device = named[0][1].device
        if self._group is None or self._members != self.pool.healthy_urls() \
                or device != self._device:
            self._rebuild(device)
        nbytes = 0
        parts = buckets(named, self.bucket_bytes)
        for i, bucket in enumerate(parts):
            body = {"names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                    "group_name": self._group_name, "flush_cache": i == len(parts) - 1,
                    "load_format": "flattened_bucket",
                    "weight_version": version if i == len(parts) - 1 else None}
            self._each(self._members, lambda url, body=body: self.pool.post(
                url, "/update_weights_from_distributed", body, timeout=self.timeout_s),
                while_running=lambda bucket=bucket: broadcast_tensors(
                    self._group, [t for _, t in bucket], flattened=True))
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        return nbytes, list(self._members)

    # ------------------------------------------------------------------ the group
    @property
    def _group_name(self) -> str:
        return f"livethinking_weights_{self._generation}"

    def _rebuild(self, device: torch.device) -> None:
        self._drop_group()
        members = self.pool.healthy_urls()
        if not members:
            raise RuntimeError("no rollout server is up")
        self._generation += 1
        port = self.master_port or _free_port(self.master_address)
        backend = "nccl" if device.type == "cuda" else "gloo"
        world = len(members) + 1
        holder: dict = {}
        self._each(members, lambda url: self.pool.post(url, "/init_weights_update_group", {
            "master_address": self.master_address, "master_port": port,
            "rank_offset": members.index(url) + 1, "world_size": world,
            "group_name": self._group_name, "backend": backend}, timeout=self.timeout_s),
            while_running=lambda: holder.update(group=new_transfer_group(
                master_address=self.master_address, master_port=port, rank=0,
                world_size=world, group_name=self._group_name, backend=backend,
                timeout_s=self.timeout_s)))
        self._group, self._members, self._device = holder["group"], members, device

    def _drop_group(self) -> None:
        if self._group is None:
            return
        for url in self._members:
            if url in self.pool.healthy_urls():
                try:
                    self.pool.post(url, "/destroy_weights_update_group",
                                   {"group_name": self._group_name}, timeout=30.0)
                except httpx2.HTTPError:
                    pass
        try:
            destroy_transfer_group(self._group)
        except Exception:  # a peer already gone: nothing left to free
            pass
        self._group, self._members = None, []

    def close(self) -> None:
        """Leave the group (the servers leave theirs)."""
        self._drop_group()

    # ------------------------------------------------------------------ helpers
    def _each(self, urls: list[str], call, *, while_running=None) -> None:
        """``call(url)`` for every url in parallel threads while ``while_running()`` runs
        here (the broadcast the servers wait for); raises the first failure, marking the
        servers that failed down."""
        errors: dict[str, BaseException] = {}

        def run(url):
            try:
                reply = call(url)
                if isinstance(reply, dict) and reply.get("success") is False:
                    raise RuntimeError(f"{url}: {reply.get('message')}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors[url] = exc

        threads = [threading.Thread(target=run, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        local_error = None
        if while_running is not None:
            try:
                while_running()
            except BaseException as exc:  # noqa: BLE001
                local_error = exc
        for t in threads:
            t.join(self.timeout_s)
        for url, exc in errors.items():
            if isinstance(exc, httpx2.TransportError):
                self.pool.mark_down(url)
        if errors:
            url, exc = next(iter(errors.items()))
            raise RuntimeError(f"{url}: {exc}") from exc
        if local_error is not None:
            raise RuntimeError(f"the broadcast failed: {local_error}") from local_error
