"""A deterministic e-commerce after-sales simulator: an agent (the model under RL) with business tools,
a rule-based customer, and a fixed reward table. Pure Python; all randomness from explicit seeds.

    env = SupportEnv()
    first = env.reset(seed=7)                       # the customer's opening message
    obs, reward, done, info = env.step(tool_call("lookup_order", order_id="A1234"))  # or plain text
    env.tools.schemas()                             # for the chat template's tools=

Modules: `scenarios` (who wants what), `tools` (the order system), `customer` (the rules of the customer),
`env` (steps, the reward table, metrics), `policies` (oracle and evasive baselines, the episode runner).
"""

from .customer import Customer, CustomerTurn, is_evasive
from .env import REWARDS, SupportEnv, episode_metrics
from .policies import evasive_policy, hedging_policy, oracle_policy, run_episode, run_episodes, tool_call
from .scenarios import INTENTS, MOODS, TAGS, Order, Scenario, make_scenario, make_scenarios, with_order
from .tools import SupportBackend, SupportState, make_registry

__all__ = ["Customer", "CustomerTurn", "INTENTS", "MOODS", "Order", "REWARDS", "Scenario", "SupportBackend",
           "SupportEnv", "SupportState", "TAGS", "episode_metrics", "evasive_policy", "is_evasive",
           "hedging_policy", "make_registry", "make_scenario", "make_scenarios", "oracle_policy", "run_episode", "run_episodes",
           "tool_call", "with_order"]
