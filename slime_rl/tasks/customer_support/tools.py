"""The agent's business tools and the episode state they act on.

Each tool is a `slime_rl.tasks.tools.Tool` with a JSON schema, bound to a `SupportBackend` whose `state` the
environment swaps at every reset (so one `ToolRegistry` serves all episodes). Two kinds of failure:
- a call the order system cannot take (an unknown order id, an empty reason or address) raises, which
  `ToolRegistry.run` turns into an `error (raised): ...` observation and counts as an invalid call;
- a call that is well-formed but against the business rules (a refund on a non-eligible order, an address
  change after shipping, a second refund) returns a `refused: ...` result: a valid call, a recorded refusal.
Both anger the customer (see `customer.py`); neither raises out of the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slime_rl.tasks.tools import Tool, ToolRegistry, ToolStats

from .scenarios import Scenario

TOOL_MINUTES = 0.3  # simulated time per tool call (failed ones included)
AGENT_TURN_MINUTES = 0.5
CUSTOMER_TURN_MINUTES = 0.4

ACTION_TOOLS = ("start_self_service_refund", "create_replacement", "change_address")


@dataclass
class SupportState:
    """Everything that happened in one episode; the tools write it, the customer and the reward read it."""

    scenario: Scenario
    address: str
    minutes: float = 0.0
    turns: int = 0  # agent steps
    text_turns: int = 0  # agent steps that spoke to the customer
    refund_done: bool = False
    replacement_done: bool = False
    address_changed: bool = False
    transferred: bool = False
    looked_up: bool = False  # lookup_order succeeded on the customer's order
    delivery_checked: bool = False  # check_delivery succeeded on the customer's order
    refusals: int = 0
    wrong_actions: int = 0  # action tools the customer did not ask for
    correct_calls: int = 0  # valid calls of a tool the case needs, with the result it needs (see env)
    pending_anger: int = 0  # from tool outcomes, felt by the customer at their next turn
    stats: ToolStats = field(default_factory=ToolStats)
    log: list[tuple[str, dict, str]] = field(default_factory=list)  # (tool, arguments, outcome)

    @classmethod
    def start(cls, scenario: Scenario) -> "SupportState":
        return cls(scenario=scenario, address=scenario.order.address)


class SupportBackend:
    """The order system the tools call; `state` is the current episode's."""

    def __init__(self) -> None:
        self.state: SupportState | None = None

    def _order(self, order_id: str):
        order = self.state.scenario.order
        if order_id.strip().upper() != order.order_id:
            raise LookupError(f"no order {order_id[:20]!r} for this customer")
        return order

    def _outcome(self, tool: str, args: dict, outcome: str, *, refused: bool = False) -> str:
        self.state.log.append((tool, args, outcome))
        if refused:
            self.state.refusals += 1
            self.state.pending_anger += 1
        return outcome

    def _wrong_action(self, tool: str) -> None:
        intent = self.state.scenario.intent
        wanted = {"start_self_service_refund": intent == "return_item",
                  "create_replacement": intent == "replacement" or (
                      intent == "return_item" and not self.state.scenario.order.refund_eligible),
                  "change_address": intent == "change_address"}[tool]
        if not wanted:
            self.state.wrong_actions += 1
            self.state.pending_anger += 2

    def lookup_order(self, order_id: str) -> dict[str, Any]:
        o = self._order(order_id)
        self.state.looked_up = True
        self._outcome("lookup_order", {"order_id": order_id}, "found")
        return {"order_id": o.order_id, "product": o.product, "order_date": o.order_date, "status": o.status,
                "refund_eligible": o.refund_eligible and not self.state.refund_done, "address": self.state.address,
                "warranty_months": o.warranty_months, "return_window_days": o.return_window_days,
                "refund_status": "approved" if self.state.refund_done else o.refund_status}

    def start_self_service_refund(self, order_id: str, reason: str) -> str:
        o, args = self._order(order_id), {"order_id": order_id, "reason": reason}
        if not reason.strip():
            raise ValueError("reason must not be empty")
        if self.state.refund_done or o.refund_status is not None:
            return self._outcome("start_self_service_refund", args, f"refused: order {o.order_id} already has "
                                 "a refund", refused=True)
        if o.status != "delivered":
            return self._outcome("start_self_service_refund", args, f"refused: order {o.order_id} is "
                                 f"{o.status}, not delivered yet", refused=True)
        if not o.refund_eligible:
            return self._outcome("start_self_service_refund", args, f"refused: order {o.order_id} is not "
                                 "eligible for a self-service refund", refused=True)
        self._wrong_action("start_self_service_refund")
        self.state.refund_done = True
        return self._outcome("start_self_service_refund", args, f"ok: refund for order {o.order_id} started; "
                             "the customer gets a return label by email")

    def create_replacement(self, order_id: str) -> str:
        o, args = self._order(order_id), {"order_id": order_id}
        if self.state.replacement_done:
            return self._outcome("create_replacement", args, f"refused: order {o.order_id} already has a "
                                 "replacement", refused=True)
        if o.status != "delivered":
            return self._outcome("create_replacement", args, f"refused: order {o.order_id} is {o.status}, "
                                 "not delivered yet", refused=True)
        self._wrong_action("create_replacement")
        self.state.replacement_done = True
        return self._outcome("create_replacement", args, f"ok: replacement {o.product} for order {o.order_id} "
                             "ships within 2 days")

    def change_address(self, order_id: str, new_address: str) -> str:
        o, args = self._order(order_id), {"order_id": order_id, "new_address": new_address}
        if not new_address.strip():
            raise ValueError("new_address must not be empty")
        if o.status != "processing":
            return self._outcome("change_address", args, f"refused: order {o.order_id} is {o.status}; the "
                                 "address can only change before shipping", refused=True)
        self._wrong_action("change_address")
        self.state.address = new_address.strip()
        self.state.address_changed = self.state.address == self.state.scenario.new_address
        if not self.state.address_changed:
            self.state.pending_anger += 1  # not the address the customer gave
        return self._outcome("change_address", args, f"ok: order {o.order_id} now ships to {self.state.address}")

    def check_delivery(self, order_id: str) -> dict[str, Any]:
        o = self._order(order_id)
        self.state.delivery_checked = True
        self._outcome("check_delivery", {"order_id": order_id}, "checked")
        date_key = {"processing": "expected_ship_date", "shipped": "eta", "delivered": "delivered_on"}[o.status]
        return {"order_id": o.order_id, "status": o.status, "carrier": o.carrier, date_key: o.eta}

    def transfer_to_human(self, reason: str) -> str:
        if not reason.strip():
            raise ValueError("reason must not be empty")
        self.state.transferred = True
        return self._outcome("transfer_to_human", {"reason": reason}, "ok: transferred to a human agent")


