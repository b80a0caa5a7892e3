"""The trainer's configuration: nested, validated dataclasses (see ``config_io``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CorrectionConfig", "DPOConfig", "DifficultyConfig", "GRPOConfig", "JudgeConfig",
           "LossConfig", "OptimConfig", "PassAtNConfig", "RFTConfig", "RewardConfig",
           "RolloutConfig", "RunConfig", "TeacherConfig"]


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    output_dir: str = "runs/livethinking"
    seed: int = 0
    device: str = "auto"  # "auto": cuda if present
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    # held-out evaluation on the top config's eval_data (logged as eval/…): at step 0, every
    # eval_every steps and at the end; 0 with eval_data: at step 0 and at the end only
    eval_every: int = 0
    eval_max_tokens: int = 256  # greedy answer length in evaluation
    gradient_checkpointing: bool = False  # the older spelling of activation_checkpointing
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.save_every < 0:
            raise ValueError("log_every must be >= 1 and save_every >= 0")
        if self.eval_every < 0 or self.eval_max_tokens < 1:
            raise ValueError(f"eval_every must be >= 0 and eval_max_tokens >= 1, got "
                             f"{self.eval_every} and {self.eval_max_tokens}")


def _check_task(config) -> None:
    """``task`` / ``output_format`` / ``partial_credit`` agree (relevance owns the last two)."""
    if config.output_format not in ("cot", "post_cot"):
        raise ValueError(f"output_format must be cot or post_cot, got {config.output_format!r}")
    if config.task != "relevance" and (config.output_format != "cot" or config.partial_credit):
        raise ValueError("output_format post_cot and partial_credit are relevance settings "
                         "(task: relevance)")
    if config.task == "relevance" and config.judge_kind() != "rule":
        raise ValueError("task relevance is judged by rule (judge.kind: rule)")


def _check_eval(eval_data: str | None, run: RunConfig) -> None:
    if run.eval_every and not eval_data:
        raise ValueError(f"run.eval_every ({run.eval_every}) needs eval_data (held-out records)")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW on fp32 master weights; lr warms up linearly over ``warmup_steps`` then
    follows a cosine to ``min_lr_ratio · lr`` at the last step; global-norm clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0: off

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("warmup_steps >= 0, min_lr_ratio in [0, 1], grad_clip >= 0")


@dataclass(kw_only=True, slots=True)
class JudgeConfig:
    """``rule``: the rule-based judges; ``llm``: an LLM judge over an OpenAI-compatible
    endpoint (``base_url``, ``model``)."""

    kind: Literal["rule", "llm"] = "rule"
    base_url: str | None = None
    model: str | None = None
    api_key: str = "EMPTY"
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ValueError("an llm judge needs base_url and model")


@dataclass(kw_only=True, slots=True)
class TeacherConfig:
    """Where RFT samples come from: ``jsonl`` (a file of {id, response}), ``engine`` (a
    local checkpoint through our engine), ``openai`` (an OpenAI-compatible endpoint, e.g.
    a vLLM server of a large teacher), or ``demo`` (the programmatic demo teacher)."""

    kind: Literal["jsonl", "engine", "openai", "demo"] = "jsonl"
    path: str | None = None  # the JSONL file or the checkpoint directory
    base_url: str | None = None
    model: str | None = None
    api_key: str = "EMPTY"
    k: int = 4  # samples per prompt
    temperature: float = 1.0
    max_tokens: int = 256
    error_rate: float = 0.25  # demo teacher only: wrong answers, filler sentences
    min_filler: int = 1
    max_filler: int = 6

    def __post_init__(self) -> None:
        _positive(self, "k", "max_tokens")
        if self.kind in ("jsonl", "engine") and not self.path:
            raise ValueError(f"a {self.kind} teacher needs path")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("an openai teacher needs base_url and model")


@dataclass(kw_only=True, slots=True)
class RFTConfig:
    """Rejection-sampling fine-tuning: keep teacher samples judged correct AND helpful,
    then SFT on them (packed rows, loss on response tokens, + MoE balance loss)."""

    model: str  # the student checkpoint directory
    train_data: str
    eval_data: str | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    system_prompt: str | None = None  # None: the task's default instructions
    # the records' task (train/tasks.py): livestream answers, or relevance tiers (TaoSR1)
    # whose response is reasoning then label (cot) or label first (post_cot)
    task: Literal["livestream", "relevance"] = "livestream"
    output_format: Literal["cot", "post_cot"] = "cot"
    partial_credit: bool = False  # relevance: score 1 − |pred − gold| / 3, not exact label
    # relevance: "default", or "query_doc_query" (the label-first layout, prompt.py)
    prompt_layout: Literal["default", "query_doc_query"] = "default"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    helpful_threshold: float = 0.75
    # JSON lines of {"text": ...} trained on as plain language modelling in the same rows as
    # the accepted samples (every token after a text's first is a target): keeps what the
    # student read before fine-tuning (the pre-training mix of InstructGPT's PPO-ptx). None: off.
    lm_data: str | None = None
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs
    row_tokens: int = 1024  # tokens per packed row
    rows_per_step: int = 4  # rows per optimizer step (accumulated one at a time)
    aux_loss: bool = True
    # tokens per forward/backward per rank: RFT forwards one packed row (row_tokens) at a
    # time, so row_tokens must fit in it
    micro_batch_tokens: int = 8192
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _positive(self, "epochs", "row_tokens", "rows_per_step", "micro_batch_tokens")
        if self.row_tokens > self.micro_batch_tokens:
            raise ValueError(f"row_tokens ({self.row_tokens}) must be <= micro_batch_tokens "
                             f"({self.micro_batch_tokens}): a packed row is one forward")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        _check_eval(self.eval_data, self.run)
        _check_task(self)

    def judge_kind(self) -> str:
        return self.judge.kind


@dataclass(kw_only=True, slots=True)
class CorrectionConfig:
    """Importance correction of rollouts whose sampler log-probs differ from the trainer's
    (``livethinking.ops.rollout_correction`` states the formulas): ``token_tis`` /
    ``seq_tis`` truncate the ratio at ``cap``; ``token_mis`` / ``seq_mis`` drop tokens
    (sequences) whose ratio leaves [``low``, ``high``]; ``none`` leaves them unweighted."""

    mode: Literal["none", "token_tis", "seq_tis", "token_mis", "seq_mis"] = "token_tis"
    cap: float = 2.0
    low: float = 0.5
    high: float = 2.0

    def __post_init__(self) -> None:
        _positive(self, "cap", "high")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"correction needs 0 <= low <= high, got low={self.low}, "
                             f"high={self.high}")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """G samples per prompt from the in-process engine (shared weights), from rollout
    servers that follow the policy (``servers``: their root URLs, ``livethinking serve
    --enable-weight-updates`` or SGLang, tokens in and out through ``/generate``; or
    ``server_kind: vllm``, vLLM's ``/v1/completions`` with token ids and its native
    weight-transfer API; the trainer pushes its weights after every optimizer step,
    ``weight_sync: distributed`` as buckets of ``bucket_mb`` over a process group (NCCL
    only for vLLM), or ``disk`` as a checkpoint the servers load), or from OpenAI-compatible servers that keep their own weights
    (``openai``: ``base_urls``; the text is re-tokenised). External log-probs get the
    importance correction against the trainer's (``correction``). ``api_key``:
    sent as a Bearer token (default: ``$LIVETHINKING_API_KEY``). ``max_staleness: k > 0``
    (servers): the next steps' rollouts are sampled while the current step trains, at most
    k steps ahead; groups with a sample more than k weight versions old are dropped."""

    source: Literal["engine", "servers", "openai"] = "engine"
    servers: list[str] = field(default_factory=list)
    server_kind: Literal["livethinking", "sglang", "vllm"] = "livethinking"
    weight_sync: Literal["distributed", "disk"] = "distributed"
    bucket_mb: float = 512.0
    api_key: str | None = None
    master_address: str = "127.0.0.1"  # this trainer's address as the servers reach it
    master_port: int = 0  # 0: a free port
    max_staleness: int = 0  # servers: sample up to this many steps ahead (0: synchronous)
    base_urls: list[str] = field(default_factory=list)
    served_model: str | None = None
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    # the prompt length the in-process engine's KV pool is sized for on CUDA (with
    # max_tokens, for one rollout batch of a rank; longer prompts just run fewer at once)
    prompt_tokens: int = 1024
    # the in-process engine frees its KV pool (and CUDA graphs) while the policy trains and
    # takes it back for the next rollouts, sized then (after the optimizer's state exists):
    # at most one rollout batch, within gpu_memory_utilization of the GPU (vLLM's sleep mode)
    free_cache_engine: bool = True
    gpu_memory_utilization: float = 0.85
    deterministic: bool = False  # the engine's trainer-consistent mode
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)

    def __post_init__(self) -> None:
        _positive(self, "group_size", "max_tokens", "temperature", "prompt_tokens")
        if self.source == "openai" and not (self.base_urls and self.served_model):
            raise ValueError("openai rollouts need base_urls and served_model")
        if self.source == "servers":
            if not self.servers:
                raise ValueError("rollout.source servers needs rollout.servers: the servers' "
                                 "root URLs (http://host:port)")
            bad = [u for u in self.servers if not u.startswith(("http://", "https://"))
                   or u.rstrip("/").endswith("/v1")]
            if bad:
                raise ValueError(f"rollout.servers are the servers' root URLs "
                                 f"(http://host:port, no /v1), got {bad}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_staleness and self.source != "servers":
            raise ValueError("max_staleness > 0 needs rollout.source servers (the in-process "
                             "engine shares the policy's weights)")
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be in [0, 65535], got {self.master_port}")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Every option of ``fused_linear_grpo_loss``.

    ``epsilon_high`` under ``cispo`` caps the weight at ``1 + epsilon_high`` (the MiniMax-M1
    paper's ε_high^IS), not at ``epsilon_high`` as TRL does
    (``torch.clamp(coef_1, max=self.epsilon_high)``): TRL's ``epsilon_high: e`` is our
    ``epsilon_high: e − 1``.

    ``routing_replay`` (MoE): ``old`` (R2) records the experts the old-policy forward chose
    and replays them in every update's forward, so the policy ratio compares the same
    experts; ``rollout`` (R3) replays the experts the inference engine chose when it
    sampled (the in-process engine, or ``livethinking`` / ``sglang`` servers started with
    ``--enable-return-routed-experts``); ``none``: each forward routes afresh.

    ``credit`` (multi-turn agents, ``livethinking.train.agent``): ``token`` trains whole
    trajectories with the token-level loss above; ``chunk`` is IPA-style interaction-chunk
    credit: each model turn has its own importance ratio (the geometric mean of its token
    ratios, clipped like GSPO's) and the loss is normalised per turn (``loss_type`` and
    ``importance_sampling_level`` are then both ``chunk``; single-turn GRPO rejects it).

    ``reference_offload`` (β > 0): the reference model lives in CPU memory and visits the
    device one decoder layer at a time (one process: `offload_layers`; under torchrun its
    FSDP2 shards with ``CPUOffloadPolicy``); the log-probs are the same, slower.
    """

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: Literal["token", "sequence"] = "token"
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    routing_replay: Literal["none", "old", "rollout"] = "none"
    reference_offload: bool = False
    credit: Literal["token", "chunk"] = "token"

    def __post_init__(self) -> None:
        if self.beta < 0 or self.epsilon_low < 0:
            raise ValueError("beta and epsilon_low must be >= 0")



