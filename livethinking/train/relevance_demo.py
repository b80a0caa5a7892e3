"""``livethinking demo --task relevance``: TaoSR1's recipe on synthetic search relevance.

Stages, each on the same tiny random MoE student, in one response format (``output_format``:
``cot``, reasoning then label, by default; ``post_cot``, TaoSR1's deployed label-first form):
1. CoT SFT: k programmatic-teacher samples per training query (a reasoning that looks each
   queried value up in the document, sometimes a sound reasoning with a wrong label or a
   misread step), kept when the label is right and the format valid, then SFT (``rft``);
2. pass@N DPO: N samples per training query from the SFT model; chosen a correct label,
   rejected a wrong one (``dpo``); each query's accuracy is saved as ``pass_at_n.jsonl``;
3. difficulty-aware GRPO: only queries whose pass@N accuracy lies in (0.1, 0.95) are
   drawn, re-estimated online from the rollout groups; reward = exact label + 0.2 · format;
4. CumPT: per stage, the label read from the label token's distribution (post_cot: the
   first response token, one forward; cot: after the greedy reasoning), τ calibrated on
   the dev split for macro-F1, against the label parsed from a full decode.

post_cot replaces stage 1 by label-first SFT (``relevance_label.py``): ``label_products``
× ``queries_per_product`` extra synthetic queries (no dev or held-out product), the
``query_doc_query`` prompt layout (the query before and after the document, no tier
definitions), loss = 4-way CE of the first response token over the label tokens + 0.3 ·
CE of the whole response (label, then the rule's reasoning).
Trained as the CoT SFT stage (few queries, the teacher's samples, label weight 1 of ~40
tokens, the tier definitions before the document) the 2-layer student stays at chance
(25 %) label first. Measured in ``benchmarks/RESULTS.md`` (the relevance demo entries).

Held-out and dev queries are about products that no training query mentions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["RelevanceDemoSize", "run_relevance_demo"]

RELEVANCE_SIZES = ("quick", "default", "large")


@dataclass(kw_only=True, slots=True)
class RelevanceDemoSize:
    """The knobs that set the relevance demo's cost (``preset(name)``)."""

    products: int = 400
    queries_per_product: int = 4
    hidden: int = 128
    layers: int = 2
    experts: int = 4
    teacher_k: int = 2
    sft_epochs: int = 6
    pass_n: int = 8
    dpo_epochs: int = 1
    grpo_steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 80  # a response: label and ~40 tokens of reasoning
    eval_records: int = 320
    output_format: str = "cot"  # or "post_cot": label first (TaoSR1's deployed form)
    label_products: int = 7000  # post_cot: products of label-first SFT's extra queries
    label_steps: int = 1100  # post_cot: label-first SFT steps of 32 queries
    label_lr: float = 1e-3  # post_cot: label-first SFT peak lr (2e-3 stalled at chance longer)

    def __post_init__(self) -> None:
        from livethinking.tasks.relevance.responses import check_output_format

        check_output_format(self.output_format)

    @classmethod
    def quick(cls) -> "RelevanceDemoSize":
        return cls(products=24, queries_per_product=4, hidden=64, teacher_k=2, sft_epochs=6,
                   pass_n=4, grpo_steps=4, prompts_per_step=4, group_size=4, max_tokens=64,
                   eval_records=16, label_products=24, label_steps=200,
                   label_lr=3e-3)

    @classmethod
    def large(cls) -> "RelevanceDemoSize":
        """3× the products, 2× the student's width and depth and experts (a 16-core machine
        or a GPU; not yet timed there)."""
        base = cls()
        return replace(base, products=3 * base.products, hidden=2 * base.hidden,
                       layers=2 * base.layers, experts=2 * base.experts,
                       eval_records=2 * base.eval_records)

    @classmethod
    def preset(cls, name: str) -> "RelevanceDemoSize":
        if name not in RELEVANCE_SIZES:
            raise ValueError(f"size must be one of {', '.join(RELEVANCE_SIZES)}, got {name!r}")
        return cls() if name == "default" else getattr(cls, name)()

    def name(self) -> str:
        """The preset this size is (whatever its output format), else ``"custom"``."""
        return next((n for n in RELEVANCE_SIZES if replace(RelevanceDemoSize.preset(n),
                     output_format=self.output_format) == self), "custom")


