"""``livethinking demo --task shop``: a tool-using shopping agent, SFT then GRPO.

1. data: the synthetic shop (families of near-identical products, simulated shoppers with
   hidden preferences), the oracle's trajectories of the training shoppers and of
   relabelled copies of their families (fresh ids and names: ids and names are labels the
   agent must copy, not recall), and the oracle's episodes in random relabelled families
   as plain text; a tokenizer that holds each catalogue id as one token, as generative
   recommenders give each item its own token (a 2-layer student does not learn to copy a
   4-digit id digit by digit within the demo's budget: 6 % and 2.5 % held out, measured);
2. pre-training, the stand-in for a real student's: language modelling on those episode
   texts, every token a target (the tool results too), so the random student learns to
   copy labels from the context before SFT;
3. SFT on the trajectories (the loss on the agent's turns only);
4. GRPO on trajectories the policy plays against the simulator, for the SFT shoppers and
   shoppers of the training families whose wishes the SFT data does not hold (``rl.jsonl``),
   mixed; groups per shopper, reward = strict + ``loose_weight`` · loose, IPA chunk credit
   by default;
before training, after SFT and after GRPO, shoppers are served once each, greedily:
training shoppers (what the stages fit), and two held-out sets: new shoppers of the
training families (each wants a variant no training shopper wants: the agent must ask and
choose for this shopper) and shoppers of families no training shopper
wants (new products too); per set the full-success rate (strict), loose reward, turns and
tokens per episode.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["SHOP_SIZES", "ShopDemoSize", "run_shop_demo"]

SHOP_SIZES = ("quick", "default")


@dataclass(kw_only=True, slots=True)
class ShopDemoSize:
    """The knobs that set the shop demo's cost (``preset(name)``)."""

    families: int = 200
    heldout_families: int = 40
    tasks_per_family: int = 2
    relabelled_copies: int = 4  # SFT copies of each training shopper under fresh labels
    pretrain_episodes: int = 6000  # episode texts in random relabelled families
    pretrain_epochs: int = 2  # 1 epoch: the copy lookup failed to form in 2 of 5 runs
    eval_shoppers: int = 80  # new shoppers of training families served per stage
    hidden: int = 128
    layers: int = 2
    experts: int = 4
    sft_epochs: int = 4
    grpo_steps: int = 30
    tasks_per_step: int = 8
    group_size: int = 4
    max_turns: int = 8
    max_turn_tokens: int = 64
    credit: str = "chunk"
    grpo_lr: float = 1e-4

    @classmethod
    def quick(cls) -> "ShopDemoSize":
        return cls(families=16, heldout_families=4, relabelled_copies=2, pretrain_episodes=200,
                   pretrain_epochs=1, eval_shoppers=8, hidden=64, sft_epochs=10,
                   grpo_steps=2, tasks_per_step=2, group_size=2, max_turns=6,
                   max_turn_tokens=48)

    @classmethod
    def preset(cls, name: str) -> "ShopDemoSize":
        if name not in SHOP_SIZES:
            raise ValueError(f"size must be one of {', '.join(SHOP_SIZES)}, got {name!r}")
        return cls() if name == "default" else getattr(cls, name)()

    def name(self) -> str:
        return next((n for n in SHOP_SIZES if ShopDemoSize.preset(n) == self), "custom")


