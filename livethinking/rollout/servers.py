"""Rollouts from remote inference servers over HTTP, tokens in and tokens out.

`ServerPool` sends each prompt to the healthy server with the fewest requests in flight
(from this client), as one SGLang ``POST /generate {input_ids, sampling_params: {n, ...},
return_logprob: true}`` (ours and SGLang speak it). The answer's ``output_ids`` are the
sampled token ids as they are (no re-tokenisation); an end-of-sequence token the server
stopped on is appended only when the server left it out (``finish_reason.matched`` is
that token id and ``output_ids`` does not end with it), and the sample's sampler
log-probs are then dropped (they no longer line up). A server that fails (connection
error, timeout, 5xx) is marked down and the request retried on another; a server that is
down is asked again (``GET /health``) before each step. Requests carry
``Authorization: Bearer <api_key>`` when a key is set.

``kind="vllm"``: vLLM has no ``/generate`` in SGLang's shape, so each prompt goes to
``POST /v1/completions {model, prompt: [ids], n, ..., logprobs: 0, return_token_ids:
true}`` (the model name from ``GET /v1/models``); a choice's ``token_ids`` already end with
the end-of-sequence token it stopped on. vLLM's answers carry no weight version, so the
pool keeps each server's (set by the weight push) and tags a sample with the version the
server held when the request was sent: a push first closes its servers to new requests
(:meth:`ServerPool.updating`) and waits for this client's in-flight ones to end, so the
tag is exact.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import httpx2

__all__ = ["RemoteSample", "ServerDown", "ServerPool"]


class ServerDown(RuntimeError):
    """No rollout server answered."""


@dataclass(slots=True)
class RemoteSample:
    """One sampled completion: token ids, their sampler log-probs (or None), the text, how
    it finished and the weight version that produced it."""

    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_type: str
    weight_version: str | None
    routed_experts: object = None  # flat int32 tensor of the server's routes, when asked


@dataclass(slots=True)
class _Server:
    url: str
    in_flight: int = 0
    healthy: bool = True
    failures: int = 0
    served: int = 0
    updating: bool = False  # a weight push holds it: no new requests
    version: str | None = None  # vllm: the weights it holds (the pool's record)
    model: str | None = None  # vllm: the served model's name


@dataclass(slots=True)
class ServerPool:
    """The rollout servers (their root URLs) and the client's view of their load."""

    urls: list[str]
    api_key: str | None = None
    timeout_s: float = 600.0
    kind: Literal["sglang", "vllm"] = "sglang"  # sglang: SGLang's /generate (also ours)
    servers: list[_Server] = field(init=False)
    _lock: threading.Condition = field(init=False, default_factory=threading.Condition)
    _client: httpx2.Client = field(init=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a server pool needs at least one server URL")
        if self.kind not in ("sglang", "vllm"):
            raise ValueError(f"kind must be sglang or vllm, got {self.kind!r}")
        self.servers = [_Server(url.rstrip("/")) for url in self.urls]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx2.Client(headers=headers, timeout=self.timeout_s,
                                    limits=httpx2.Limits(max_connections=256))

    # ------------------------------------------------------------------ health and load
    def is_up(self, url: str) -> bool:
        """Whether ``url`` answers ``GET /health`` with 200 within 5 s."""
        try:
            return self._client.get(f"{url}/health", timeout=5.0).status_code == 200
        except httpx2.HTTPError:
            return False

    def refresh_health(self, *, all_servers: bool = False) -> list[str]:
        """Ask every server marked down (``all_servers``: every server) whether it is up;
        the URLs healthy now."""
        for server in self.servers:
            if all_servers or not server.healthy:
                up = self.is_up(server.url)
                if server.healthy and not up:
                    server.failures += 1
                server.healthy = up
        return self.healthy_urls()

    def healthy_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.healthy]

    def mark_down(self, url: str) -> None:
        for server in self.servers:
            if server.url == url:
                server.healthy = False
                server.failures += 1

    def _pick(self, exclude: set[str]) -> tuple[_Server, str | None]:
        """The least-loaded healthy server not being updated (waiting while all are), with
        the weight version it holds; counted in flight."""
        with self._lock:
            while True:
                up = [s for s in self.servers if s.healthy and s.url not in exclude]
                if not up:
                    raise ServerDown("no rollout server is reachable: " + ", ".join(
                        f"{s.url} ({'up' if s.healthy else 'down'})" for s in self.servers))
                ready = [s for s in up if not s.updating]
                if ready:
                    break
                self._lock.wait()
            server = min(ready, key=lambda s: s.in_flight)
            server.in_flight += 1
            return server, server.version

    def _done(self, server: _Server) -> None:
        with self._lock:
            server.in_flight -= 1
            self._lock.notify_all()

    @contextlib.contextmanager
    def updating(self, urls: list[str]):
        """Hold ``urls`` for a weight push: no new request goes to them, and this returns
        once the requests in flight to them ended; released on exit."""
        held = [s for s in self.servers if s.url in urls]
        with self._lock:
            for server in held:
                server.updating = True
            self._lock.wait_for(lambda: all(s.in_flight == 0 for s in held))
        try:
            yield
        finally:
            with self._lock:
                for server in held:
                    server.updating = False
                self._lock.notify_all()

    def set_version(self, url: str, version: str) -> None:
        """Record that ``url`` now holds weights ``version`` (vllm: tags its samples)."""
        with self._lock:
            for server in self.servers:
                if server.url == url:
                    server.version = version

    def get(self, url: str, path: str, timeout: float | None = None):
        """One ``GET`` to one server: the decoded answer, or raises like :meth:`post`."""
        reply = self._client.get(f"{url}{path}",
                                 timeout=self.timeout_s if timeout is None else timeout)
        return _decoded(reply, url, path)

    def post(self, url: str, path: str, body: dict, timeout: float | None = None):
        """One JSON request to one server (no failover): the decoded answer, or raises
        ``httpx2.HTTPStatusError`` carrying the server's message."""
        reply = self._client.post(f"{url}{path}", json=body,
                                  timeout=self.timeout_s if timeout is None else timeout)
        return _decoded(reply, url, path)

    # ------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[int], sampling_params: dict, *,
                 eos_token_ids: set[int], return_routed_experts: bool = False
                 ) -> list[RemoteSample]:
        """``sampling_params["n"]`` samples of one prompt from the least-loaded healthy
        server, failing over to the others; ``return_routed_experts``: with the experts the
        server's MoE layers chose (SGLang's ``meta_info.routed_experts``, decoded flat)."""
        tried: set[str] = set()
        while True:
            server, version = self._pick(tried)
            try:
                if self.kind == "vllm":
                    return self._vllm_generate(server, version, prompt_ids, sampling_params)
                request = {"input_ids": prompt_ids, "sampling_params": sampling_params,
                           "return_logprob": True}
                if return_routed_experts:
                    request["return_routed_experts"] = True
                answer = self.post(server.url, "/generate", request)
            except (httpx2.TransportError, httpx2.HTTPStatusError) as exc:
                client_error = isinstance(exc, httpx2.HTTPStatusError) and \
                    exc.response.status_code < 500
                if client_error:  # our request is wrong: another server would say the same
                    raise
                self.mark_down(server.url)
                tried.add(server.url)
                continue
            finally:
                self._done(server)
            server.served += 1
            items = answer if isinstance(answer, list) else [answer]
            return [_sample(item, eos_token_ids) for item in items]

    def _vllm_generate(self, server: _Server, version: str | None, prompt_ids: list[int],
                       params: dict) -> list[RemoteSample]:
        if server.model is None:
            server.model = self.get(server.url, "/v1/models")["data"][0]["id"]
        body = {"model": server.model, "prompt": prompt_ids, "n": params.get("n", 1),
                "max_tokens": params["max_new_tokens"], "logprobs": 0,
                "return_token_ids": True}
        for ours, theirs in _VLLM_PARAMS.items():
            if params.get(ours) is not None:
                body[theirs] = params[ours]
        answer = self.post(server.url, "/v1/completions", body)
        server.served += 1
        return [_vllm_sample(choice, version)
                for choice in sorted(answer["choices"], key=lambda c: c["index"])]

    def generate_many(self, prompts: list[list[int]], params: list[dict], *,
                      eos_token_ids: set[int], concurrency: int = 64,
                      return_routed_experts: bool = False) -> list[list[RemoteSample]]:
        """:meth:`generate` for every prompt, concurrently; in prompt order."""
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompts)))) as pool:
            return list(pool.map(lambda pp: self.generate(
                pp[0], pp[1], eos_token_ids=eos_token_ids,
                return_routed_experts=return_routed_experts), zip(prompts, params)))

    def stats(self) -> dict[str, float]:
        return {"servers_healthy": float(sum(s.healthy for s in self.servers)),
                "server_failures": float(sum(s.failures for s in self.servers))}

    def close(self) -> None:
        self._client.close()


