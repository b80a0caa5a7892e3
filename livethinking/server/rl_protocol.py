"""SGLang's RL wire format: ``/generate`` (tokens in, tokens out) and the weight-update
requests, as pydantic models, plus the ``/generate`` answer builder.

``POST /generate {input_ids | text, sampling_params, return_logprob, rid}``: one prompt
(a token-id list or a string) or a batch (a list of them). The answer is one object per
prompt and sample (a single prompt with ``n == 1``: the object itself, else a list,
prompt-major): ``{text, output_ids, meta_info: {id, finish_reason, prompt_tokens,
completion_tokens, cached_tokens, weight_version, e2e_latency, output_token_logprobs?}}``
with ``finish_reason`` ``{"type": "stop", "matched": token id | stop string}``,
``{"type": "length", "length": max_new_tokens}`` or ``{"type": "abort", "message",
"status_code", "err_type"}``
and ``output_token_logprobs`` ``[[logprob, token_id, null], ...]`` (SGLang's shape; the
text slot is null, as SGLang's without ``return_text_in_logprobs``). With
``return_routed_experts`` (a server started with ``--enable-return-routed-experts``),
``meta_info.routed_experts`` is SGLang's base64 of int32 ids, shape (prompt + output − 1,
MoE layers, top_k). ``output_ids``
end with the stop token when the model stopped on one (end-of-sequence included).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from livethinking.engine.outputs import CompletionOutput, RequestOutput
from livethinking.engine.sampling_params import MAX_SEED, MAX_TOP_K, MIN_SEED, SamplingParams
from livethinking.server.protocol import MIN_LOGPROB, Text, _Lenient, routed_experts_b64

__all__ = ["ContinueGenerationRequest", "DestroyGroupRequest", "GenerateRequest",
           "GenerateSamplingParams", "InitGroupRequest", "PauseGenerationRequest",
           "UpdateFromDiskRequest", "UpdateFromDistributedRequest", "generate_items",
           "generate_prompts"]

_MAX_INT64 = 2**63 - 1
TokenIds = list[StrictInt]


class GenerateSamplingParams(_Lenient):
    """SGLang's ``sampling_params`` (its defaults). Penalties and ``min_p`` must stay
    neutral: the sampler has none, and ignoring them silently would mislead."""

    max_new_tokens: StrictInt = Field(128, ge=1, le=_MAX_INT64)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0.0)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(-1, ge=-1, le=MAX_TOP_K)
    min_p: StrictFloat | StrictInt = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: StrictFloat | StrictInt = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: StrictFloat | StrictInt = Field(0.0, ge=0.0, le=0.0)
    repetition_penalty: StrictFloat | StrictInt = Field(1.0, ge=1.0, le=1.0)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=64)
    sampling_seed: StrictInt | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    skip_special_tokens: Literal[True] = True

    def engine_params(self, logprobs: bool, routed_experts: bool = False) -> SamplingParams:
        """The engine's `SamplingParams` (ValueError for what it refuses)."""
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) \
            else list(self.stop)
        return SamplingParams(n=self.n, temperature=float(self.temperature),
                              top_p=float(self.top_p), top_k=self.top_k,
                              max_tokens=self.max_new_tokens, seed=self.sampling_seed,
                              stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos, logprobs=logprobs,
                              return_routed_experts=routed_experts)


class GenerateRequest(_Lenient):
    """``POST /generate``: exactly one of ``input_ids`` and ``text``."""

    input_ids: TokenIds | list[TokenIds] | None = None
    text: Text | list[Text] | None = None
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    return_logprob: StrictBool = False
    return_routed_experts: StrictBool = False
    logprob_start_len: StrictInt = -1
    stream: Literal[False] = False
    rid: Text | list[Text] | None = None

    @model_validator(mode="after")
    def _one_prompt_kind(self):
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("give exactly one of input_ids and text")
        if self.input_ids is not None and (not self.input_ids or any(
                isinstance(p, list) and not p for p in self.input_ids)):
            raise ValueError("input_ids must be a non-empty token-id list or a batch of them")
        if self.return_logprob and self.logprob_start_len != -1:
            raise ValueError("only logprob_start_len=-1 (the output tokens' log-probs) is "
                             "supported")
        return self


