"""SGLang's RL API on ``livethinking serve``: tokens in / tokens out, and weight updates.

Always on: ``POST /generate`` (:mod:`.rl_protocol`), ``GET /get_weight_version``,
``GET /get_weights_checksum`` (ours: SHA-256 of the served weights, to check a push).
With ``enable_weight_updates`` only (else 403): ``/init_weights_update_group``,
``/destroy_weights_update_group``, ``/update_weights_from_distributed``,
``/update_weights_from_disk``, ``/flush_cache``, ``/pause_generation``,
``/continue_generation``. They answer SGLang's ``{"success", "message"}`` (200, or 400
when the update failed; the weights are then unchanged), plus ``weight_version``.

In-flight requests across an update (SGLang's semantics, `GenerationGate`): an update
waits until running generations finish and holds new ones back; after
``/pause_generation`` it runs at once: ``abort`` ended the running requests (finish
reason ``abort``), ``retract`` freed their KV cache (recomputed with the new weights
after ``/continue_generation``), ``in_place`` kept them (they continue on the new
weights with their old KV). Requests arriving while paused wait for
``/continue_generation``. Tensors are received on a transfer thread and copied into the
model on the engine thread between two steps (`WeightLoader`: in place, all checked
before any is written); ``flush_cache`` empties the prefix cache (a changed weight
also empties it by itself). Every response carries the served ``X-Weight-Version``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livethinking.engine.weight_transfer import (destroy_transfer_group, new_transfer_group,
                                                 parse_dtype, receive_tensors)
from livethinking.engine.weight_update import WeightLoader, weights_checksum
from livethinking.server import rl_protocol as R
from livethinking.server.generation import (APIError, ClientGone, ServerState, first_outputs,
                                            last_outputs, open_generation, prompt_ids)

__all__ = ["WeightSync", "WeightVersionHeader", "add_rl_routes"]


class WeightSync:
    """The server's side of weight transfers: its process groups with trainers and the
    one thread that blocks on rendezvous, broadcasts and checkpoint reads."""

    def __init__(self, model) -> None:
        self.loader = WeightLoader(model)
        self.device = next(model.parameters()).device
        self.groups: dict[str, object] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="livethinking-weights")

    async def blocking(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the transfer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def check(self, names, shapes) -> str | None:
        """Why ``names`` with ``shapes`` cannot be loaded, or None."""
        for name, shape in zip(names, shapes):
            try:
                dest = self.loader.destination(name)
            except ValueError as exc:
                return str(exc)
            if tuple(shape) != tuple(dest.shape):
                return (f"weight {name!r} has shape {tuple(shape)}; the model's is "
                        f"{tuple(dest.shape)}")
        return None

    def close(self) -> None:
        """Leave every group; stop the transfer thread."""
        for group in self.groups.values():
            try:
                destroy_transfer_group(group)
            except Exception:  # a peer already gone: nothing left to free
                pass
        self.groups.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class WeightVersionHeader:
    """ASGI middleware: every HTTP response carries ``X-Weight-Version``."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", []),
                    (b"x-weight-version", self.state.weight_version.encode("utf-8", "replace"))]}
            await send(message)

        await self.app(scope, receive, send_with_version)


def _result(success: bool, message: str, state: ServerState, **extra) -> JSONResponse:
    return JSONResponse({"success": success, "message": message,
                         "weight_version": state.weight_version, **extra},
                        status_code=200 if success else 400)