def run_relevance_demo(out: str | Path, *, size: RelevanceDemoSize | None = None, seed: int = 0,
                       threads: int | None = None, quiet: bool = False, log=print) -> dict:
    """Run the relevance demo; returns what ``out/results.json`` holds (the size's knobs,
    one row per stage, the seconds taken). ``quiet``: no progress bars, banners or logs."""
    from livethinking.tasks.relevance import make_relevance_demo
    from livethinking.train.config import (DifficultyConfig, DPOConfig, GRPOConfig, LossConfig,
                                           OptimConfig, PassAtNConfig, RewardConfig, RFTConfig,
                                           RolloutConfig, RunConfig, TeacherConfig)
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer, open_demo
    from livethinking.train.dpo import ACCURACY_FILE, run_dpo
    from livethinking.train.grpo import run_grpo
    from livethinking.train.relevance_label import LabelFirstConfig, train_label_first
    from livethinking.train.relevance_measure import measure_relevance_stage
    from livethinking.train.rft import run_rft
    from livethinking.train.tasks import Task

    size = size or RelevanceDemoSize()
    show = not quiet
    began = time.perf_counter()
    out, log, stage = open_demo(out, "relevance", size, stages=5, quiet=quiet,
                                threads=threads, log=log)
    stage("data", f"{size.products} products × {size.queries_per_product} queries with graded "
                  f"relevance, a BPE tokenizer, a random {size.layers}-layer student")
    fmt = size.output_format
    label_first = fmt == "post_cot"
    paths = make_relevance_demo(out / "data", num_products=size.products,
                                queries_per_product=size.queries_per_product, seed=seed,
                                label_products=size.label_products if label_first else 0)
    tokenizer = build_tokenizer(paths.corpus, out / "tokenizer")
    student = build_student(tokenizer, DemoSize(hidden=size.hidden, layers=size.layers,
                                                experts=size.experts), out / "student-init", seed)
    layout = "query_doc_query" if label_first else "default"
    task = Task("relevance", output_format=fmt, prompt_layout=layout)
    dev = task.load(paths.dev)
    heldout = task.load(paths.heldout)[:size.eval_records]
    timings: dict[str, float] = {}

    def measure(path, label):
        row = measure_relevance_stage(path, label, tokenizer, task, dev, heldout,
                                      max_tokens=size.max_tokens, progress=show)
        log(f"demo: {label}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                           if isinstance(v, float)))
        return row

    rows = [measure(student, "before training")]
    common = dict(train_data=str(paths.train), task="relevance", output_format=fmt,
                  prompt_layout=layout)
    run = (lambda name: RunConfig(seed=seed, progress=show, tensorboard=False,
                                  output_dir=str(out / name)))
    t = time.perf_counter()
    if label_first:
        stage("label-first SFT", f"{size.label_steps} steps × 32 of {paths.num_label_train} "
                                 f"extra queries and the {paths.num_train} training ones: "
                                 f"the first token's tier + 0.3 × the response")
        records = task.load(paths.label_train) + task.load(paths.train)
        sft_model = train_label_first(student, tokenizer, task, records, out / "sft",
                                      LabelFirstConfig(steps=size.label_steps,
                                                       lr=size.label_lr, seed=seed),
                                      log=log)
    else:
        stage("CoT SFT", f"{size.teacher_k} teacher samples per query, judged (label and "
                         f"format); SFT for {size.sft_epochs} epochs")
        sft_model = run_rft(RFTConfig(
            model=str(student), **common, epochs=size.sft_epochs, row_tokens=512,
            rows_per_step=2, teacher=TeacherConfig(kind="demo", k=size.teacher_k,
                                                   error_rate=0.25),
            helpful_threshold=1.0,
            optim=OptimConfig(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1), run=run("sft")),
            log=log)
    timings["sft_s"] = time.perf_counter() - t
    rows.append(measure(sft_model, "after label-first SFT" if label_first else "after CoT SFT"))
    stage("pass@N DPO", f"{size.pass_n} samples per query from the SFT model; pairs of a "
                        f"right and a wrong label; DPO for {size.dpo_epochs} epoch(s)")
    t = time.perf_counter()
    dpo_model = run_dpo(DPOConfig(
        model=str(sft_model), **common, beta=0.1, sft_weight=0.2, epochs=size.dpo_epochs,
        pairs_per_step=8, sampling=PassAtNConfig(n=size.pass_n, max_tokens=size.max_tokens),
        optim=OptimConfig(lr=2e-4, warmup_steps=5, min_lr_ratio=0.1), run=run("dpo")), log=log)
    timings["dpo_s"] = time.perf_counter() - t
    rows.append(measure(dpo_model, "after pass@N DPO"))
    stage("difficulty-aware GRPO", f"{size.grpo_steps} steps × {size.prompts_per_step} queries "
                                   f"× {size.group_size} samples, queries with pass@N accuracy "
                                   f"in (0.1, 0.95) only")
    t = time.perf_counter()
    grpo_model = run_grpo(GRPOConfig(
        model=str(dpo_model), **common, steps=size.grpo_steps,
        prompts_per_step=size.prompts_per_step,
        difficulty=DifficultyConfig(enabled=True, accuracy_file=str(out / "dpo" / ACCURACY_FILE)),
        rollout=RolloutConfig(group_size=size.group_size, temperature=1.0,
                              max_tokens=size.max_tokens),
        reward=RewardConfig(w_correctness=1.0, w_helpfulness=0.2, w_length=0.0),
        loss=LossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.0),
        optim=OptimConfig(lr=3e-4, warmup_steps=0, min_lr_ratio=1.0), run=run("grpo")), log=log)
    timings["grpo_s"] = time.perf_counter() - t
    rows.append(measure(grpo_model, "after GRPO"))
    stage("report", f"results.md, results.json, stages.png in {out}")
    results = {"task": "relevance", "size": {"name": size.name(), **asdict(size)},
               "rows": rows, "records": {"train": paths.num_train, "dev": len(dev),
                                         "heldout": len(heldout)},
               "seconds": time.perf_counter() - began, **timings}
    from livethinking.train.relevance_report import write_relevance_report

    written = write_relevance_report(out, results)
    log(f"demo (relevance): written {', '.join(str(p) for p in written)}")
    return results
