"""The rule-based virtual customer: opens with the issue, then reacts to each agent message.

Anger is an integer. It starts by mood (calm 0, impatient 1, angry 2; +1 with `prior_complaints`) and rises:
+2 for an evasive agent message, +2 for an action tool the customer did not ask for, +1 for a failed or
refused tool call, +1 per agent message past the customer's patience (calm 6, impatient 4, angry 3 turns;
-1 for VIP, +1 for new_customer), +1 when a request for a human is ignored. At `HUMAN_AT` the customer asks
for a human; at `COMPLAINT_AT` they announce a complaint and a bad review and leave. A message after the
issue is really fixed (the right tool succeeded; for questions, the message states the fact the tool gave)
is confirmed instead, whatever the anger. Templates are picked with the customer's own `random.Random`, so
a transcript is a function of the seed and the agent's text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scenarios import Scenario
from .tools import SupportState

EVASIVE_PHRASES = ("i don't know", "i do not know", "not sure", "can't help", "cannot help")
HUMAN_AT = 4
COMPLAINT_AT = 6
START_ANGER = {"calm": 0, "impatient": 1, "angry": 2}
PATIENCE = {"calm": 6, "impatient": 4, "angry": 3}

_OPENINGS = {
    "return_item": ("I want to return the {product} from order {order_id}. It isn't what I expected.",
                    "Order {order_id}: the {product} doesn't work for me, I'd like to send it back."),
    "replacement": ("The {product} from order {order_id} arrived broken. Can you send me a new one?",
                    "My {product} (order {order_id}) is damaged. I need a replacement."),
    "change_address": ("I need to change the shipping address of order {order_id} to {new_address}.",
                       "Please ship order {order_id} to {new_address} instead."),
    "refund_status": ("What's the status of my refund for order {order_id}?",
                      "I returned the {product} from order {order_id}. Where is my refund?"),
    "product_info": ("Question about the {product} in order {order_id}: {question}",
                     "Order {order_id}, the {product}: {question}"),
    "delivery_status": ("Where is my order {order_id}? When will the {product} arrive?",
                        "Can you tell me the delivery status of order {order_id}?"),
}
_QUESTIONS = {"warranty": "how long is the warranty?", "return_window": "how many days do I have to return it?"}
_MOOD_PREFIX = {"calm": ("Hello! ", "Hi there. "), "impatient": ("Hi, quickly please. ", ""),
                "angry": ("This is ridiculous. ", "I'm really annoyed. ")}
_CONFIRM = ("Thanks, that solves it.", "Great, that's exactly what I needed. Thank you!",
            "Perfect, thanks for sorting it out.")
_NUDGE = {"calm": ("Could you please help me with order {order_id}?", "Any update on my request?"),
          "impatient": ("Please just fix it, order {order_id}.", "I'm waiting. Can you do it or not?"),
          "angry": ("Stop wasting my time and fix order {order_id}!", "Are you even listening?")}
_ASK_HUMAN = ("This is going nowhere. I want to talk to a human.", "Get me a human, please.")
_STILL_HUMAN = ("I said I want a human!",)
_COMPLAINT = ("That's it. I'm filing a complaint and leaving a bad review.",
              "Unacceptable. Expect a complaint and a bad review.")


def is_evasive(text: str) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in EVASIVE_PHRASES)


@dataclass
class CustomerTurn:
    text: str
    resolved: bool = False
    asked_human: bool = False  # this turn is the first request for a human
    complaint: bool = False


class Customer:
    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.rng = random.Random(scenario.seed * 1_000_003 + 17)  # the customer's own stream
        self.anger = START_ANGER[scenario.mood] + ("prior_complaints" in scenario.tags)
        self.patience = PATIENCE[scenario.mood] - ("VIP" in scenario.tags) + ("new_customer" in scenario.tags)
        self.asked_human = False
        self.done = False

    def _fill(self, template: str) -> str:
        s, o = self.scenario, self.scenario.order
        return template.format(order_id=o.order_id, product=o.product, new_address=s.new_address,
                               question=_QUESTIONS.get(s.topic or "", ""))

    def opening(self) -> str:
        prefix = self.rng.choice(_MOOD_PREFIX[self.scenario.mood])
        return prefix + self._fill(self.rng.choice(_OPENINGS[self.scenario.intent]))

    def satisfied(self, agent_text: str, state: SupportState) -> bool:
        """Is the issue fixed, as this message tells it?"""
        s, o, low = self.scenario, self.scenario.order, agent_text.lower()
        if s.intent == "return_item":
            return state.refund_done or (state.replacement_done and not o.refund_eligible)
        if s.intent == "replacement":
            return state.replacement_done
        if s.intent == "change_address":
            return state.address_changed
        if s.intent == "refund_status":
            return state.looked_up and o.refund_status in low
        if s.intent == "product_info":
            fact = f"{o.warranty_months} month" if s.topic == "warranty" else f"{o.return_window_days} day"
            return state.looked_up and fact in low
        return state.delivery_checked and o.status in low and o.eta in low  # delivery_status

    def reply(self, agent_text: str, state: SupportState) -> CustomerTurn:
        """The customer's answer to one agent message; `state` carries the tool outcomes since the last one."""
        self.anger += state.pending_anger
        state.pending_anger = 0
        if is_evasive(agent_text):
            self.anger += 2
        if state.text_turns > self.patience:
            self.anger += 1
        if self.satisfied(agent_text, state):
            self.done = True
            return CustomerTurn(self.rng.choice(_CONFIRM), resolved=True)
        if self.anger >= COMPLAINT_AT:
            self.done = True
            return CustomerTurn(self.rng.choice(_COMPLAINT), complaint=True)
        if self.anger >= HUMAN_AT:
            if not self.asked_human:
                self.asked_human = True
                return CustomerTurn(self.rng.choice(_ASK_HUMAN), asked_human=True)
            self.anger += 1
            return CustomerTurn(self.rng.choice(_STILL_HUMAN))
        if self.scenario.intent == "change_address" and "address" in agent_text.lower():
            return CustomerTurn(f"The new address is {self.scenario.new_address}.")
        return CustomerTurn(self._fill(self.rng.choice(_NUDGE[self.scenario.mood])))
