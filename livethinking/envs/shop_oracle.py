"""The expert shopping agent: search, compare the hits, ask the shopper about the
attributes in which they differ, search again with the answers as filters, buy.

:func:`oracle_action` is a function of the conversation so far (it reads the last call and
its result), so it can drive any episode of the shop simulator; its trajectories are the
SFT data of the shop demo (:func:`make_shop_demo` writes them beside the shop's data).
"""

from __future__ import annotations

from pathlib import Path

from livethinking.data import write_jsonl, write_text_atomic
from livethinking.envs.shop import ShopConfig, ShopEnvironment
from livethinking.envs.tools import format_tool_call, parse_tool_calls
from livethinking.tasks.shop.demo_data import ShopPaths, make_shop_data
from livethinking.tasks.shop.records import ShopTask, load_catalogue, load_shop_tasks
from livethinking.tasks.shop.shopper import (format_view, parse_comparison, parse_reply,
                                             parse_results)

__all__ = ["expert_trajectory", "make_shop_demo", "oracle_action", "question_for"]


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


def make_shop_demo(out_dir: str | Path, *, num_families: int = 120, heldout_families: int = 30,
                   tasks_per_family: int = 2, seed: int = 0) -> ShopPaths:
    """The shop set (``make_shop_data``) plus ``expert.jsonl``, the oracle's trajectory of
    every training shopper (``{"task_id", "messages", "reward", "strict", "loose"}``), and
    ``corpus.txt``, the texts a demo tokenizer learns from (those trajectories and every
    product's details)."""
    paths = make_shop_data(out_dir, num_families=num_families,
                           heldout_families=heldout_families,
                           tasks_per_family=tasks_per_family, seed=seed)
    env = ShopEnvironment(ShopConfig(catalogue=str(paths.catalogue)))
    experts, texts = [], []
    for task in load_shop_tasks(paths.train):
        messages, info = expert_trajectory(env, task)
        experts.append({"task_id": task.id, "messages": messages, "reward": info["reward"],
                        "strict": info["strict"], "loose": info["loose"]})
        texts += [m["content"] for m in messages]
    texts += [format_view(p) for p in load_catalogue(paths.catalogue)]
    write_jsonl(paths.expert, experts)
    write_text_atomic(paths.corpus, "\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return paths
