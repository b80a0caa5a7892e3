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
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class _Server:
    url: str
    in_flight: int = 0
    healthy: bool = True
    failures: int = 0
    served: int = 0


@dataclass(slots=True)
class ServerPool:
    """The rollout servers (their root URLs) and the client's view of their load."""

    urls: list[str]
    api_key: str | None = None
    timeout_s: float = 600.0
    servers: list[_Server] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _client: httpx2.Client = field(init=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a server pool needs at least one server URL")
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

    def _pick(self, exclude: set[str]) -> _Server:
        with self._lock:
            up = [s for s in self.servers if s.healthy and s.url not in exclude]
            if not up:
                raise ServerDown("no rollout server is reachable: "
                                 + ", ".join(f"{s.url} ({'up' if s.healthy else 'down'})"
                                             for s in self.servers))
            server = min(up, key=lambda s: s.in_flight)
            server.in_flight += 1
            return server

    def post(self, url: str, path: str, body: dict, timeout: float | None = None):
        """One JSON request to one server (no failover): the decoded answer, or raises
        ``httpx2.HTTPStatusError`` carrying the server's message."""
        reply = self._client.post(f"{url}{path}", json=body,
                                  timeout=self.timeout_s if timeout is None else timeout)
        if reply.status_code >= 400:
            raise httpx2.HTTPStatusError(f"{url}{path} answered {reply.status_code}: "
                                        f"{reply.text[:500]}", request=reply.request,
                                        response=reply)
        return reply.json()

    # ------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[int], sampling_params: dict, *,
                 eos_token_ids: set[int]) -> list[RemoteSample]:
        """``sampling_params["n"]`` samples of one prompt from the least-loaded healthy
        server, failing over to the others."""
        tried: set[str] = set()
        body = {"input_ids": prompt_ids, "sampling_params": sampling_params,
                "return_logprob": True}
        while True:
            server = self._pick(tried)
            try:
                answer = self.post(server.url, "/generate", body)
            except (httpx2.TransportError, httpx2.HTTPStatusError) as exc:
                client_error = isinstance(exc, httpx2.HTTPStatusError) and \
                    exc.response.status_code < 500
                if client_error:  # our request is wrong: another server would say the same
                    raise
                self.mark_down(server.url)
                tried.add(server.url)
                continue
            finally:
                with self._lock:
                    server.in_flight -= 1
            server.served += 1
            items = answer if isinstance(answer, list) else [answer]
            return [_sample(item, eos_token_ids) for item in items]

    def generate_many(self, prompts: list[list[int]], params: list[dict], *,
                      eos_token_ids: set[int], concurrency: int = 64) -> list[list[RemoteSample]]:
        """:meth:`generate` for every prompt, concurrently; in prompt order."""
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompts)))) as pool:
            return list(pool.map(lambda pp: self.generate(pp[0], pp[1],
                                                          eos_token_ids=eos_token_ids),
                                 zip(prompts, params)))

    def stats(self) -> dict[str, float]:
        return {"servers_healthy": float(sum(s.healthy for s in self.servers)),
                "server_failures": float(sum(s.failures for s in self.servers))}

    def close(self) -> None:
        self._client.close()


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
                        meta.get("weight_version"))