def run_shop_demo(out: str | Path, *, size: ShopDemoSize | None = None, seed: int = 0,
                  threads: int | None = None, quiet: bool = False, log=print) -> dict:
    """Run the shop demo; returns what ``out/results.json`` holds."""
    from livethinking.engine import LLM
    from livethinking.envs import make_shop_demo
    from livethinking.model import CausalLM
    from livethinking.rollout import TrajectoryConfig
    from livethinking.tasks.shop import load_catalogue, load_shop_tasks, write_shop_tasks
    from livethinking.train.agent import evaluate_agent, run_agent_grpo, run_agent_sft
    from livethinking.train.agent_config import AgentGRPOConfig, AgentSFTConfig, EnvConfig
    from livethinking.train.config import LossConfig, OptimConfig, RunConfig
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer, open_demo
    from livethinking.train.demo_pretrain import PretrainConfig, pretrain_student

    size = size or ShopDemoSize()
    began = time.perf_counter()
    show = not quiet
    out, log, stage = open_demo(out, "shop", size, stages=5, quiet=quiet, threads=threads,
                                log=log)
    stage("data", f"{size.families} product families of near-identical variants, "
                  f"{size.tasks_per_family} shoppers each; the oracle's trajectories, "
                  f"{size.relabelled_copies} relabelled copies, {size.pretrain_episodes} "
                  f"pre-training episodes")
    paths = make_shop_demo(out / "data", num_families=size.families,
                           heldout_families=size.heldout_families,
                           tasks_per_family=size.tasks_per_family,
                           relabelled_copies=size.relabelled_copies,
                           pretrain_episodes=size.pretrain_episodes, seed=seed)
    product_ids = [p.id for p in load_catalogue(paths.catalogue)]  # one token each
    tokenizer = build_tokenizer(paths.corpus, out / "tokenizer",
                                extra_tokens=("<tool_call>", "</tool_call>", *product_ids))
    student = build_student(tokenizer, DemoSize(hidden=size.hidden, layers=size.layers,
                                                experts=size.experts), out / "student-init", seed)
    env = EnvConfig(name="shop", config={"catalogue": str(paths.catalogue),
                                         "max_turns": size.max_turns})
    heldout = {"train": load_shop_tasks(paths.train)[:size.eval_shoppers],
               "seen": load_shop_tasks(paths.heldout)[:size.eval_shoppers],
               "new": load_shop_tasks(paths.heldout_new)}
    greedy = TrajectoryConfig(max_turns=size.max_turns, max_turn_tokens=size.max_turn_tokens,
                              max_total_tokens=512, temperature=0.0)
    timings: dict[str, float] = {}

    def measure(path, label):
        model = CausalLM.from_pretrained(path).eval()
        llm = LLM(model, tokenizer, max_num_seqs=64)
        row = {"stage": label}
        for kind, tasks in heldout.items():
            t = time.perf_counter()
            with torch.no_grad():
                stats, _ = evaluate_agent(llm, tokenizer, env, tasks, greedy, seed=seed)
            for key in ("strict", "loose"):  # no episode reached the shop's end: all failed
                stats.setdefault(key, 0.0)
            row[kind] = {"episodes": len(tasks), "seconds": time.perf_counter() - t, **stats}
            log(f"demo (shop): {label}, {_KINDS[kind]}: full success "
                f"{stats.get('strict', 0):.1%}, loose {stats.get('loose', 0):.3f}, "
                f"{stats['turns']:.1f} turns, {stats['tokens']:.0f} tokens "
                f"({stats['model_tokens']:.0f} the agent's) per episode")
        return row

    rows = [measure(student, "before training")]
    stage("pre-training", f"{paths.num_pretrain} episode texts, {size.pretrain_epochs} "
                          f"epoch(s), every token a target")
    t = time.perf_counter()
    texts = [json.loads(line)["text"] for line in paths.pretrain.read_text().splitlines()]
    pretrain = PretrainConfig(epochs=size.pretrain_epochs, seed=seed)
    pretrained = (pretrain_student(student, texts, out / "student-pretrained", pretrain,
                                   progress=show, log=log) if texts else student)
    timings["pretrain_s"] = time.perf_counter() - t
    run = (lambda name: RunConfig(seed=seed, progress=show, tensorboard=False,
                                  output_dir=str(out / name)))
    stage("SFT", f"{paths.num_expert} expert trajectories ({paths.num_train} shoppers, "
                 f"{size.relabelled_copies} relabelled copies), {size.sft_epochs} epochs, the "
                 f"loss on the agent's turns")
    t = time.perf_counter()
    sft_model = run_agent_sft(AgentSFTConfig(
        model=str(pretrained), train_data=str(paths.expert), env=env, epochs=size.sft_epochs,
        row_tokens=1024, rows_per_step=2,
        optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1), run=run("sft")), log=log)
    timings["sft_s"] = time.perf_counter() - t
    rows.append(measure(sft_model, "after SFT"))
    stage("GRPO", f"{size.grpo_steps} steps × {size.tasks_per_step} shoppers × "
                  f"{size.group_size} trajectories, credit {size.credit}: the SFT shoppers and "
                  f"{paths.num_rl} shoppers with wishes the SFT data lacks")
    t = time.perf_counter()
    grpo_tasks = out / "data" / "grpo.jsonl"  # the SFT shoppers and the RL shoppers, mixed
    write_shop_tasks(grpo_tasks, load_shop_tasks(paths.train) + load_shop_tasks(paths.rl))
    grpo_model = run_agent_grpo(AgentGRPOConfig(
        model=str(sft_model), train_data=str(grpo_tasks), env=env, steps=size.grpo_steps,
        tasks_per_step=size.tasks_per_step, group_size=size.group_size,
        trajectory=TrajectoryConfig(max_turns=size.max_turns,
                                    max_turn_tokens=size.max_turn_tokens,
                                    max_total_tokens=512, temperature=1.0),
        loss=LossConfig(credit=size.credit, epsilon_high=0.28),
        optim=OptimConfig(lr=size.grpo_lr, warmup_steps=0, min_lr_ratio=1.0), run=run("grpo")),
        log=log)
    timings["grpo_s"] = time.perf_counter() - t
    rows.append(measure(grpo_model, "after GRPO"))
    stage("report", f"results.md and results.json in {out}")
    results = {"task": "shop", "size": {"name": size.name(), **asdict(size)}, "rows": rows,
               "num_train": paths.num_train, "tasks": {k: len(v) for k, v in heldout.items()},
               "seconds": time.perf_counter() - began, **timings}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(results))
    log(f"demo (shop): written {out / 'results.md'}, {out / 'results.json'}")
    return results


_KINDS = {"train": "training shoppers (the SFT data's)",
          "seen": "new shoppers of training families",
          "new": "shoppers of unseen families"}


def _markdown(results: dict) -> str:
    tasks = results["tasks"]
    lines = [f"# The shop demo ({results['size']['name']} size, "
             f"{results['seconds']:.0f} s)", "",
             f"{results['num_train']} training shoppers (the first {tasks['train']} served "
             f"again); held out: {tasks['seen']} new shoppers of training families "
             f"(variants no training shopper wants) and {tasks['new']} shoppers of unseen "
             f"families. Every shopper is served once, greedily."]
    for kind, title in _KINDS.items():
        lines += ["", f"## {title[0].upper() + title[1:]}", "",
                  "| stage | full success | loose | turns | tokens / episode | agent tokens | "
                  "tool errors | prefix-cache hit |", "|---|---|---|---|---|---|---|---|"]
        for row in results["rows"]:
            r = row[kind]
            lines.append(f"| {row['stage']} | {r.get('strict', 0):.1%} | "
                         f"{r.get('loose', 0):.3f} | {r['turns']:.2f} | {r['tokens']:.0f} | "
                         f"{r['model_tokens']:.0f} | {r['tool_errors']:.2f} | "
                         f"{r['prefix_hit']:.1%} |")
    return "\n".join(lines) + "\n"
