"""What the RFT and GRPO commands share: devices, models, prompts, judges, evaluation."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from livethinking.data import LivestreamRecord
from livethinking.model import CausalLM
from livethinking.model.prompt import format_livestream_prompt
from livethinking.train.config import JudgeConfig, RunConfig

__all__ = ["EvalResult", "RunStart", "evaluate", "load_policy", "make_judges", "prompt_ids",
           "resolve_device", "response_ids", "start_run"]


def resolve_device(run: RunConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if run.device == "auto" and torch.cuda.is_available()
                          else "cpu" if run.device == "auto" else run.device)
    if run.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, run.dtype)
    return device, dtype


@dataclass(slots=True)
class RunStart:
    out: Path
    device: torch.device
    dtype: torch.dtype
    dist: object  # DistributedContext
    checkpoint: Path | None  # the checkpoint to resume from
    policy_path: Path  # where the policy's weights come from (the checkpoint's, if resuming)


def start_run(run: RunConfig, model_path, *, resume: bool) -> RunStart:
    """Output folder, seeds, device and dtype, the torchrun process group, and the
    checkpoint to resume from (the latest in the output folder when ``resume``)."""
    import random

    from livethinking.train.checkpointing import clean_interrupted_saves, latest_checkpoint
    from livethinking.train.distributed import init_distributed

    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    device, dtype = resolve_device(run)
    dist = init_distributed(device)
    if dist.is_main:  # what killed saves left; only the main rank ever writes there
        clean_interrupted_saves(out)
    checkpoint = latest_checkpoint(out) if resume else None
    return RunStart(out, device, dtype, dist, checkpoint,
                    checkpoint / "model" if checkpoint else Path(model_path))


def load_policy(path, device: torch.device, dtype: torch.dtype):
    """(CausalLM in train mode, tokenizer) from a checkpoint directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    model = CausalLM.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.train(), tokenizer


def prompt_ids(tokenizer, record: LivestreamRecord, system_prompt: str | None) -> list[int]:
    history = [{"role": t.role, "content": t.content} for t in record.history]
    return format_livestream_prompt(tokenizer, record.product_doc, history, record.question,
                                    system_prompt=system_prompt)


def response_ids(tokenizer, response: str) -> list[int]:
    """The response's tokens followed by end-of-sequence (what the model must learn to emit)."""
    return tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]


def make_judges(config: JudgeConfig):
    """(correctness judge, helpfulness judge) from the config."""
    from livethinking import rewards

    if config.kind == "rule":
        return rewards.RuleCorrectnessJudge(), rewards.RuleHelpfulnessJudge()
    common = dict(api_key=config.api_key, concurrency=config.concurrency)
    return (rewards.LLMJudge(config.base_url, config.model, kind="correctness", **common),
            rewards.LLMJudge(config.base_url, config.model, kind="helpfulness", **common))


@dataclass(slots=True)
class EvalResult:
    correct: float  # fraction judged correct
    helpful: float  # mean helpfulness score
    tokens_per_response: float
    ttft_ms: float  # median time to first token in the engine
    responses: list[str]
    tpot_ms: float = 0.0  # median time per output token after the first, one request at a time

    def as_dict(self) -> dict[str, float]:
        return {"correct": self.correct, "helpful": self.helpful,
                "tokens_per_response": self.tokens_per_response, "ttft_ms": self.ttft_ms,
                "tpot_ms": self.tpot_ms}


@torch.no_grad()
def evaluate(model, tokenizer, records: list[LivestreamRecord], judges, *, max_tokens: int,
             system_prompt: str | None = None, probe_tokens: int = 16, probes: int = 8,
             prompt=None) -> EvalResult:
    """Greedy answers to ``records`` through the engine, judged; TTFT and TPOT measured one
    request at a time (up to ``probes`` probes of ``probe_tokens`` tokens, end-of-sequence
    ignored; ``probes=0``: none, TTFT and TPOT reported as 0)
    so they are the latency a single viewer sees: TTFT = first token − arrival, TPOT =
    (last token − first token) / (tokens − 1), medians over the probes. ``prompt``:
    ``(tokenizer, record) -> ids`` for records of another task (default: the livestream
    prompt with ``system_prompt``)."""
    from livethinking.engine import LLM, SamplingParams

    was_training = model.training
    model.eval()
    llm = LLM(model, tokenizer, max_model_len=min(model.config.max_position_embeddings, 4096),
              max_num_seqs=max(8, len(records)))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=False)
    prompts = [prompt_ids(tokenizer, r, system_prompt) if prompt is None else
               prompt(tokenizer, r) for r in records]
    outputs = llm.generate(prompts, params)
    probe = SamplingParams(temperature=0.0, max_tokens=max(1, probe_tokens), logprobs=False,
                           ignore_eos=True)
    ttfts, tpots = [], []
    for p in prompts[:max(0, probes)]:
        (out,) = llm.generate([p], probe)
        done, n = time.perf_counter(), len(out.outputs[0].token_ids)
        ttfts.append(out.ttft)
        if n > 1:
            tpots.append((done - out.first_token_time) / (n - 1))
    model.train(was_training)
    texts = [o.outputs[0].text for o in outputs]
    correctness, helpfulness = judges
    c = correctness.judge_many(records, texts)
    h = helpfulness.judge_many(records, texts)
    return EvalResult(
        correct=statistics.fmean(v.score >= 1.0 for v in c) if c else 0.0,
        helpful=statistics.fmean(v.score for v in h) if h else 0.0,
        tokens_per_response=statistics.fmean(len(o.outputs[0].token_ids) for o in outputs)
        if outputs else 0.0,
        ttft_ms=1e3 * statistics.median(ttfts) if ttfts else 0.0, responses=texts,
        tpot_ms=1e3 * statistics.median(tpots) if tpots else 0.0)