def _schema(**props: dict) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


_ORDER_ID = {"type": "string", "maxLength": 32, "description": 'the order id, like "A1234"'}
_TEXT = {"type": "string", "maxLength": 500}


def make_registry(backend: SupportBackend) -> ToolRegistry:
    """The six business tools bound to `backend`."""
    return ToolRegistry([
        Tool("lookup_order", "Look up an order: product, dates, shipping status, refund eligibility and "
             "status, address, warranty and return window.", _schema(order_id=_ORDER_ID), backend.lookup_order),
        Tool("start_self_service_refund", "Start a self-service refund (return) for a delivered, refund-eligible "
             "order.", _schema(order_id=_ORDER_ID, reason=_TEXT), backend.start_self_service_refund),
        Tool("create_replacement", "Send a replacement for a delivered order.", _schema(order_id=_ORDER_ID),
             backend.create_replacement),
        Tool("change_address", "Change the shipping address of an order that has not shipped yet.",
             _schema(order_id=_ORDER_ID, new_address=_TEXT), backend.change_address),
        Tool("check_delivery", "Check an order's delivery status, carrier and date.", _schema(order_id=_ORDER_ID),
             backend.check_delivery),
        Tool("transfer_to_human", "Hand the conversation to a human agent; ends the conversation.",
             _schema(reason=_TEXT), backend.transfer_to_human),
    ])
