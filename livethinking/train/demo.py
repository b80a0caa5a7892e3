"""``livethinking demo``: the LiveThinking recipe end to end on a CPU in minutes.

Makes the synthetic livestream set, trains a byte-level BPE tokenizer on its corpus,
builds a tiny random Qwen3-MoE student, runs RFT on the programmatic teacher's judged
samples (verbose reasoning, sometimes wrong), then GRPO with correctness + helpfulness +
length-band rewards, and prints the paper's table for the student before training, after
RFT and after GRPO on held-out prompts (held-out products): correct %, helpful %, tokens
per response and the engine's time to first token. Everything lands in ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DemoSize", "run_demo"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM_PROMPT = "Answer the viewer from the product document."


@dataclass(kw_only=True, slots=True)
class DemoSize:
    """The knobs that set the demo's cost; ``quick()`` is the CI size."""

    products: int = 40
    questions_per_product: int = 6
    hidden: int = 128
    layers: int = 2
    experts: int = 4
    teacher_k: int = 4
    rft_epochs: int = 14
    grpo_steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 160
    eval_prompts: int = 48

    @classmethod
    def quick(cls) -> "DemoSize":
        return cls(products=8, questions_per_product=4, hidden=32, layers=2, experts=4,
                   teacher_k=2, rft_epochs=2, grpo_steps=2, prompts_per_step=2, group_size=4,
                   max_tokens=48, eval_prompts=6)


def build_tokenizer(corpus: Path, out_dir: Path):
    """Byte-level BPE trained on the demo corpus (exact text round trip), ChatML template,
    <think> and </think> as single ordinary tokens, eos = <|im_end|>."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus.read_text().splitlines(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:])
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return transformers.AutoTokenizer.from_pretrained(out_dir)


def build_student(tokenizer, size: DemoSize, out_dir: Path, seed: int):
    from livethinking.model import CausalLM, ModelConfig

    config = ModelConfig(model_type="qwen3_moe", vocab_size=len(tokenizer), hidden_size=size.hidden,
                         intermediate_size=2 * size.hidden, num_hidden_layers=size.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=size.hidden // 4,
                         max_position_embeddings=512, moe_intermediate_size=size.hidden,
                         num_experts=size.experts, num_experts_per_tok=2, norm_topk_prob=True,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, router_aux_loss_coef=0.01)
    torch.manual_seed(seed)
    model = CausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.save_pretrained(out_dir, tokenizer=tokenizer)


def run_demo(out: str | Path, *, size: DemoSize | None = None, seed: int = 0,
             threads: int | None = None, log=print) -> dict:
    """Run the whole demo; returns the table rows (also written to ``out/results.json``)."""
    from livethinking.data import load_records
    from livethinking.tasks.livestream import make_demo
    from livethinking.model import CausalLM
    from livethinking.train.common import evaluate, make_judges
    from livethinking.train.config import (GRPOConfig, JudgeConfig, LossConfig, OptimConfig,
                                           RewardConfig, RFTConfig, RolloutConfig, RunConfig,
                                           TeacherConfig)
    from livethinking.train.grpo import run_grpo
    from livethinking.train.rft import run_rft

    size = size or DemoSize()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    paths = make_demo(out / "data", num_products=size.products,
                      questions_per_product=size.questions_per_product, seed=seed)
    log(f"demo: data in {paths.out_dir} ({paths.num_train} training, {paths.num_heldout} "
        f"held-out prompts)")
    tokenizer = build_tokenizer(paths.corpus, out / "tokenizer")
    student = build_student(tokenizer, size, out / "student-init", seed)
    heldout = load_records(paths.heldout).items[:size.eval_prompts]
    judges = make_judges(JudgeConfig())

    def measure(path: Path, label: str) -> dict:
        model = CausalLM.from_pretrained(path)
        result = evaluate(model, tokenizer, heldout, judges, max_tokens=size.max_tokens,
                          system_prompt=SYSTEM_PROMPT)
        row = {"model": label, **result.as_dict()}
        log(f"demo: {label}: {row}")
        return row

    rows = [measure(student, "student before training")]
    quiet = RunConfig(seed=seed, progress=False, tensorboard=False)
    rft = RFTConfig(model=str(student), train_data=str(paths.train), system_prompt=SYSTEM_PROMPT,
                    teacher=TeacherConfig(kind="demo", k=size.teacher_k, min_filler=0,
                                          max_filler=10),
                    epochs=size.rft_epochs, row_tokens=512, rows_per_step=4,
                    optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1, grad_clip=1.0),
                    run=RunConfig(**{**_fields(quiet), "output_dir": str(out / "rft")}))
    rft_model = run_rft(rft, log=log)
    rows.append(measure(rft_model, "after RFT"))
    grpo = GRPOConfig(model=str(rft_model), train_data=str(paths.train),
                      system_prompt=SYSTEM_PROMPT, steps=size.grpo_steps,
                      prompts_per_step=size.prompts_per_step,
                      rollout=RolloutConfig(group_size=size.group_size, temperature=1.0,
                                            max_tokens=size.max_tokens),
                      reward=RewardConfig(w_correctness=1.0, w_helpfulness=0.5, w_length=2.0,
                                          lambda_lo=0.2, lambda_hi=0.45,
                                          length_needs_correct=True),
                      loss=LossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.02),
                      optim=OptimConfig(lr=6e-4, warmup_steps=0, min_lr_ratio=1.0),
                      run=RunConfig(**{**_fields(quiet), "output_dir": str(out / "grpo")}))
    grpo_model = run_grpo(grpo, log=log)
    rows.append(measure(grpo_model, "after GRPO"))
    elapsed = time.perf_counter() - began
    table = format_table(rows)
    log("\n" + table + f"\n(held-out prompts: {len(heldout)}; total time {elapsed:.0f} s; plots "
        f"in {out / 'rft' / 'plots'} and {out / 'grpo' / 'plots'})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": elapsed}, indent=2))
    (out / "results.md").write_text(table + "\n")
    return {"rows": rows, "seconds": elapsed}


def _fields(run) -> dict:
    from livethinking.train.config_io import config_to_dict

    return config_to_dict(run)


def format_table(rows: list[dict]) -> str:
    lines = ["| model | correct | helpful | tokens / response | TTFT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {100 * r['correct']:.1f}% | {100 * r['helpful']:.1f}% | "
                     f"{r['tokens_per_response']:.1f} | {r['ttft_ms']:.1f} ms |")
    return "\n".join(lines)
