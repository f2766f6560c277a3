"""Scripted agents for the support simulator: a baseline to beat, a floor, and an episode runner.

A policy is `policy(observation_history, scenario_view) -> agent_text`: the history is every observation
so far (the customer's opening first), the view is `Scenario.view()` (intent, mood, tags — what a model could
read off the messages). The oracle reads the order id and the new address from the customer's words and the
facts from the tools' results, as a model would; it never looks at the hidden order.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from .env import SupportEnv

Policy = Callable[[list[str], dict], str]

_ORDER_ID = re.compile(r"\bA\d{4}\b")
_NEW_ADDRESS = re.compile(r"(?:to|is) (\d+ [^,]+, [A-Za-z ]+?)(?: instead)?\.\s*$", re.MULTILINE)
_TOOL_LINE = re.compile(r"^tool (\w+): (.*)$", re.MULTILINE)


def tool_call(name: str, **arguments: Any) -> str:
    """An agent message holding one call, in the Hermes / Qwen format."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _results(history: list[str]) -> dict[str, str]:
    """The latest result of each tool in the history."""
    out: dict[str, str] = {}
    for obs in history[1:]:
        for name, content in _TOOL_LINE.findall(obs):
            out[name] = content
    return out


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def oracle_policy(observation_history: list[str], scenario_view: dict) -> str:
    """Resolves each intent with the right tools, then tells the customer in one message."""
    opening = observation_history[0]
    found = _ORDER_ID.search(opening)
    if found is None:
        return "Could you tell me your order id, please?"
    oid, intent, done = found.group(0), scenario_view["intent"], _results(observation_history)
    order = _json(done.get("lookup_order", ""))
    if intent == "return_item":
        if not order:
            return tool_call("lookup_order", order_id=oid)
        if order["refund_eligible"] and "start_self_service_refund" not in done:
            return tool_call("start_self_service_refund", order_id=oid, reason="customer return")
        if not order["refund_eligible"] and "create_replacement" not in done:
            return tool_call("create_replacement", order_id=oid)
        if "start_self_service_refund" in done:
            return f"Your refund for order {oid} has started; a return label is on its way by email."
        return (f"Order {oid} is past self-service refunds, so I've sent you a replacement instead; "
                "it ships within 2 days.")
    if intent == "replacement":
        if "create_replacement" not in done:
            return tool_call("create_replacement", order_id=oid)
        return f"A replacement for order {oid} is on its way; it ships within 2 days."
    if intent == "change_address":
        address = _NEW_ADDRESS.findall("\n".join(observation_history))
        if not address:
            return "Sure, what is the new address?"
        if "change_address" not in done:
            return tool_call("change_address", order_id=oid, new_address=address[-1].strip())
        return f"Done: order {oid} will ship to {address[-1].strip()}."
    if intent == "delivery_status":
        status = _json(done.get("check_delivery", ""))
        if not status:
            return tool_call("check_delivery", order_id=oid)
        date = next(v for k, v in status.items() if k not in ("order_id", "status", "carrier"))
        return f"Order {oid} is {status['status']} ({status['carrier']}), date: {date}."
    if not order:
        return tool_call("lookup_order", order_id=oid)
    if intent == "refund_status":
        return f"The refund for order {oid} is {order['refund_status']}."
    if "warranty" in opening:
        return f"The {order['product']} has a warranty of {order['warranty_months']} months."
    return f"You can return the {order['product']} within {order['return_window_days']} days of delivery."


_EVASIVE = ("I'm not sure, I don't know.", "Sorry, I can't help with that.", "I don't know, honestly.")


def evasive_policy(observation_history: list[str], scenario_view: dict) -> str:
    """Never acts, never commits: the floor every trained agent must beat."""
    return _EVASIVE[(len(observation_history) - 1) % len(_EVASIVE)]


_HEDGES = ("I'm not sure, let me see what I can do.", "Sorry, I don't know yet. One moment.")


def hedging_policy(observation_history: list[str], scenario_view: dict) -> str:
    """A logged agent with a bad habit: hedges for its first two messages, then works like the oracle. Each
    hedge is evasive (-3, the customer angrier), and the delay costs the speed bonus; an angry customer asks
    for a human or leaves before the fix."""
    turn = len(observation_history) - 1
    return _HEDGES[turn] if turn < len(_HEDGES) else oracle_policy(observation_history, scenario_view)


def run_episode(env: SupportEnv, policy: Policy, seed: int) -> tuple[float, dict[str, Any]]:
    """Play one episode of `make_scenario(seed)`; returns (total reward, final info)."""
    history = [env.reset(seed)]
    view = env.scenario.view()
    total, done, info = 0.0, False, {}
    while not done:
        observation, reward, done, info = env.step(policy(history, view))
        history.append(observation)
        total += reward
    return total, info


def run_episodes(policy: Policy, seeds, env: SupportEnv | None = None) -> list[tuple[float, dict[str, Any]]]:
    env = env or SupportEnv()
    return [run_episode(env, policy, s) for s in seeds]
