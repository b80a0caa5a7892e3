"""The environment API: ``reset(task) -> observation``, ``step(action_text) -> StepResult``.

An observation is a list of chat messages ({role, content}) to append to the conversation:
``reset`` gives the opening ones (system, user), ``step`` the replies to the model's turn
(``tool``-role messages with each tool's result; the rollout renders them through the
checkpoint's chat template). :class:`ToolEnvironment` does the tool plumbing: it parses
the model's ``<tool_call>`` blocks, checks arguments against the schemas and runs the
matching method; a bad call (unparseable JSON, unknown tool, wrong arguments) becomes an
``error: ...`` tool message and costs a turn, never an exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from livethinking.envs.tools import (ToolCallError, ToolSpec, check_arguments,
                                     parse_tool_calls)

__all__ = ["Environment", "StepResult", "ToolEnvironment"]


@dataclass(slots=True)
class StepResult:
    observation: list[dict[str, str]]  # messages to append after the model's turn
    reward: float
    done: bool
    info: dict = field(default_factory=dict)


class Environment(ABC):
    """The interface the trajectory rollout drives (subclass it, or duck-type it)."""

    @classmethod
    def load_tasks(cls, path) -> list:
        """The tasks of a data file, in this environment's task format."""
        raise NotImplementedError(f"{cls.__name__} does not load tasks from files")

    def tools(self) -> list[dict]:
        """The OpenAI function schemas of the tools the model may call (may be empty)."""
        return []

    @abstractmethod
    def reset(self, task) -> list[dict[str, str]]:
        """Start an episode on ``task``; the opening messages."""

    @abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply the model's turn (its whole reply text)."""


class ToolEnvironment(Environment):
    """An environment whose actions are tool calls. Subclasses list their tools in
    ``tool_specs`` (one ``ToolSpec`` per tool, run by the method ``tool_<name>(**arguments)``
    returning its result text), and may override ``on_text`` (a reply without a tool call)
    and ``after_turn`` (the reward and end of the episode after each turn)."""

    tool_specs: tuple[ToolSpec, ...] = ()
    max_calls_per_turn: int = 1

    def tools(self) -> list[dict]:
        return [spec.schema() for spec in self.tool_specs]

    def on_text(self, text: str) -> str:
        """The observation for a reply without a tool call."""
        return "error: no tool call; reply with <tool_call>{...}</tool_call>"

    def after_turn(self) -> tuple[float, bool, dict]:
        """(reward, done, info) once the turn's calls ran."""
        return 0.0, False, {}

    def step(self, action_text: str) -> StepResult:
        if not isinstance(action_text, str):
            raise TypeError(f"action_text must be a string, got {type(action_text).__name__}")
        results, errors = [], 0
        try:
            calls = parse_tool_calls(action_text)
        except ToolCallError as e:
            calls, results, errors = [], [f"error: {e}"], 1
        if not calls and not errors:
            results.append(self.on_text(action_text))
            errors += results[-1].startswith("error:")
        if len(calls) > self.max_calls_per_turn:
            results.append(f"error: at most {self.max_calls_per_turn} tool call(s) per turn; "
                           f"only the first ran")
            errors += 1
            calls = calls[:self.max_calls_per_turn]
        specs = {spec.name: spec for spec in self.tool_specs}
        for call in calls:
            spec = specs.get(call.name)
            try:
                if spec is None:
                    raise ToolCallError(f"unknown tool {call.name!r}; the tools are "
                                        f"{', '.join(specs)}")
                check_arguments(spec, call.arguments)
                results.append(getattr(self, f"tool_{call.name}")(**call.arguments))
            except ToolCallError as e:
                results.append(f"error: {e}")
                errors += 1
        reward, done, info = self.after_turn()
        info = {"tool_errors": errors, "tool_calls": [c.name for c in calls], **info}
        return StepResult([{"role": "tool", "content": text} for text in results], reward,
                          done, info)