# SGLang's sampling_params name -> vLLM's completions field
_VLLM_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "sampling_seed": "seed", "ignore_eos": "ignore_eos",
                "stop_token_ids": "stop_token_ids"}


def _decoded(reply, url: str, path: str):
    if reply.status_code >= 400:
        raise httpx2.HTTPStatusError(f"{url}{path} answered {reply.status_code}: "
                                     f"{reply.text[:500]}", request=reply.request,
                                     response=reply)
    return reply.json()


def _vllm_sample(choice: dict, version: str | None) -> RemoteSample:
    ids = [int(t) for t in choice["token_ids"]]
    served = (choice.get("logprobs") or {}).get("token_logprobs")
    usable = served and len(served) == len(ids) and all(lp is not None for lp in served)
    logprobs = [float(lp) for lp in served] if usable else None
    return RemoteSample(ids, logprobs, choice.get("text", ""),
                        choice.get("finish_reason") or "length", version)


def _sample(item: dict, eos_token_ids: set[int]) -> RemoteSample:
    meta = item.get("meta_info", {})
    ids = [int(t) for t in item["output_ids"]]
    finish = meta.get("finish_reason") or {}
    logprobs = [float(lp) for lp, *_ in meta.get("output_token_logprobs") or []] or None
    matched = finish.get("matched")
    if (finish.get("type") == "stop" and isinstance(matched, int) and matched in eos_token_ids
            and (not ids or ids[-1] != matched)):
        ids.append(matched)  # the server stopped on end-of-sequence but left it out
    if logprobs is not None and len(logprobs) != len(ids):
        logprobs = None
    return RemoteSample(ids, logprobs, item.get("text", ""), finish.get("type", "length"),
                        meta.get("weight_version"), _routes(meta.get("routed_experts")))


def _routes(encoded: str | None):
    """SGLang's base64 int32 routes as a flat int32 tensor (None when absent)."""
    if not encoded:
        return None
    import base64

    import torch

    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.int32)
