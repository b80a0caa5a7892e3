"""The expert shopping agent: search, compare the hits, ask the shopper about the
attributes in which they differ, search again with the answers as filters, buy.

:func:`oracle_action` is a function of the conversation so far (it reads the last call and
its result), so it can drive any episode of the shop simulator; its trajectories are the
SFT data of the shop demo (:func:`make_shop_demo` writes them beside the shop's data), and
its episodes on relabelled families (:mod:`livethinking.tasks.shop.relabel`) the demo's
pre-training texts and extra SFT copies.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from livethinking.data import write_jsonl, write_text_atomic
from livethinking.envs.shop import ShopConfig, ShopEnvironment
from livethinking.envs.tools import format_tool_call, parse_tool_calls
from livethinking.tasks.shop.demo_data import ShopPaths, make_shop_data
from livethinking.tasks.shop.records import ShopTask, load_catalogue, load_shop_tasks
from livethinking.tasks.shop.relabel import random_families, relabel_shopper, unused_family_names
from livethinking.tasks.shop.shopper import (format_view, parse_comparison, parse_reply,
                                             parse_results)

__all__ = ["episode_text", "expert_trajectory", "make_shop_demo", "oracle_action",
           "question_for"]


def question_for(attributes: list[str]) -> str:
    """``Which color and material would you like?``"""
    if len(attributes) == 1:
        names = attributes[0]
    else:
        names = ", ".join(attributes[:-1]) + " and " + attributes[-1]
    return f"Which {names} would you like?"


def _last_call(messages: list[dict]):
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            try:
                calls = parse_tool_calls(messages[i]["content"])
            except ValueError:
                return None, ""
            result = "\n".join(m["content"] for m in messages[i + 1:] if m["role"] == "tool")
            return (calls[0] if calls else None), result
    return None, ""


def oracle_action(task: ShopTask, messages: list[dict]) -> str:
    """The expert's next turn (a tool call) given the conversation ``messages``."""
    call, result = _last_call(messages)
    if call is None:
        return format_tool_call("search", {"query": task.family})
    if call.name == "search" and not call.arguments.get("filters"):
        ids = parse_results(result)
        if len(ids) > 1:
            return format_tool_call("compare", {"ids": ids})
        if ids:
            return format_tool_call("buy", {"product_id": ids[0]})
        return format_tool_call("search", {"query": task.category})
    if call.name == "compare":
        differing = parse_comparison(result)
        if differing:
            return format_tool_call("ask_user", {"question": question_for(differing)})
        return format_tool_call("buy", {"product_id": call.arguments["ids"][0]})
    if call.name == "ask_user":
        return format_tool_call("search", {"query": task.family,
                                           "filters": parse_reply(result)})
    ids = parse_results(result)
    if ids:
        return format_tool_call("buy", {"product_id": ids[0]})
    return format_tool_call("search", {"query": task.family})


def expert_trajectory(env: ShopEnvironment, task: ShopTask) -> tuple[list[dict], dict]:
    """The oracle's episode on ``task``: (messages, the final step's info with reward)."""
    messages = env.reset(task)
    while True:
        action = oracle_action(task, messages)
        result = env.step(action)
        messages += [{"role": "assistant", "content": action}, *result.observation]
        if result.done:
            return messages, {"reward": result.reward, **result.info}


def episode_text(messages: list[dict]) -> str:
    """An episode as plain text for language-model pre-training: every message after the
    system prompt (the request, each call, each tool result), one per line."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def make_shop_demo(out_dir: str | Path, *, num_families: int = 120, heldout_families: int = 30,
                   tasks_per_family: int = 2, relabelled_copies: int = 0,
                   pretrain_episodes: int = 0, seed: int = 0) -> ShopPaths:
    """The shop set (``make_shop_data``) plus:

    * ``expert.jsonl``: the oracle's trajectory of every training shopper
      (``{"task_id", "messages", "reward", "strict", "loose"}``), then, per copy, its
      trajectory of each training shopper in a relabelled copy of the family (fresh ids from
      the catalogue's, a name no catalogue family has; ``task_id`` ends ``~c``, ``c`` the
      copy);
    * ``pretrain.jsonl``: ``{"text"}`` of the oracle's episodes (:func:`episode_text`) in
      ``pretrain_episodes`` random families under such labels;
    * ``corpus.txt``: the texts a demo tokenizer learns from (the training shoppers'
      trajectories and every product's details).

    No held-out shopper, and no held-out family's name, enters expert.jsonl or
    pretrain.jsonl; held-out ids do, as labels of other variants."""
    for name, value in (("relabelled_copies", relabelled_copies),
                        ("pretrain_episodes", pretrain_episodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    paths = make_shop_data(out_dir, num_families=num_families,
                           heldout_families=heldout_families,
                           tasks_per_family=tasks_per_family, seed=seed)
    catalogue = load_catalogue(paths.catalogue)
    env = ShopEnvironment(ShopConfig(catalogue=str(paths.catalogue)))
    train = load_shop_tasks(paths.train)
    experts, texts = [], []
    for task in train:
        messages, info = expert_trajectory(env, task)
        experts.append(_expert_record(task.id, messages, info))
        texts += [m["content"] for m in messages]
    texts += [format_view(p) for p in catalogue]
    rng = random.Random(f"{seed}\x00relabel")  # the shop's splits above stay as they were
    id_pool = [p.id for p in catalogue]
    names = unused_family_names(catalogue)
    by_family: dict[str, list] = {}
    for p in catalogue:
        by_family.setdefault(p.name, []).append(p)
    for copy in range(relabelled_copies):
        for task in train:
            products, relabelled = relabel_shopper(rng, task, by_family[task.family], id_pool,
                                                   names)
            messages, info = expert_trajectory(
                ShopEnvironment(ShopConfig(products=tuple(products))), relabelled)
            experts.append(_expert_record(f"{task.id}~{copy}", messages, info))
    pretrain = []
    for products, task in random_families(rng, pretrain_episodes, id_pool, names):
        messages, _ = expert_trajectory(ShopEnvironment(ShopConfig(products=tuple(products))),
                                        task)
        pretrain.append(json.dumps({"text": episode_text(messages)}) + "\n")
    write_jsonl(paths.expert, experts)
    write_text_atomic(paths.pretrain, "".join(pretrain))
    write_text_atomic(paths.corpus, "\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return replace(paths, num_expert=len(experts), num_pretrain=len(pretrain))


def _expert_record(task_id: str, messages: list[dict], info: dict) -> dict:
    return {"task_id": task_id, "messages": messages, "reward": info["reward"],
            "strict": info["strict"], "loose": info["loose"]}
