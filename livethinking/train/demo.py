"""``livethinking demo``: the LiveThinking recipe end to end on a CPU in minutes.

Makes the synthetic livestream set, trains a byte-level BPE tokenizer on its corpus,
builds a tiny random Qwen3-MoE student, runs RFT on the programmatic teacher's judged
samples (verbose reasoning, sometimes wrong), then GRPO with correctness + helpfulness +
length-band rewards, and prints the paper's table for the student before training, after
RFT and after GRPO on held-out prompts (held-out products): correct %, helpful %, tokens
per response, the engine's time to first token, time per output token and full-answer
latency, and the reference answers' log-likelihood; then the paper's cost table
(:mod:`.demo_cost`). Everything lands in ``--out`` (:mod:`.demo_report`): results.json,
results.md (tables and example answers), stages.png, the training plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

__all__ = ["DEMO_SIZES", "DemoSize", "run_demo"]

DEMO_SIZES = ("quick", "default", "large")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM_PROMPT = "Answer the viewer from the product document."


@dataclass(kw_only=True, slots=True)
class DemoSize:
    """The knobs that set the demo's cost. Presets (``preset(name)``): ``quick()`` the CI
    size (seconds), ``DemoSize()`` the default (minutes on 2 CPU cores), ``large()``."""

    # The default: 400 asked products × 4 questions (320 training, 80 held-out products) and
    # 4000 listing-only products whose catalogue texts (a document, then its lines again,
    # shuffled) are mixed into RFT, so the student learns to look a value up in a document
    # it has never seen instead of memorising 40 products (RESULTS.md, the demo).
    products: int = 400
    questions_per_product: int = 4
    listing_products: int = 4000
    # GRPO's prompts: 100 more products × 4 questions that neither RFT nor the held-out split
    # sees, so the correctness reward meets unseen documents as the held-out ones are (on
    # RFT's own prompts the student is right nearly always and GRPO only shortens).
    rl_products: int = 100
    hidden: int = 128
    layers: int = 2
    experts: int = 4
    teacher_k: int = 2
    rft_epochs: int = 4
    grpo_steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 200
    eval_prompts: int = 320  # every held-out prompt (80 products × 4): ±2.5 points of noise
    grpo_lr: float = 4e-4  # 6e-4 cost seed 2 more correctness (RESULTS.md, the demo)
    pretrain_epochs: int = 0  # 0: no separate pre-training pass (demo_pretrain.py)

    @classmethod
    def quick(cls) -> "DemoSize":
        return cls(products=8, questions_per_product=4, listing_products=8, rl_products=4,
                   hidden=64, layers=2,
                   experts=4, teacher_k=4, rft_epochs=15, grpo_steps=12, prompts_per_step=4,
                   group_size=4, max_tokens=160, eval_prompts=8, pretrain_epochs=0,
                   grpo_lr=6e-4)  # 12 steps: 4e-4 does not shorten the answers yet

    @classmethod
    def large(cls) -> "DemoSize":
        """The default scaled for a 16-core machine or a GPU: 3× the products (asked and
        listing-only), 2× the student's width and depth, 2× the experts, prompts per GRPO
        step and held-out prompts — about 10× the default's compute (a 512-token training
        row costs 3.5× the default's on one CPU thread); its wall time there is not yet
        measured."""
        base = cls()
        return replace(base, products=3 * base.products,
                       listing_products=3 * base.listing_products,
                       rl_products=3 * base.rl_products, hidden=2 * base.hidden,
                       layers=2 * base.layers, experts=2 * base.experts,
                       prompts_per_step=2 * base.prompts_per_step,
                       eval_prompts=2 * base.eval_prompts)

    @classmethod
    def preset(cls, name: str) -> "DemoSize":
        """The preset called ``name`` (one of ``DEMO_SIZES``)."""
        if name not in DEMO_SIZES:
            raise ValueError(f"size must be one of {', '.join(DEMO_SIZES)}, got {name!r}")
        return cls() if name == "default" else getattr(cls, name)()

    def name(self) -> str:
        """The preset this size equals, or "custom"."""
        return next((n for n in DEMO_SIZES if DemoSize.preset(n) == self), "custom")


# GPT-2's pre-tokenizer regex with "word:" kept whole, so a document's "color:" is one token
# and copying its value is a one-token lookup (what lets the tiny student learn to read).
_KEY_PRETOKENS = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+:?| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|"
                  r"\s+")


def build_tokenizer(corpus: Path, out_dir: Path, *, extra_tokens: tuple[str, ...] = ()):
    """Byte-level BPE trained on the demo corpus (exact text round trip), ChatML template,
    <think> and </think> (and ``extra_tokens``, e.g. Qwen3's <tool_call> and </tool_call>)
    as single ordinary tokens, eos = <|im_end|>; a ``word:`` (a document's key) is one
    pre-token."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([  # GPT-2's split, but "key:" stays one piece
        pre_tokenizers.Split(Regex(_KEY_PRETOKENS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus.read_text().splitlines(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:])
    tokenizer.add_tokens(["<think>", "</think>", *extra_tokens])
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
             threads: int | None = None, quiet: bool = False,
             teacher_active_params: float = 37e9, log=print) -> dict:
    """Run the whole demo; returns what ``out/results.json`` holds: the size's knobs, the
    stage rows, the cost tables and the seconds taken. ``quiet``: no progress bars, no
    banners, no log lines (errors still raise). ``teacher_active_params``: the stand-in
    teacher's active size in the cost table (default the paper's 37B)."""
    from livethinking.data import load_records, load_texts
    from livethinking.tasks.livestream import make_demo
    from livethinking.train.common import make_judges
    from livethinking.train.config import (GRPOConfig, JudgeConfig, LossConfig, OptimConfig,
                                           RewardConfig, RFTConfig, RolloutConfig, RunConfig,
                                           TeacherConfig)
    from livethinking.train.demo_measure import measure_stage
    from livethinking.train.demo_pretrain import PretrainConfig, pretrain_student
    from livethinking.train.grpo import run_grpo
    from livethinking.train.rft import run_rft

    size = size or DemoSize()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    show = not quiet  # progress bars, banners and log lines
    log = log if show else (lambda *_: None)
    if threads:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    banner = _Banner(log, total=6 if size.pretrain_epochs else 5)
    log(f"demo: size {size.name()}: " + ", ".join(f"{k}={v}" for k, v in asdict(size).items()))
    banner("data", f"{size.products} products × {size.questions_per_product} questions, a "
                   f"BPE tokenizer, a random {size.layers}-layer student")
    paths = make_demo(out / "data", num_products=size.products,
                      questions_per_product=size.questions_per_product,
                      listing_products=size.listing_products,
                      rl_products=size.rl_products, seed=seed)
    log(f"demo: data in {paths.out_dir} ({paths.num_train} training, {paths.num_heldout} "
        f"held-out and {paths.num_rl} GRPO prompts)")
    tokenizer = build_tokenizer(paths.corpus, out / "tokenizer")
    student = build_student(tokenizer, size, out / "student-init", seed)
    if size.pretrain_epochs:  # stands in for a real student's pre-training (demo_pretrain.py)
        banner("pre-training", f"the random student, {size.pretrain_epochs} epochs on the "
                               f"training catalogue ({paths.pretrain}), standing in for the "
                               f"pre-training a real student arrives with")
        student = pretrain_student(student, load_texts(paths.pretrain).items,
                                   out / "student-pretrained",
                                   PretrainConfig(epochs=size.pretrain_epochs, seed=seed),
                                   progress=show, log=log)
    heldout = load_records(paths.heldout).items[:size.eval_prompts]
    judges = make_judges(JudgeConfig())

    def measure(path: Path, label: str) -> dict:
        row = measure_stage(path, label, tokenizer, heldout, judges, max_tokens=size.max_tokens,
                            system_prompt=SYSTEM_PROMPT, examples=3, progress=show)
        log(f"demo: {label}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                           if isinstance(v, float)))
        return row

    first = "pre-trained student" if size.pretrain_epochs else "student before training"
    banner(first, f"evaluate it on {len(heldout)} held-out prompts")
    rows = [measure(student, first)]
    base_run = RunConfig(seed=seed, progress=show, tensorboard=False)
    rft = RFTConfig(model=str(student), train_data=str(paths.train), system_prompt=SYSTEM_PROMPT,
                    teacher=TeacherConfig(kind="demo", k=size.teacher_k, min_filler=0,
                                          max_filler=10),
                    lm_data=str(paths.pretrain), epochs=size.rft_epochs, row_tokens=512,
                    rows_per_step=2,
                    optim=OptimConfig(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, grad_clip=1.0),
                    run=RunConfig(**{**_fields(base_run), "output_dir": str(out / "rft")}))
    banner("RFT", f"{size.teacher_k} teacher samples per training prompt, judged; SFT on the "
                  f"accepted, mixed with the catalogue texts, for {size.rft_epochs} epochs; "
                  f"then evaluate")
    rft_model = run_rft(rft, log=log)
    rows.append(measure(rft_model, "after RFT"))
    grpo_prompts = paths.rl if paths.num_rl else paths.train
    grpo = GRPOConfig(model=str(rft_model), train_data=str(grpo_prompts),
                      system_prompt=SYSTEM_PROMPT, steps=size.grpo_steps,
                      prompts_per_step=size.prompts_per_step,
                      rollout=RolloutConfig(group_size=size.group_size, temperature=1.0,
                                            max_tokens=size.max_tokens),
                      reward=RewardConfig(w_correctness=1.0, w_helpfulness=0.5, w_length=2.0,
                                          lambda_lo=0.2, lambda_hi=0.45,
                                          length_needs_correct=True),
                      loss=LossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.02),
                      optim=OptimConfig(lr=size.grpo_lr, warmup_steps=0, min_lr_ratio=1.0),
                      run=RunConfig(**{**_fields(base_run), "output_dir": str(out / "grpo")}))
    banner("GRPO", f"{size.grpo_steps} steps × {size.prompts_per_step} prompts × "
                   f"{size.group_size} samples, correctness + helpfulness + length rewards; "
                   f"then evaluate")
    grpo_model = run_grpo(grpo, log=log)
    rows.append(measure(grpo_model, "after GRPO"))
    banner("report", f"results.md, results.json, stages.png in {out}")
    return _report(out, size, rows, rft, tokenizer, heldout, student, teacher_active_params,
                   began, log)


class _Banner:
    """Prints "[i/total] name: what" for each stage (through ``log``)."""

    def __init__(self, log, total: int) -> None:
        self.log, self.total, self.index = log, total, 0

    def __call__(self, name: str, what: str) -> None:
        self.index += 1
        self.log(f"[{self.index}/{self.total}] {name}: {what}")


def open_demo(out, label: str, size, *, stages: int, quiet: bool, threads: int | None,
              log=print):
    """What every demo does first: make ``out``, silence ``log`` when ``quiet``, set the
    torch threads, print the size's knobs; returns (out Path, log, the stage banner)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *_: None) if quiet else log
    if threads:
        torch.set_num_threads(threads)
    log(f"demo ({label}): size {size.name()}: " + ", ".join(
        f"{k}={v}" for k, v in asdict(size).items()))
    return out, log, _Banner(log, total=stages)


def _report(out: Path, size: DemoSize, rows: list[dict], rft, tokenizer, heldout, student,
            teacher_active_params: float, began: float, log) -> dict:
    """The cost tables, then results.json / results.md / stages.png; returns the results."""
    from livethinking.data import load_records
    from livethinking.model import ModelConfig
    from livethinking.train.common import response_ids
    from livethinking.train.demo_cost import (FORMULA, cost_table, format_cost_table,
                                              format_parts, model_cost, paper_student,
                                              paper_teacher)
    from livethinking.train.demo_measure import mean_prompt_tokens
    from livethinking.train.demo_report import format_table, write_report
    from livethinking.train.teacher import teacher_responses

    records = load_records(rft.train_data).items
    samples = [t for texts in teacher_responses(rft.teacher, records, seed=rft.run.seed).values()
               for t in texts]  # the programmatic teacher is deterministic: RFT's samples
    teacher_tokens = sum(len(response_ids(tokenizer, t)) for t in samples) / max(1, len(samples))
    prompt_tokens = mean_prompt_tokens(tokenizer, heldout, SYSTEM_PROMPT)
    stage_tokens = {r["model"]: r["tokens_per_response"] for r in rows}
    student_config = ModelConfig.from_dict(json.loads((Path(student) / "config.json").read_text()))
    paper = cost_table("Paper scale: the paper's teacher stand-in and Qwen3-30B-A3B, at the "
                       "demo's measured tokens", (paper_teacher(teacher_active_params),
                                                   teacher_tokens),
                       model_cost("Qwen3-30B-A3B", paper_student()), stage_tokens, prompt_tokens)
    demo = cost_table("Demo scale: the tiny student's real size (the programmatic teacher has "
                      "no parameters)", None, model_cost("demo student", student_config),
                      stage_tokens, prompt_tokens)
    cost_markdown = "\n\n".join([*(format_cost_table(t, prompt_tokens) for t in (paper, demo)),
                                 format_parts("Qwen3-30B-A3B", paper_student()) + "  \n" +
                                 format_parts("demo student", student_config), FORMULA])
    elapsed = time.perf_counter() - began
    notes = [f"Size `{size.name()}`: " + ", ".join(f"{k}={v}" for k, v in asdict(size).items()),
             f"Held-out prompts: {len(heldout)} (products never seen in training); total time "
             f"{elapsed:.0f} s; teacher: {len(samples)} samples, {teacher_tokens:.1f} tokens "
             "per answer."]
    if size.pretrain_epochs:
        epochs = f"{size.pretrain_epochs} epoch" + ("s" if size.pretrain_epochs != 1 else "")
        notes.append(f"The student was pre-trained for {epochs} on the "
                     "training catalogue (a stand-in for the pre-training a real student "
                     "arrives with); the first row is that student, before RFT.")
    results = {"size": {"name": size.name(), **asdict(size)}, "rows": rows,
               "teacher_tokens_per_answer": teacher_tokens, "prompt_tokens": prompt_tokens,
               "cost": {"paper_scale": paper.as_dict(), "demo_scale": demo.as_dict()},
               "seconds": elapsed}
    written = write_report(out, results, cost_markdown, notes)
    log("\n" + format_table(rows) + "\n\n" + cost_markdown + "\n\n" + "\n".join(notes) +
        f"\nwritten: {', '.join(str(p) for p in written)}; training plots in "
        f"{out / 'rft' / 'plots'} and {out / 'grpo' / 'plots'}")
    return results


def _fields(run) -> dict:
    from livethinking.train.config_io import config_to_dict

    return config_to_dict(run)
