"""The paper's cost table for the demo: active parameters, tokens and compute per answer.

LiveThinking's headline is cost: 30× = 12× from distillation (a 670B teacher with 37B
active parameters → Qwen3-30B-A3B, 3.3B active) × 2.5× from shorter reasoning (GRPO).
This module states that arithmetic with the demo's own measured token counts:

    compute per answer C = 2 · N_active · n  +  Σ_{i=1..n} 2 · L · (P + i) · (d_qk + d_v)
                         = 2 · N_active · n  +  2 · L · (d_qk + d_v) · (n · P + n (n + 1) / 2)

for an answer of n tokens after a prompt of P tokens: 2 FLOPs per active weight per token
(the matmuls; the lm-head is counted through the embedding matrix), plus, per layer and
per generated position attending over its context P + i, the scores q·kᵀ (2 · d_qk per
key) and the weighted sum of values (2 · d_v per key), where d_qk = q-heads · qk-head-dim
and d_v = q-heads · v-head-dim (Qwen3: both q-heads · head_dim, so the term is
2 · L · ctx · (q-heads · head_dim) · 2 per token).

Active parameters of a Qwen3(-MoE) config (``active_parameters``): the embedding matrix
(and a separate lm-head unless tied), per layer q/k/v/o projections, the q/k RMSNorm
weights, the two layer norms, the router (hidden × experts) and the top-k experts'
gate/up/down (3 · hidden · moe_intermediate each), and the final norm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["FORMULA", "CostModel", "CostTable", "active_parameters", "answer_flops", "cost_table",
           "format_cost_table", "format_parts", "model_cost", "paper_student", "paper_teacher"]

FORMULA = ("compute / answer = 2 · N_active · n + 2 · L · (d_qk + d_v) · (n · P + n(n+1)/2)  "
           "(n answer tokens, P prompt tokens, L layers, d_qk = d_v = q-heads · head_dim for "
           "Qwen3)")


@dataclass(kw_only=True, slots=True, frozen=True)
class CostModel:
    """What the cost of one answer depends on: active parameters per token and the
    attention widths (d_qk = q-heads · qk-head-dim, d_v = q-heads · v-head-dim)."""

    name: str
    active_params: int
    layers: int
    d_qk: int
    d_v: int


def active_parameters(config) -> dict[str, int]:
    """Active parameters per token of a ``ModelConfig`` by part (and ``total``):
    embeddings (+ lm-head when untied), attention, norms, router, routed experts (top-k
    of them; a dense layer's MLP counts whole)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    # q, k, v, o projections and the per-head q/k RMSNorm weights (Qwen3)
    attention = layers * (h * q_width + 2 * h * kv_width + q_width * h + 2 * config.head_dim)
    norms = layers * 2 * h + h  # input and post-attention norms, the final norm
    router = experts = 0
    for layer in range(layers):
        if config.is_moe_layer(layer):
            router += h * config.num_experts
            experts += config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
        else:
            experts += 3 * h * config.intermediate_size
    parts = {"embeddings": embeddings, "attention": attention, "norms": norms,
             "router": router, "experts": experts}
    return parts | {"total": sum(parts.values())}


def model_cost(name: str, config) -> CostModel:
    """The cost model of a Qwen3(-MoE) ``ModelConfig`` (active parameters counted from it)."""
    width = config.num_attention_heads * config.head_dim
    return CostModel(name=name, active_params=active_parameters(config)["total"],
                     layers=config.num_hidden_layers, d_qk=width, d_v=width)


def paper_student():
    """Qwen3-30B-A3B's shapes (the paper's student) as a ``ModelConfig``: 48 layers,
    hidden 2048, 32 q-heads / 4 kv-heads of 128, 128 experts top-8 of 768, vocab 151936,
    untied embeddings."""
    from livethinking.model import ModelConfig

    return ModelConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                       num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                       tie_word_embeddings=False)


def paper_teacher(active_params: float = 37e9) -> CostModel:
    """The paper's 670B teacher as a stand-in: ``active_params`` (default the 37B active of
    a DeepSeek-V3/R1-class MoE) with DeepSeek-V3's attention (61 layers, 128 heads, MLA
    qk-head-dim 192, v-head-dim 128)."""
    if not active_params > 0:
        raise ValueError(f"teacher active_params must be > 0, got {active_params}")
    return CostModel(name=f"teacher stand-in ({active_params / 1e9:.1f}B active)",
                     active_params=int(active_params), layers=61, d_qk=128 * 192,
                     d_v=128 * 128)


