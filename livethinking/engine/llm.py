"""The synchronous front: ``LLM(model_dir or CausalLM).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from dataclasses import replace
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from livethinking.engine.config import EngineConfig
from livethinking.engine.llm_engine import LLMEngine
from livethinking.engine.outputs import RequestOutput
from livethinking.engine.sampling_params import SamplingParams

__all__ = ["LLM"]


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                        and all(isinstance(t, int) for t in prompts))


class LLM:
    """Generation from a checkpoint directory or an in-memory ``CausalLM``.

    Given a ``CausalLM`` the engine uses its parameters in place (no copy): a trainer that
    updates them in place is seen by the next ``generate``. A directory is loaded with
    ``CausalLM.from_pretrained`` and, if it holds tokenizer files, ``AutoTokenizer``.
    """

    def __init__(self, model, tokenizer=None, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, config: EngineConfig | None = None,
                 **config_overrides) -> None:
        if isinstance(model, (str, Path)):
            from livethinking.model import CausalLM

            path = Path(model)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = CausalLM.from_pretrained(path, dtype=dtype, device=device)
            if tokenizer is None and any((path / f).is_file() for f in
                                         ("tokenizer.json", "tokenizer_config.json")):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
        elif dtype is not None or device is not None:
            raise ValueError("dtype/device apply to a checkpoint directory; move an in-memory "
                             "model yourself (the engine shares its weights)")
        if config is None:
            config = EngineConfig(**config_overrides)
        elif config_overrides:
            raise ValueError("pass either config or keyword overrides, not both")
        self.engine = LLMEngine(model, tokenizer, config)
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    def sleep(self) -> int:
        """Release the KV pool and CUDA graphs, keep the weights (`LLMEngine.sleep`)."""
        return self.engine.sleep()

    def wake_up(self, num_kv_blocks: int | None = None) -> None:
        """Allocate the KV pool again (`LLMEngine.wake_up`)."""
        self.engine.wake_up(num_kv_blocks)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); outputs in prompt order.

        Any number of prompts: every prompt and params is validated first (an error adds
        nothing), then they are fed in waves, as many as the engine admits
        (``max_waiting``), more after each step as room frees. Seeded and greedy outputs
        equal generating each prompt alone. Nobody streams here: every request runs with
        ``output_kind="final_only"`` (reported once, its text decoded once). On any error or interrupt the requests this
        call added are aborted, so the engine is left as it was found.
        """
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        final = {}  # one final_only copy per distinct params object
        params = [final.setdefault(id(p), replace(p, output_kind="final_only"))
                  if isinstance(p, SamplingParams) else p for p in params]
        checked = [self._validate(i, prompt, p) for i, (prompt, p) in
                   enumerate(zip(prompts, params))]  # token ids, each prompt
        order = [f"generate-{next(self._ids)}" for _ in checked]
        ours = set(order)
        finished: dict[str, RequestOutput] = {}
        added = 0
        try:
            while len(finished) < len(order):
                while added < len(order) and self.engine.has_room():
                    self.engine.add_request(order[added], checked[added], params[added])
                    added += 1
                for output in self.engine.step():
                    if output.finished and output.request_id in ours:
                        finished[output.request_id] = output
        finally:
            for request_id in order[:added]:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[r] for r in order]

    def _validate(self, index: int, prompt, params) -> list[int]:
        """The engine's checks of one request, the error naming which prompt failed."""
        try:
            return self.engine.validate_request(prompt, params)
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompts[{index}]: {e}") from None

    def chat(self, conversations, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {role, content}) or a list of
        them, formatted by the tokenizer's chat template with the generation prompt
        (`encode_chat`: special-token text inside a message stays text)."""
        from livethinking.model.prompt import encode_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [encode_chat(self.tokenizer, messages, add_generation_prompt=True)
                   for messages in conversations]
        return self.generate(prompts, params)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        The prompt and params are validated at the call (an error queues nothing); the
        request is queued on the first ``next`` and aborted if the consumer stops early
        or a step fails."""
        params = params or SamplingParams()
        prompt_ids = self.engine.validate_request(prompt, params)
        return self._stream(f"stream-{next(self._ids)}", prompt_ids, params)

    def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                ) -> Iterator[RequestOutput]:
        done = False
        try:
            self.engine.add_request(request_id, prompt_ids, params)
            while not done:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort_request(request_id)
