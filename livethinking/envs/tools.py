"""Tool calls in the OpenAI / Qwen3 format: schemas, parsing and argument checks.

A model calls a tool by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
in its reply (Qwen3's and Hermes' convention; ``arguments`` may also be a JSON string, as
the OpenAI API sends it). A schema is the OpenAI function schema
``{"type": "function", "function": {"name", "description", "parameters"}}``, which chat
templates render into the system prompt (``tools=`` of ``apply_chat_template``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["ToolCall", "ToolCallError", "ToolSpec", "check_arguments", "format_tool_call",
           "parse_tool_calls"]

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "object": dict, "array": list}


class ToolCallError(ValueError):
    """A tool call the environment cannot run; its message is shown to the model."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool: its name, what it does, and its parameters as a JSON schema object
    (``properties`` name -> {"type", "description", ["items"]}, ``required`` names)."""

    name: str
    description: str
    properties: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def schema(self) -> dict:
        """The OpenAI function-tool schema."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": dict(self.properties),
                           "required": list(self.required)}}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict


def format_tool_call(name: str, arguments: dict) -> str:
    """``<tool_call>{"name": name, "arguments": arguments}</tool_call>`` (compact JSON)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments},
                                      ensure_ascii=False) + "</tool_call>"


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of ``text``, in order. ToolCallError (naming the
    problem) for a block that is not a JSON object with a string ``name`` and an object
    (or JSON-object string) ``arguments``, or for an unclosed ``<tool_call>``."""
    calls = []
    for match in _CALL.finditer(text):
        body = match.group(1).strip()
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"the tool call is not valid JSON ({e.msg} at character "
                                f"{e.pos})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise ToolCallError('a tool call must be a JSON object with a string "name"')
        arguments = payload.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ToolCallError(f'the arguments of {payload["name"]} are not valid '
                                    f'JSON') from None
        if not isinstance(arguments, dict):
            raise ToolCallError(f'the arguments of {payload["name"]} must be a JSON object')
        calls.append(ToolCall(payload["name"], arguments))
    if text.count("<tool_call>") > len(calls):
        raise ToolCallError("a <tool_call> is not closed by </tool_call>")
    return calls


def _type_ok(value, kind: str) -> bool:
    expected = _JSON_TYPES.get(kind)
    if expected is None:
        return True
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, expected)


def check_arguments(spec: ToolSpec, arguments: dict) -> None:
    """ToolCallError unless ``arguments`` has every required parameter, no unknown one,
    and each value of its declared JSON type (array items too, when declared)."""
    missing = [name for name in spec.required if name not in arguments]
    if missing:
        raise ToolCallError(f"{spec.name} needs the argument(s) {', '.join(missing)}")
    unknown = sorted(set(arguments) - set(spec.properties))
    if unknown:
        raise ToolCallError(f"{spec.name} has no argument(s) {', '.join(unknown)}; it takes "
                            f"{', '.join(spec.properties) or 'none'}")
    for name, value in arguments.items():
        declared = spec.properties[name]
        kind = declared.get("type")
        if kind and not _type_ok(value, kind):
            raise ToolCallError(f"{spec.name}: {name} must be a JSON {kind}")
        items = declared.get("items", {}).get("type")
        if kind == "array" and items and not all(_type_ok(v, items) for v in value):
            raise ToolCallError(f"{spec.name}: every item of {name} must be a JSON {items}")
