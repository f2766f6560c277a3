"""`SupportEnv`: a text-level environment for a support agent, its reward table, and per-episode metrics.

One step is one agent message. If it holds tool calls (`parse_tool_calls`: `<tool_call>{...}</tool_call>`
or bare JSON), every call runs through the `ToolRegistry` and the observation is the results, one line each
(`tool NAME: RESULT`); text around the calls is not sent. Otherwise the text goes to the customer and the
observation is the customer's reply. Simulated clock: customer turn 0.4 min (the opening included), agent
turn 0.5, tool call 0.3.

The reward table (`REWARDS`), paid per step, summed in `info["reward_breakdown"]` (only rows that fired):
customer confirms the fix +5; self-service refund completed +10; resolved under 3 minutes +3 (at the end);
customer asks for a human -5 (once); an evasive agent turn -3 (each); complaint / bad review -8;
a routine question (product_info, delivery_status) answered 0 — *instead of* the +5, so routine answers
earn only the speed bonus.

Tool-call accuracy (the deploy gate's metric): a call is correct when it parses, names a known tool with
valid arguments, runs, and its result is what the case needs (no refusal, no action the customer did not ask
for, the address the customer gave); an episode that ends without the tool its case needs (`tool_missed`)
counts one more incorrect call. Departure, against reward hacking: the +10 is paid only when the customer came
to return the item; a refund nobody asked for is a wrong action that angers the customer.

This is not the token-level `slime_rl.protocols.Environment`; an adapter would tokenize around it.
"""

from __future__ import annotations

import math
from typing import Any

from slime_rl.tasks.tools import ToolResult, parse_tool_calls

from .customer import Customer, is_evasive
from .scenarios import ROUTINE_INTENTS, Scenario, make_scenario
from .tools import (AGENT_TURN_MINUTES, CUSTOMER_TURN_MINUTES, TOOL_MINUTES, SupportBackend, SupportState,
                    make_registry)

REWARDS = {"resolved": 5.0, "refund_completed": 10.0, "fast_resolution": 3.0, "asked_for_human": -5.0,
           "evasive": -3.0, "complaint": -8.0, "routine_answered": 0.0}
FAST_MINUTES = 3.0
MAX_TURNS = 12


