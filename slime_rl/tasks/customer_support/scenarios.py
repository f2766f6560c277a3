"""Scenarios of the customer-support simulator: who the customer is, what they want, and their order.

`make_scenario(seed)` is a pure function of the seed (one `random.Random(seed)`, no global state). Generated
scenarios are solvable by construction — e.g. `change_address` orders are still `processing`, `replacement`
orders are `delivered` — so that an agent that reads the tools' results can always resolve them; the
refusal paths (refund on a non-eligible order, address change after shipping, ...) are reached by calling a
tool the scenario does not call for, or by building a `Scenario` by hand.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, replace

INTENTS = ("return_item", "replacement", "change_address", "refund_status", "product_info", "delivery_status")
ROUTINE_INTENTS = ("product_info", "delivery_status")  # answering them is worth 0 (see env.REWARDS)
MOODS = ("calm", "impatient", "angry")
TAGS = ("VIP", "new_customer", "prior_complaints")
SHIPPING_STATUSES = ("processing", "shipped", "delivered")
REFUND_STATUSES = ("pending", "approved", "paid")
PRODUCT_TOPICS = ("warranty", "return_window")

PRODUCTS = ("wireless earbuds", "espresso machine", "running shoes", "desk lamp", "backpack", "smart watch",
            "blender", "wool sweater", "phone case", "yoga mat")
STREETS = ("Oak Street", "Maple Avenue", "Harbor Road", "Hill Lane", "Station Square", "River Walk", "Elm Court")
CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Greenville", "Milton")
CARRIERS = ("DHL", "UPS", "FedEx", "PostNL")
_BASE_DATE = datetime.date(2024, 1, 1)


@dataclass(frozen=True)
class Order:
    order_id: str  # "A1234"
    product: str
    order_date: str  # ISO date
    status: str  # one of SHIPPING_STATUSES
    refund_eligible: bool
    address: str  # the current shipping address
    carrier: str
    eta: str  # ISO date: expected delivery (or the delivery date once delivered)
    warranty_months: int
    return_window_days: int
    refund_status: str | None = None  # an existing refund's status (REFUND_STATUSES), for refund_status


@dataclass(frozen=True)
class Scenario:
    seed: int
    intent: str  # one of INTENTS
    mood: str  # one of MOODS
    tags: tuple[str, ...]  # a subset of TAGS, in TAGS order
    order: Order
    new_address: str | None = None  # the address the customer gives, for change_address
    topic: str | None = None  # what a product_info customer asks about (PRODUCT_TOPICS)

    def __post_init__(self) -> None:
        if self.intent not in INTENTS:
            raise ValueError(f"Scenario.intent must be one of {INTENTS}, got {self.intent!r}")
        if self.mood not in MOODS:
            raise ValueError(f"Scenario.mood must be one of {MOODS}, got {self.mood!r}")
        if not set(self.tags) <= set(TAGS):
            raise ValueError(f"Scenario.tags must be a subset of {TAGS}, got {self.tags!r}")
        if self.order.status not in SHIPPING_STATUSES:
            raise ValueError(f"Order.status must be one of {SHIPPING_STATUSES}, got {self.order.status!r}")
        if self.intent == "change_address" and not self.new_address:
            raise ValueError("Scenario.new_address is required for intent change_address")
        if self.intent == "product_info" and self.topic not in PRODUCT_TOPICS:
            raise ValueError(f"Scenario.topic must be one of {PRODUCT_TOPICS} for product_info, got {self.topic!r}")
        if self.intent == "refund_status" and self.order.refund_status not in REFUND_STATUSES:
            raise ValueError(f"Order.refund_status must be one of {REFUND_STATUSES} for refund_status")

    def view(self) -> dict:
        """What an agent may know without tools: the request's kind and the customer's manner, not the order."""
        return {"intent": self.intent, "mood": self.mood, "tags": self.tags}


def _address(rng: random.Random) -> str:
    return f"{rng.randint(1, 199)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"


def _status_for(intent: str, rng: random.Random) -> str:
    if intent in ("return_item", "replacement", "refund_status"):
        return "delivered"
    if intent == "change_address":
        return "processing"
    return rng.choice(SHIPPING_STATUSES)


def make_scenario(seed: int) -> Scenario:
    """The scenario of `seed`; the same seed gives the same scenario on every machine and run."""
    rng = random.Random(seed)
    intent = rng.choice(INTENTS)
    mood = rng.choice(MOODS)
    tags = tuple(t for t in TAGS if rng.random() < 0.25)
    status = _status_for(intent, rng)
    order_date = _BASE_DATE + datetime.timedelta(days=rng.randint(0, 300))
    eta = order_date + datetime.timedelta(days=rng.randint(3, 9))
    address = _address(rng)
    new_address = None
    if intent == "change_address":
        new_address = address
        while new_address == address:
            new_address = _address(rng)
    order = Order(
        order_id=f"A{rng.randint(1000, 9999)}",
        product=rng.choice(PRODUCTS),
        order_date=order_date.isoformat(),
        status=status,
        refund_eligible=intent != "refund_status" and rng.random() < 0.85,
        address=address,
        carrier=rng.choice(CARRIERS),
        eta=eta.isoformat(),
        warranty_months=rng.choice((6, 12, 24, 36)),
        return_window_days=rng.choice((14, 30, 60)),
        refund_status=rng.choice(REFUND_STATUSES) if intent == "refund_status" else None,
    )
    topic = rng.choice(PRODUCT_TOPICS) if intent == "product_info" else None
    return Scenario(seed=seed, intent=intent, mood=mood, tags=tags, order=order, new_address=new_address,
                    topic=topic)


def make_scenarios(n: int, seed: int = 0) -> list[Scenario]:
    """`n` scenarios from consecutive seeds `seed, seed + 1, ...`."""
    return [make_scenario(seed + i) for i in range(n)]


def with_order(scenario: Scenario, **changes) -> Scenario:
    """A copy of `scenario` whose order has `changes` (for tests and hand-made cases)."""
    return replace(scenario, order=replace(scenario.order, **changes))
