"""Tools an agent can call: a registry, a parser for the call formats models write, and a guarded runner.

Model output is hostile input. Every way a call can go wrong — text that is not a call, malformed JSON, an
unknown tool, arguments of the wrong shape, oversized text, a tool that raises or hangs — becomes an error
*observation* the model sees next turn (`ToolResult.ok` False, `error` naming the kind) and a count in
`ToolStats`; nothing raises out of `ToolRegistry.run`.

Call formats (`parse_tool_calls`):
- Hermes / Qwen chat templates: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or more;
- a response that is nothing but that JSON object (or a list of them).
`arguments` may also be a JSON string holding the object (some templates write it so).

Arguments are checked against the tool's JSON-schema subset: `type` (object, string, integer, number,
boolean, array, null), `properties`, `required`, `additionalProperties: false`, `enum`, `items`,
`minimum` / `maximum`, `maxLength`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_CALL_CHARS = 16_384  # a call's text (JSON) beyond this is refused unparsed
MAX_OBSERVATION_CHARS = 4_096  # a tool's result is cut to this many characters
ERROR_KINDS = ("no_call", "malformed", "unknown_tool", "bad_arguments", "too_large", "raised", "timeout")

_TAGGED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_TYPES = {"object": dict, "string": str, "array": list, "boolean": bool, "null": type(None)}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any]  # called with the arguments as keyword arguments
    timeout_s: float = 5.0

    def schema(self) -> dict[str, Any]:
        """The OpenAI / HF chat-template form: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolResult:
    name: str | None
    ok: bool
    content: str  # what the model sees: the result, or the error in words
    error: str | None = None  # one of ERROR_KINDS


@dataclass
class ToolStats:
    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))

    def add(self, result: ToolResult) -> None:
        self.calls += 1
        if result.ok:
            self.ok += 1
        else:
            self.errors[result.error] = self.errors.get(result.error, 0) + 1

    def metrics(self, prefix: str = "tools") -> dict[str, float]:
        out = {f"{prefix}/calls": float(self.calls),
               f"{prefix}/valid_frac": self.ok / self.calls if self.calls else float("nan")}
        out.update({f"{prefix}/{kind}": float(n) for kind, n in self.errors.items()})
        return out


def _error(name: str | None, kind: str, why: str) -> ToolResult:
    return ToolResult(name=name, ok=False, content=f"error ({kind}): {why}", error=kind)


def parse_tool_calls(text: str) -> list[ToolCall | ToolResult]:
    """The calls in a model's response, in order; each unusable one is a ToolResult error in its place.

    An empty list: the response makes no call (plain text)."""
    if not isinstance(text, str):
        return [_error(None, "malformed", "the response is not text")]
    blocks = _TAGGED.findall(text)
    if not blocks:
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            return []  # an answer in words, not a call
        blocks = [stripped]
    calls: list[ToolCall | ToolResult] = []
    for block in blocks:
        if len(block) > MAX_CALL_CHARS:
            calls.append(_error(None, "too_large", f"a call of {len(block)} characters (at most {MAX_CALL_CHARS})"))
            continue
        try:
            obj = json.loads(block)
        except (ValueError, RecursionError) as exc:
            calls.append(_error(None, "malformed", f"not valid JSON ({str(exc)[:80]})"))
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            calls.append(_one_call(item))
    return calls


def _one_call(obj: Any) -> ToolCall | ToolResult:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return _error(None, "malformed", 'a call is {"name": <string>, "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return _error(obj["name"], "malformed", "arguments is a string that is not a JSON object")
    if not isinstance(args, dict):
        return _error(obj["name"], "bad_arguments", f"arguments must be an object, got {type(args).__name__}")
    return ToolCall(name=obj["name"], arguments=args)


def check_arguments(value: Any, schema: dict[str, Any], path: str = "arguments") -> str | None:
    """None when `value` fits the schema subset; else why not (naming the path)."""
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in _TYPES:
        ok = isinstance(value, _TYPES[kind])
    else:
        ok = True
    if not ok:
        return f"{path} must be {kind}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {schema['enum']}, got {str(value)[:40]!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path} must be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path} must be <= {schema['maximum']}"
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{path} is longer than {schema['maxLength']} characters"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            why = check_arguments(item, schema["items"], f"{path}[{i}]")
            if why:
                return why
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return f"{path} lacks {', '.join(missing)}"
        if schema.get("additionalProperties") is False:
            extra = [k for k in value if k not in props]
            if extra:
                return f"{path} has unknown keys {', '.join(map(str, extra[:5]))}"
        for key, sub in props.items():
            if key in value:
                why = check_arguments(value[key], sub, f"{path}.{key}")
                if why:
                    return why
    return None


class ToolRegistry:
    """The tools of a task; `run` turns a call (or a parse error) into a ToolResult, never an exception."""

    def __init__(self, tools: list[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name!r} is registered already")
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name!r}: parameters must be a JSON schema of type object")
        self.tools[tool.name] = tool
        return tool

    def schemas(self) -> list[dict[str, Any]]:
        """For the chat template's `tools=`."""
        return [t.schema() for t in self.tools.values()]

    def run(self, call: ToolCall | ToolResult, stats: ToolStats | None = None) -> ToolResult:
        result = call if isinstance(call, ToolResult) else self._run(call)
        if stats is not None:
            stats.add(result)
        return result

    def _run(self, call: ToolCall) -> ToolResult:
        tool = self.tools.get(call.name)
        if tool is None:
            return _error(call.name, "unknown_tool", f"no tool {call.name[:60]!r}; tools: {', '.join(self.tools)}")
        why = check_arguments(call.arguments, tool.parameters)
        if why:
            return _error(call.name, "bad_arguments", why)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = tool.fn(**call.arguments)
            except Exception as exc:  # noqa: BLE001 - a tool's failure is an observation
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)  # a hung tool is left behind
        worker.start()
        worker.join(tool.timeout_s)
        if worker.is_alive():
            return _error(call.name, "timeout", f"{tool.name} did not answer within {tool.timeout_s:g}s")
        if "error" in box:
            exc = box["error"]
            return _error(call.name, "raised", f"{tool.name} failed: {type(exc).__name__}: {str(exc)[:200]}")
        try:
            content = box["value"] if isinstance(box["value"], str) else json.dumps(box["value"], default=str)
        except (TypeError, ValueError) as exc:
            return _error(call.name, "raised", f"{tool.name} returned something not JSON ({exc})")
        return ToolResult(name=call.name, ok=True, content=content[:MAX_OBSERVATION_CHARS])