@dataclass(kw_only=True, slots=True)
class RewardConfig:
    """total = w_c·C + w_h·H + w_l·r_len; r_len from the band [λ_lo, λ_hi]·L_ref with
    L_ref the starting (RFT) model's mean response length unless given."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    w_correctness: float = 1.0
    w_helpfulness: float = 0.5
    w_length: float = 0.5
    l_ref: float | None = None
    lambda_lo: float = 0.3
    lambda_hi: float = 0.6
    epsilon: float | None = None  # None: L_ref (r_len reaches 0 one L_ref outside the band)
    length_needs_correct: bool = False  # w_l·C·r_len: no length reward for wrong answers


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    model: str  # the RFT checkpoint directory
    train_data: str
    eval_data: str | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    system_prompt: str | None = None
    task: Literal["livestream", "relevance"] = "livestream"  # as RFTConfig's
    output_format: Literal["cot", "post_cot"] = "cot"
    partial_credit: bool = False
    prompt_layout: Literal["default", "query_doc_query"] = "default"
    steps: int = 20
    prompts_per_step: int = 8
    updates_per_batch: int = 1  # optimizer steps per rollout batch (minibatches)
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill
    aux_loss: bool = True  # add the MoE load-balancing loss of the rollout tokens
    max_refill_rounds: int = 3
    # padded tokens per forward/backward per rank: a minibatch runs as microbatches of
    # whole rows within it (gradients accumulated, the loss normalised as one batch)
    micro_batch_tokens: int = 8192
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    # difficulty-aware sampling (TaoSR1): train only on prompts the policy sometimes solves
    difficulty: DifficultyConfig = field(default_factory=lambda: DifficultyConfig())
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def judge_kind(self) -> str:
        return self.reward.judge.kind

    def __post_init__(self) -> None:
        _check_task(self)
        _positive(self, "steps", "prompts_per_step", "updates_per_batch", "micro_batch_tokens")
        if self.prompts_per_step % self.updates_per_batch:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                             f"updates_per_batch ({self.updates_per_batch})")
        _check_eval(self.eval_data, self.run)
        if self.loss.credit != "token":
            raise ValueError("loss.credit chunk is for multi-turn trajectories (a model turn is a "
                             "chunk); single-turn GRPO has one chunk per completion: use "
                             "loss.importance_sampling_level: sequence (GSPO)")
        if self.loss.routing_replay == "rollout" and (
                self.rollout.source == "openai" or self.rollout.server_kind == "vllm"):
            raise ValueError("loss.routing_replay rollout (R3) needs the sampler's routes: "
                             "rollout.source engine, or servers of kind livethinking / sglang "
                             "(started with --enable-return-routed-experts)")


@dataclass(kw_only=True, slots=True)
class DifficultyConfig:
    """Difficulty-aware prompt sampling (TaoSR1's GRPO stage; ROLL's difficulty mask with
    its thresholds 0.1 and 0.95): each training prompt's accuracy p (the fraction of
    samples the correctness judge scores 1) is estimated before training by ``samples``
    samples per prompt from the starting model (or read from ``accuracy_file``, JSON lines
    of ``{"id", "accuracy"}`` such as ``livethinking dpo``'s ``pass_at_n.jsonl``); only
    prompts with ``low < p < high`` are drawn. ``online``: each rollout group's accuracy
    replaces its prompt's estimate, so prompts the policy has learned (or that stay
    hopeless) leave the pool and ones it starts to solve re-enter it; a prompt never
    estimated counts as kept."""

    enabled: bool = False
    low: float = 0.1
    high: float = 0.95
    samples: int = 8  # the offline pass@N estimate's N (unused with accuracy_file)
    accuracy_file: str | None = None
    online: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"difficulty needs 0 <= low < high <= 1, got low={self.low}, "
                             f"high={self.high}")
        _positive(self, "samples")


@dataclass(kw_only=True, slots=True)
class PassAtNConfig:
    """Pairs by pass@N: ``n`` samples per prompt from the starting (SFT) model through the
    engine; per prompt up to ``pairs_per_prompt`` pairs (chosen: a sample the correctness
    judge scores 1; rejected: one it scores below 1, distinct texts first); a prompt with
    no correct or no wrong sample gives none (counted)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    pairs_per_prompt: int = 1

    def __post_init__(self) -> None:
        _positive(self, "n", "temperature", "max_tokens", "pairs_per_prompt")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    """Direct preference optimisation (``livethinking.ops.dpo_loss``: TRL's sigmoid loss
    with ``beta`` and ``label_smoothing``) on (prompt, chosen, rejected) pairs from
    ``pairs`` (JSON lines of ``{"id", "chosen", "rejected"}``, ``id`` a record of
    ``train_data``) or, when ``pairs`` is None, built by pass@N (``sampling``). Reference
    log-probs come from the starting model, computed once before training. ``sft_weight``
    α adds α · (mean NLL per chosen token over the global batch), as TRL's ``rpo_alpha``."""

    model: str  # the SFT checkpoint directory (policy and reference)
    train_data: str
    pairs: str | None = None
    eval_data: str | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    system_prompt: str | None = None
    task: Literal["livestream", "relevance"] = "livestream"
    output_format: Literal["cot", "post_cot"] = "cot"
    partial_credit: bool = False
    prompt_layout: Literal["default", "query_doc_query"] = "default"
    sampling: PassAtNConfig = field(default_factory=PassAtNConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs
    pairs_per_step: int = 8
    aux_loss: bool = True  # MoE balance loss over the pairs' response tokens
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward per rank
    activation_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def judge_kind(self) -> str:
        return self.judge.kind

    def __post_init__(self) -> None:
        _check_task(self)
        _positive(self, "beta", "epochs", "pairs_per_step", "micro_batch_tokens")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0 or self.max_steps < 0:
            raise ValueError(f"sft_weight and max_steps must be >= 0, got {self.sft_weight} "
                             f"and {self.max_steps}")
        _check_eval(self.eval_data, self.run)
