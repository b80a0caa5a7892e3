"""Environments for multi-turn, tool-using agents (floor 1).

:mod:`~.base`: the API (``reset(task) -> messages``, ``step(action_text) -> StepResult``)
and ``ToolEnvironment``, which runs ``<tool_call>`` blocks against tool schemas and turns
bad calls into error observations; :mod:`~.tools`: the OpenAI/Qwen3 tool-call format;
:mod:`~.registry`: names -> (class, config); :mod:`~.shop`: the shopping simulator;
:mod:`~.shop_oracle`: its expert agent and the shop demo's data.
"""

from livethinking.envs.base import Environment, StepResult, ToolEnvironment
from livethinking.envs.registry import EnvironmentRegistry, default_registry
from livethinking.envs.shop import ShopConfig, ShopEnvironment, shop_rewards
from livethinking.envs.shop_oracle import expert_trajectory, make_shop_demo, oracle_action
from livethinking.envs.tools import (ToolCall, ToolCallError, ToolSpec, check_arguments,
                                     format_tool_call, parse_tool_calls)

__all__ = ["Environment", "EnvironmentRegistry", "ShopConfig", "ShopEnvironment",
           "StepResult", "ToolCall", "ToolCallError", "ToolEnvironment", "ToolSpec",
           "check_arguments", "default_registry", "expert_trajectory", "format_tool_call",
           "make_shop_demo", "oracle_action", "parse_tool_calls", "shop_rewards"]