def generate_prompts(request: GenerateRequest) -> tuple[list[str | list[int]], bool]:
    """The request's prompts, and whether it was a batch."""
    prompt = request.input_ids if request.input_ids is not None else request.text
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt], False
    return list(prompt), True


def _finish_reason(c: CompletionOutput, max_new_tokens: int) -> dict | None:
    if c.finish_reason == "stop":
        matched = c.stop_reason if c.stop_reason is not None else (
            c.token_ids[-1] if c.token_ids else None)
        return {"type": "stop", "matched": matched}
    if c.finish_reason == "length":
        return {"type": "length", "length": max_new_tokens}
    if c.finish_reason == "abort":
        return {"type": "abort", "message": "the request was aborted (generation paused or "
                                            "the server stopped it)",
                "status_code": None, "err_type": None}  # SGLang's FINISH_ABORT.to_json keys
    return None


def generate_items(rid: str, last: RequestOutput, *, max_new_tokens: int, return_logprob: bool,
                   weight_version: str, e2e_latency: float) -> list[dict]:
    """The answer objects of one prompt's finished output, one per sample."""
    items = []
    for c in sorted(last.outputs, key=lambda c: c.index):
        meta = {"id": rid if len(last.outputs) == 1 else f"{rid}-{c.index}",
                "finish_reason": _finish_reason(c, max_new_tokens),
                "prompt_tokens": len(last.prompt_token_ids),
                "completion_tokens": len(c.token_ids), "cached_tokens": last.num_cached_tokens,
                "weight_version": weight_version, "e2e_latency": e2e_latency}
        if return_logprob:
            meta["output_token_logprobs"] = [
                [max(lp, MIN_LOGPROB), t, None] for lp, t in zip(c.logprobs or [], c.token_ids)]
        if c.routed_experts is not None:
            meta["routed_experts"] = routed_experts_b64(c.routed_experts)
        items.append({"text": c.text, "output_ids": list(c.token_ids), "meta_info": meta})
    return items


class InitGroupRequest(_Lenient):
    """``POST /init_weights_update_group``: this server joins as ranks ``rank_offset``
    (one worker: one rank) of ``world_size``; the trainer is rank 0."""

    master_address: Text
    master_port: StrictInt = Field(ge=1, le=65535)
    rank_offset: StrictInt = Field(ge=1)
    world_size: StrictInt = Field(ge=2)
    group_name: Text = "weight_update_group"
    backend: Literal["nccl", "gloo"] = "nccl"

    @model_validator(mode="after")
    def _rank_fits(self):
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be < world_size "
                             f"{self.world_size}")
        return self


class DestroyGroupRequest(_Lenient):
    """``POST /destroy_weights_update_group``."""

    group_name: Text = "weight_update_group"


class UpdateFromDistributedRequest(_Lenient):
    """``POST /update_weights_from_distributed``: receive ``names`` from rank 0 of the
    group, one broadcast each or (``load_format="flattened_bucket"``) one for all."""

    names: list[Text] = Field(min_length=1)
    dtypes: list[Text]
    shapes: list[list[StrictInt]]
    group_name: Text = "weight_update_group"
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    weight_version: Text | None = None
    load_format: Literal["flattened_bucket"] | None = None

    @model_validator(mode="after")
    def _aligned(self):
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"names, dtypes and shapes must have one entry per tensor; got "
                             f"{len(self.names)}, {len(self.dtypes)}, {len(self.shapes)}")
        if any(d < 0 for shape in self.shapes for d in shape):
            raise ValueError("shapes must hold sizes >= 0")
        return self


class UpdateFromDiskRequest(_Lenient):
    """``POST /update_weights_from_disk``: a safetensors checkpoint of the same model."""

    model_path: Text
    load_format: Literal["safetensors", "auto"] | None = None
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    weight_version: Text | None = None


class PauseGenerationRequest(_Lenient):
    """``POST /pause_generation``."""

    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationRequest(_Lenient):
    """``POST /continue_generation``."""