def answer_flops(model: CostModel, answer_tokens: float, prompt_tokens: float) -> float:
    """FLOPs of one answer: 2 · N_active · n + 2 · L · (d_qk + d_v) · (n · P + n(n+1)/2)."""
    n, p = float(answer_tokens), float(prompt_tokens)
    attention = 2 * model.layers * (model.d_qk + model.d_v) * (n * p + n * (n + 1) / 2)
    return 2 * model.active_params * n + attention


@dataclass(kw_only=True, slots=True)
class CostTable:
    """Per model: active parameters, tokens per answer, FLOPs per answer; and the factors:
    distillation = C(teacher) / C(after RFT) (with the active-parameter ratio beside it),
    shorter reasoning = C(after RFT) / C(after GRPO) (with the token ratio n(RFT) / n(GRPO)
    beside it), total = their product = C(teacher) / C(after GRPO)."""

    title: str
    rows: list[dict]
    distillation: float | None
    distillation_params: float | None
    shorter_reasoning: float
    shorter_reasoning_tokens: float
    total: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def cost_table(title: str, teacher: tuple[CostModel, float] | None, student: CostModel,
               stage_tokens: dict[str, float], prompt_tokens: float) -> CostTable:
    """The cost table of ``teacher`` (its model and mean tokens per answer; None when the
    teacher has no parameters to count) and ``student`` at each stage's mean tokens per
    answer (``stage_tokens``: label → tokens; must hold "after RFT" and "after GRPO")."""
    for stage in ("after RFT", "after GRPO"):
        if stage not in stage_tokens:
            raise ValueError(f"stage_tokens must hold {stage!r}, got {sorted(stage_tokens)}")
    entries = ([(teacher[0].name, teacher[0], teacher[1])] if teacher else []) + \
        [(label, student, tokens) for label, tokens in stage_tokens.items()]
    rows = [{"model": label, "active_params": m.active_params, "tokens": tokens,
             "flops": answer_flops(m, tokens, prompt_tokens)} for label, m, tokens in entries]
    flops = {r["model"]: r["flops"] for r in rows}
    rft, grpo = flops["after RFT"], flops["after GRPO"]
    distillation = flops[teacher[0].name] / rft if teacher else None
    params_ratio = teacher[0].active_params / student.active_params if teacher else None
    shorter = rft / grpo
    tokens_ratio = stage_tokens["after RFT"] / stage_tokens["after GRPO"]
    return CostTable(title=title, rows=rows, distillation=distillation,
                     distillation_params=params_ratio, shorter_reasoning=shorter,
                     shorter_reasoning_tokens=tokens_ratio,
                     total=distillation * shorter if teacher else None)


def format_cost_table(table: CostTable, prompt_tokens: float) -> str:
    """Markdown: the table and its factors (``FORMULA`` states the compute)."""
    lines = [f"**{table.title}** (mean prompt {prompt_tokens:.0f} tokens)", "",
             "| model | active params | tokens / answer | compute / answer |", "|---|---|---|---|"]
    for r in table.rows:
        lines.append(f"| {r['model']} | {_count(r['active_params'])} | {r['tokens']:.1f} | "
                     f"{r['flops']:.3g} FLOPs |")
    lines.append("")
    factors = []
    if table.distillation is not None:
        factors.append(f"distillation (teacher ÷ after RFT) {table.distillation:.1f}× "
                       f"(active params {table.distillation_params:.1f}×)")
    factors.append(f"shorter reasoning (after RFT ÷ after GRPO) {table.shorter_reasoning:.2f}× "
                   f"(tokens {table.shorter_reasoning_tokens:.2f}×)")
    if table.total is not None:
        factors.append(f"total (teacher ÷ after GRPO) {table.total:.1f}× — the paper: "
                       "12× × 2.5× = 30×")
    lines.append("; ".join(factors))
    return "\n".join(lines)


def format_parts(name: str, config) -> str:
    """One line: ``name``'s active parameters per token by part (``active_parameters``)."""
    parts = active_parameters(config)
    listed = ", ".join(f"{k} {_count(v)}" for k, v in parts.items() if k != "total")
    return f"{name}: {_count(parts['total'])} active parameters per token = {listed}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