class SupportEnv:
    """reset(seed) -> opening message; step(agent_text) -> (observation, reward, done, info)."""

    def __init__(self, max_turns: int = MAX_TURNS):
        if max_turns < 1:
            raise ValueError(f"SupportEnv.max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self._backend = SupportBackend()
        self.tools = make_registry(self._backend)  # .schemas() for the chat template's tools=
        self.scenario: Scenario | None = None
        self.state: SupportState | None = None
        self.customer: Customer | None = None
        self.transcript: list[tuple[str, str]] = []  # (role, text): customer, agent, tool
        self.done = True

    def reset(self, seed: int | None = None, scenario: Scenario | None = None) -> str:
        """Start an episode on `make_scenario(seed)` (or a given `scenario`); returns the customer's opening."""
        if (seed is None) == (scenario is None):
            raise ValueError("SupportEnv.reset takes exactly one of seed, scenario")
        self.scenario = scenario if scenario is not None else make_scenario(seed)
        self.state = SupportState.start(self.scenario)
        self._backend.state = self.state
        self.customer = Customer(self.scenario)
        self.breakdown: dict[str, float] = {}
        self.resolved = self.complaint = self.asked_human = False
        self.evasive_turns = 0
        self.done = False
        opening = self.customer.opening()
        self.state.minutes += CUSTOMER_TURN_MINUTES
        self.transcript = [("customer", opening)]
        return opening

    def _pay(self, row: str) -> float:
        self.breakdown[row] = self.breakdown.get(row, 0.0) + REWARDS[row]
        return REWARDS[row]

    def step(self, agent_text: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("SupportEnv.step after the episode ended; call reset")
        calls = parse_tool_calls(agent_text)  # a non-str is a `malformed` call, counted
        if not isinstance(agent_text, str):
            agent_text = repr(agent_text)
        st = self.state
        st.turns += 1
        st.minutes += AGENT_TURN_MINUTES
        self.transcript.append(("agent", agent_text))
        reward = 0.0
        if is_evasive(agent_text):
            self.evasive_turns += 1
            reward += self._pay("evasive")
        if calls:
            observation, reward = self._run_tools(calls, reward)
        else:
            observation, reward = self._talk(agent_text, reward)
        if not self.done and (st.transferred or st.turns >= self.max_turns):
            self.done = True
        if self.done and self.resolved and st.minutes < FAST_MINUTES:
            reward += self._pay("fast_resolution")
        return observation, reward, self.done, self.info()

    def _run_tools(self, calls: list, reward: float) -> tuple[str, float]:
        st, lines = self.state, []
        for call in calls:
            st.minutes += TOOL_MINUTES
            refunded, anger = st.refund_done, st.pending_anger
            result: ToolResult = self.tools.run(call, st.stats)
            st.correct_calls += result.ok and st.pending_anger == anger  # no refusal, no wrong action or address
            if not result.ok:
                st.pending_anger += 1  # the customer waits while the agent fumbles
            if st.refund_done and not refunded and self.scenario.intent == "return_item":
                reward += self._pay("refund_completed")
            lines.append(f"tool {result.name or '?'}: {result.content}")
            if st.transferred:
                break  # the conversation has left the agent
        observation = "\n".join(lines)
        self.transcript.append(("tool", observation))
        return observation, reward

    def _talk(self, agent_text: str, reward: float) -> tuple[str, float]:
        st = self.state
        st.text_turns += 1
        turn = self.customer.reply(agent_text, st)
        st.minutes += CUSTOMER_TURN_MINUTES
        self.transcript.append(("customer", turn.text))
        if turn.resolved:
            self.resolved = self.done = True
            reward += self._pay("routine_answered" if self.scenario.intent in ROUTINE_INTENTS else "resolved")
        if turn.asked_human:
            self.asked_human = True
            reward += self._pay("asked_for_human")
        if turn.complaint:
            self.complaint = self.done = True
            reward += self._pay("complaint")
        return turn.text, reward

    def info(self) -> dict[str, Any]:
        st = self.state
        return {"seed": self.scenario.seed, "intent": self.scenario.intent, "mood": self.scenario.mood,
                "done": self.done, "resolved": self.resolved, "refund_completed": "refund_completed" in self.breakdown,
                "transferred": st.transferred, "asked_human": self.asked_human, "complaint": self.complaint,
                "evasive_turns": self.evasive_turns, "turns": st.turns, "text_turns": st.text_turns,
                "minutes": round(st.minutes, 6), "tool_calls": st.stats.calls, "tool_valid": st.stats.ok,
                "tool_errors": {k: n for k, n in st.stats.errors.items() if n}, "refusals": st.refusals,
                "wrong_actions": st.wrong_actions, "tool_correct": st.correct_calls,
                "tool_missed": int(not self._needed_tool_done()), "anger": self.customer.anger,
                "reward_breakdown": dict(self.breakdown), "total_reward": sum(self.breakdown.values())}


    def _needed_tool_done(self) -> bool:
        """Whether the tool this case needs has run with the right result (the gate's missed call otherwise)."""
        st, intent = self.state, self.scenario.intent
        return {"return_item": st.refund_done or st.replacement_done, "replacement": st.replacement_done,
                "change_address": st.address_changed, "delivery_status": st.delivery_checked,
                "refund_status": st.looked_up, "product_info": st.looked_up}[intent]


def episode_metrics(info_list: list[dict[str, Any]]) -> dict[str, float]:
    """Batch metrics from each episode's final `info`."""
    n = len(info_list)
    if n == 0:
        raise ValueError("episode_metrics needs at least one episode's info")

    def rate(key: str) -> float:
        return sum(bool(i[key]) for i in info_list) / n

    calls = sum(i["tool_calls"] for i in info_list)
    turns = sum(i["turns"] for i in info_list)
    graded = calls + sum(i["tool_missed"] for i in info_list)  # every call, plus each case's missing needed call
    return {"resolution_rate": rate("resolved"),
            "refunds_completed": float(sum(i["refund_completed"] for i in info_list)),
            "transfer_rate": rate("transferred"), "human_request_rate": rate("asked_human"),
            "complaint_rate": rate("complaint"),
            "evasive_rate": sum(i["evasive_turns"] for i in info_list) / turns if turns else 0.0,
            "mean_turns": sum(i["turns"] for i in info_list) / n,
            "mean_minutes": sum(i["minutes"] for i in info_list) / n,
            "tool_call_validity": sum(i["tool_valid"] for i in info_list) / calls if calls else math.nan,
            "tool_call_accuracy": sum(i["tool_correct"] for i in info_list) / graded if graded else math.nan,
            "tool_call_accuracy_n": float(graded),
            "mean_reward": sum(i["total_reward"] for i in info_list) / n}