def add_rl_routes(app: FastAPI, state: ServerState, *, enable_weight_updates: bool) -> WeightSync:
    """Register the RL endpoints on ``app``; returns the `WeightSync` to close at shutdown."""
    engine = state.engine
    sync = WeightSync(engine.engine.model)

    def require_updates() -> None:
        if not enable_weight_updates:
            raise APIError(403, "weight updates are disabled on this server; start it with "
                                "--enable-weight-updates (and --api-key)", "permission_error",
                           code="weight_updates_disabled")

    @app.post("/generate")
    async def generate(body: R.GenerateRequest, request: Request):
        received = time.perf_counter()
        try:
            params = body.sampling_params.engine_params(
                logprobs=body.return_logprob, routed_experts=body.return_routed_experts)
        except ValueError as exc:
            raise APIError(400, str(exc), param="sampling_params") from None
        prompts, batch = R.generate_prompts(body)
        rids = [body.rid] if isinstance(body.rid, str) else body.rid
        if rids is not None and len(rids) != len(prompts):
            raise APIError(400, f"rid has {len(rids)} ids for {len(prompts)} prompts",
                           param="rid")
        prompts = [await prompt_ids(state, p) for p in prompts]
        request_id = f"gen-{uuid.uuid4().hex}"
        rids = rids or ([request_id] if len(prompts) == 1 else
                        [f"{request_id}-{i}" for i in range(len(prompts))])
        try:
            generation = await open_generation(state, request, request_id, prompts, params,
                                               received)
        except ClientGone:
            return Response(status_code=499)
        try:
            firsts = await first_outputs(request, generation,
                                         "input_ids" if body.input_ids is not None else "text")
            lasts = await last_outputs(request, generation, firsts)
        except ClientGone:
            return Response(status_code=499)
        finally:
            await generation.close()
        latency = time.perf_counter() - received
        items = [item for rid, last in zip(rids, lasts) for item in R.generate_items(
            rid, last, max_new_tokens=params.max_tokens, return_logprob=body.return_logprob,
            weight_version=state.weight_version, e2e_latency=latency)]
        return items[0] if not batch and len(items) == 1 else items

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": state.weight_version}

    @app.get("/get_weights_checksum")
    async def get_weights_checksum():
        checksum = await engine.call(lambda e: weights_checksum(e.model))
        return {"checksum": checksum, "weight_version": state.weight_version}

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(body: R.InitGroupRequest):
        require_updates()
        if body.group_name in sync.groups:
            return _result(False, f"group {body.group_name!r} already exists; destroy it "
                                  "first", state)
        if body.backend == "nccl" and sync.device.type != "cuda":
            return _result(False, f"backend nccl needs a CUDA device; this server's model is "
                                  f"on {sync.device.type}: use backend gloo", state)
        try:
            group = await sync.blocking(
                new_transfer_group, master_address=body.master_address,
                master_port=body.master_port, rank=body.rank_offset,
                world_size=body.world_size, group_name=body.group_name, backend=body.backend)
        except Exception as exc:
            return _result(False, f"joining the group failed: {exc}", state)
        sync.groups[body.group_name] = group
        return _result(True, f"joined group {body.group_name!r} as rank {body.rank_offset} "
                             f"of {body.world_size}", state)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(body: R.DestroyGroupRequest):
        require_updates()
        group = sync.groups.pop(body.group_name, None)
        if group is None:
            return _result(False, f"no group {body.group_name!r}", state)
        await sync.blocking(destroy_transfer_group, group)
        return _result(True, f"left group {body.group_name!r}", state)

    async def load(names, tensors, flush: bool, version: str | None) -> int:
        def copy(e) -> int:
            count = sync.loader.load_(zip(names, tensors))
            if flush:
                e.reset_prefix_cache()
            return count

        count = await engine.call(copy)
        if version is not None:
            state.weight_version = version
        return count

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(body: R.UpdateFromDistributedRequest):
        require_updates()
        group = sync.groups.get(body.group_name)
        if group is None:
            return _result(False, f"no group {body.group_name!r}: call "
                                  "/init_weights_update_group first", state)
        try:
            dtypes = [parse_dtype(d) for d in body.dtypes]
        except ValueError as exc:
            return _result(False, str(exc), state)  # nothing received: the trainer must
            # not broadcast after a 400 it gets before the transfer starts
        problem = sync.check(body.names, body.shapes)
        if body.abort_all_requests:
            await engine.abort_all()
        async with state.gate.updating():
            began = time.perf_counter()
            try:  # received even when the names are wrong: the collective stays in step
                tensors = await sync.blocking(
                    receive_tensors, group, dtypes, body.shapes, device=sync.device,
                    flattened=body.load_format == "flattened_bucket")
            except Exception as exc:
                return _result(False, f"receiving the tensors failed: {exc}", state)
            if problem is not None:
                return _result(False, f"{problem}; no weight was changed", state)
            count = await load(body.names, tensors, body.flush_cache, body.weight_version)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return _result(True, f"updated {count} tensors ({nbytes} bytes) in "
                             f"{time.perf_counter() - began:.3f} s", state)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: R.UpdateFromDiskRequest):
        require_updates()
        path = Path(body.model_path)
        if not path.is_dir():
            return _result(False, f"model_path {body.model_path!r} is not a directory", state,
                           num_paused_requests=0)
        aborted = await engine.abort_all() if body.abort_all_requests else 0
        async with state.gate.updating():
            try:
                tensors = await sync.blocking(_read_checkpoint, path, sync)
            except (ValueError, OSError) as exc:
                return _result(False, f"{exc}; no weight was changed", state,
                               num_paused_requests=aborted)
            count = await load(list(tensors), list(tensors.values()), body.flush_cache,
                               body.weight_version)
        return _result(True, f"loaded {count} tensors from {path.name}", state,
                       num_paused_requests=aborted)

    @app.post("/flush_cache")
    async def flush_cache():
        require_updates()
        stats = await engine.stats()
        if stats.num_running or stats.num_waiting:
            return _result(False, "the cache was not flushed: requests are running", state)
        await engine.call(lambda e: e.reset_prefix_cache())
        return _result(True, "the prefix cache was flushed", state)

    @app.post("/pause_generation")
    async def pause_generation(body: R.PauseGenerationRequest):
        require_updates()
        await state.gate.set_paused(True)
        count = await engine.pause(body.mode)
        if body.mode == "abort":
            await state.gate.wait_drained()  # the aborted requests have answered
        return _result(True, f"generation paused ({body.mode}: {count} affected)", state)

    @app.post("/continue_generation")
    async def continue_generation(body: R.ContinueGenerationRequest | None = None):
        require_updates()
        await engine.resume()
        await state.gate.set_paused(False)
        return _result(True, "generation continues", state)

    return sync


def _read_checkpoint(path: Path, sync: WeightSync) -> dict:
    """Every tensor of the safetensors checkpoint at ``path`` (experts fused), checked to
    cover each of the model's weights (a tied ``lm_head.weight`` may be absent)."""
    from livethinking.model.checkpoint import iter_tensors

    tensors = dict(iter_tensors(path))
    problem = sync.check(list(tensors), [t.shape for t in tensors.values()])
    if problem is not None:
        raise ValueError(problem)
    covered = {id(sync.loader.destination(n)) for n in tensors}
    missing = [n for n in sync.loader.unique_names()
               if id(sync.loader.params[n]) not in covered]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} of the model's weights, e.g. "
                         f"{missing[0]!r}")
    return tensors
