"""Tool calls from model text: the parser, argument checks and the guarded runner, by hand and by fuzzing."""

from __future__ import annotations

import json
import random
import threading

import pytest

from slime_rl.tasks.tools import (ERROR_KINDS, MAX_CALL_CHARS, Tool, ToolCall, ToolRegistry, ToolResult, ToolStats,
                                  check_arguments, parse_tool_calls)

RELEASE = threading.Event()  # lets the hung tool's thread end when the module is done


def lookup_order(order_id: str, verbose: bool = False):
    if order_id == "boom":
        raise RuntimeError("database unavailable")
    return {"order_id": order_id, "status": "shipped"}


def hang(seconds: int):
    RELEASE.wait(30)
    return "late"


ORDER = {"type": "object", "properties": {"order_id": {"type": "string", "maxLength": 20},
                                          "verbose": {"type": "boolean"}},
         "required": ["order_id"], "additionalProperties": False}
REGISTRY = ToolRegistry([
    Tool("lookup_order", "Find an order", ORDER, lookup_order),
    Tool("hang", "Never answers", {"type": "object", "properties": {"seconds": {"type": "integer", "minimum": 0}},
                                   "required": ["seconds"]}, hang, timeout_s=0.2),
])


@pytest.fixture(scope="module", autouse=True)
def release_hung_tools():
    yield
    RELEASE.set()


def call(text: str, stats: ToolStats | None = None) -> list[ToolResult]:
    return [REGISTRY.run(c, stats) for c in parse_tool_calls(text)]


def test_hermes_and_plain_json_calls():
    text = ('Let me check.<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A1"}}</tool_call>'
            '<tool_call>{"name": "lookup_order", "arguments": "{\\"order_id\\": \\"B2\\"}"}</tool_call>')
    results = call(text)
    assert [r.ok for r in results] == [True, True]
    assert json.loads(results[0].content) == {"order_id": "A1", "status": "shipped"}
    assert json.loads(results[1].content)["order_id"] == "B2"
    plain = parse_tool_calls(' {"name": "lookup_order", "arguments": {"order_id": "C3"}} ')
    assert plain == [ToolCall("lookup_order", {"order_id": "C3"})]
    assert parse_tool_calls("The capital of France is Paris.") == []  # words, not a call
    assert REGISTRY.schemas()[0]["function"]["name"] == "lookup_order"


@pytest.mark.parametrize("text, kind", [
    ("<tool_call>{not json}</tool_call>", "malformed"),
    ('<tool_call>{"arguments": {}}</tool_call>', "malformed"),
    ('<tool_call>"just a string"</tool_call>', "malformed"),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "unknown_tool"),
    ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": 7}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "lookup_order", "arguments": {}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A", "x": 1}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": "' + "x" * 30 + '"}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "lookup_order", "arguments": [1]}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "hang", "arguments": {"seconds": true}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "hang", "arguments": {"seconds": -1}}</tool_call>', "bad_arguments"),
    ("<tool_call>" + '{"name": "lookup_order", "arguments": {"order_id": "' + "x" * MAX_CALL_CHARS + '"}}</tool_call>',
     "too_large"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "too_large"),
    ("[" * 5000 + "]" * 5000, "malformed"),
    ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": "boom"}}</tool_call>', "raised"),
    ('<tool_call>{"name": "hang", "arguments": {"seconds": 9}}</tool_call>', "timeout"),
])
def test_every_failure_is_an_error_observation(text, kind):
    stats = ToolStats()
    results = call(text, stats)
    assert len(results) == 1 and not results[0].ok and results[0].error == kind, results
    assert results[0].content.startswith(f"error ({kind})")
    assert stats.calls == 1 and stats.errors[kind] == 1 and stats.metrics()["tools/valid_frac"] == 0.0


def test_check_arguments_names_the_path():
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}}}
    assert check_arguments({"items": [1, 2]}, schema) is None
    assert check_arguments({"items": [1, "2"]}, schema) == "arguments.items[1] must be integer, got str"


def test_fuzzed_calls_never_raise_and_are_all_counted():
    rng = random.Random(0)
    valid = '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A1"}}</tool_call>'
    alphabet = '{}[]":,<>/\\ tool_call name arguments 0123456789 true null -.eE\x00\u00e9\ud800'
    stats = ToolStats()
    n = 0
    for i in range(600):
        chars = list(valid)
        for _ in range(rng.randint(1, 6)):  # mutate: replace, insert, delete
            op, pos = rng.randrange(3), rng.randrange(len(chars) + 1)
            if op == 0 and pos < len(chars):
                chars[pos] = rng.choice(alphabet)
            elif op == 1:
                chars.insert(pos, rng.choice(alphabet))
            elif pos < len(chars):
                del chars[pos]
        text = "".join(chars) if i % 5 else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        for result in call(text, stats):
            n += 1
            assert isinstance(result, ToolResult) and (result.ok or result.error in ERROR_KINDS)
    assert stats.calls == n and stats.ok + sum(stats.errors.values()) == n and n > 100
    assert stats.ok > 0 and stats.errors["malformed"] > 0
    assert call(None) and call(None)[0].error == "malformed"  # not even text


def test_registry_refuses_bad_tools():
    with pytest.raises(ValueError, match="registered already"):
        REGISTRY.register(Tool("lookup_order", "", ORDER, lookup_order))
    with pytest.raises(ValueError, match="type object"):
        ToolRegistry([Tool("t", "", {"type": "string"}, str)])
