"""The customer-support simulator: determinism, baselines, every reward-table row, tool misuse, metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest

from slime_rl.tasks.customer_support import (INTENTS, REWARDS, SupportEnv, episode_metrics, evasive_policy,
                                             hedging_policy, is_evasive, make_scenario, make_scenarios, oracle_policy, run_episode,
                                             run_episodes, tool_call, with_order)


def _seed(intent: str, mood: str | None = None, **order) -> int:
    """The first seed whose scenario has this intent (and mood, and order fields)."""
    for seed in range(5000):
        s = make_scenario(seed)
        if s.intent == intent and mood in (None, s.mood) and all(getattr(s.order, k) == v for k, v in order.items()):
            return seed
    raise AssertionError(f"no seed for {intent} {mood} {order}")


def _play(env: SupportEnv, messages: list[str], seed: int | None = None, scenario=None):
    env.reset(seed=seed, scenario=scenario)
    total, observations, info = 0.0, [], {}
    for m in messages:
        obs, r, done, info = env.step(m)
        observations.append(obs)
        total += r
        if done:
            break
    return total, observations, info


# ---- determinism ---------------------------------------------------------------------------------------

def test_same_seed_same_scenario_and_transcript():
    assert make_scenario(11) == make_scenario(11)
    assert make_scenarios(20, seed=3) == make_scenarios(20, seed=3)
    for policy in (oracle_policy, evasive_policy):
        a, b = SupportEnv(), SupportEnv()
        ra, ia = run_episode(a, policy, 42)
        rb, ib = run_episode(b, policy, 42)
        assert (ra, ia) == (rb, ib) and a.transcript == b.transcript


def test_different_seeds_differ():
    scenarios = make_scenarios(100)
    assert len({(s.intent, s.mood, s.order.order_id) for s in scenarios}) > 90
    assert {s.intent for s in scenarios} == set(INTENTS)
    env = SupportEnv()
    transcripts = set()
    for seed in range(20):
        run_episode(env, oracle_policy, seed)
        transcripts.add(tuple(env.transcript))
    assert len(transcripts) == 20


def test_scenario_validates_fields():
    s = make_scenario(0)
    with pytest.raises(ValueError, match="intent"):
        dataclasses.replace(s, intent="haggle")
    with pytest.raises(ValueError, match="status"):
        with_order(s, status="lost")


# ---- baselines -----------------------------------------------------------------------------------------

def test_oracle_resolves_and_evasive_loses():
    oracle = run_episodes(oracle_policy, range(200))
    m = episode_metrics([i for _, i in oracle])
    assert m["resolution_rate"] >= 0.95 and m["mean_reward"] >= 5.0
    assert m["tool_call_validity"] == 1.0 and m["complaint_rate"] == 0.0
    assert sum(r for r, _ in oracle) / 200 == pytest.approx(m["mean_reward"])
    evasive = episode_metrics([i for _, i in run_episodes(evasive_policy, range(200))])
    assert evasive["mean_reward"] < 0 and evasive["resolution_rate"] == 0.0 and evasive["evasive_rate"] == 1.0


def test_hedging_agent_sits_between_oracle_and_evasive():
    """The warm-up's bad habit: two evasive messages before the oracle's work; it costs reward and cases."""
    seeds = range(300)
    hedging = episode_metrics([i for _, i in run_episodes(hedging_policy, seeds)])
    oracle = episode_metrics([i for _, i in run_episodes(oracle_policy, seeds)])
    evasive = episode_metrics([i for _, i in run_episodes(evasive_policy, seeds)])
    assert evasive["mean_reward"] < hedging["mean_reward"] < oracle["mean_reward"] - 10
    assert 0.3 < hedging["resolution_rate"] < oracle["resolution_rate"] - 0.3
    env = SupportEnv()
    history = [env.reset(5)]
    view = env.scenario.view()
    for turn in range(3):
        text = hedging_policy(history, view)
        assert is_evasive(text) == (turn < 2)
        history.append(env.step(text)[0])


def test_warmup_team_share_is_drawn_from_the_seed():
    from slime_rl.tasks.customer_support.task import warmup_agent

    agents = [warmup_agent(s, 0.5) for s in range(2000)]
    assert agents == [warmup_agent(s, 0.5) for s in range(2000)]
    assert 0.45 < sum(a is hedging_policy for a in agents) / 2000 < 0.55
    assert all(warmup_agent(s, 0.0) is oracle_policy for s in range(200))
    assert all(warmup_agent(s, 1.0) is hedging_policy for s in range(200))


# ---- the reward table, row by row ----------------------------------------------------------------------

def test_resolved_plus_5_and_fast_plus_3():
    total, info = run_episode(SupportEnv(), oracle_policy, _seed("replacement"))
    assert info["reward_breakdown"] == {"resolved": 5.0, "fast_resolution": 3.0} and total == 8.0
    assert info["minutes"] < 3.0


def test_refund_completed_plus_10():
    total, info = run_episode(SupportEnv(), oracle_policy, _seed("return_item", refund_eligible=True))
    assert info["reward_breakdown"]["refund_completed"] == 10.0 and info["refund_completed"]
    assert total == 18.0


def test_slow_resolution_gets_no_speed_bonus():
    seed = _seed("replacement", "calm")
    oid = make_scenario(seed).order.order_id
    stall = ["Thanks for reaching out, let me look into this."] * 3
    total, _, info = _play(SupportEnv(), stall + [tool_call("create_replacement", order_id=oid),
                                                  "Your replacement is on its way."], seed=seed)
    assert info["resolved"] and info["minutes"] >= 3.0
    assert info["reward_breakdown"] == {"resolved": 5.0} and total == 5.0


def test_asked_for_human_minus_5_once():
    seed = _seed("replacement", "calm")
    wrong = tool_call("lookup_order", order_id="A0000")
    total, obs, info = _play(SupportEnv(), [wrong] * 4 + ["One moment please."] * 2, seed=seed)
    assert "human" in obs[4]
    assert info["asked_human"] and info["reward_breakdown"] == {"asked_for_human": -5.0} and total == -5.0


def test_evasive_minus_3_per_turn():
    seed = _seed("delivery_status", "calm")
    total, _, info = _play(SupportEnv(), ["I'm NOT SURE, I don't know, I can't help."], seed=seed)
    assert info["reward_breakdown"] == {"evasive": -3.0} and info["evasive_turns"] == 1 and total == -3.0


def test_complaint_minus_8():
    total, info = run_episode(SupportEnv(), evasive_policy, _seed("return_item", "calm"))
    assert info["complaint"] and info["done"]
    assert info["reward_breakdown"] == {"evasive": -9.0, "asked_for_human": -5.0, "complaint": -8.0}
    assert total == -22.0


def test_routine_answer_is_zero():
    for intent in ("product_info", "delivery_status"):
        total, info = run_episode(SupportEnv(), oracle_policy, _seed(intent))
        assert info["resolved"] and info["reward_breakdown"] == {"routine_answered": 0.0, "fast_resolution": 3.0}
        assert REWARDS["routine_answered"] == 0.0 and total == 3.0


def test_unrequested_refund_earns_nothing_and_angers():
    seed = _seed("delivery_status", status="delivered", refund_eligible=True)
    oid = make_scenario(seed).order.order_id
    _, obs, info = _play(SupportEnv(), [tool_call("start_self_service_refund", order_id=oid, reason="x")],
                         seed=seed)
    assert obs[0].startswith("tool start_self_service_refund: ok")
    assert "refund_completed" not in info["reward_breakdown"] and info["wrong_actions"] == 1


# ---- tool misuse: errors as observations, counted ------------------------------------------------------

def test_tool_misuse_is_observed_and_counted():
    seed = _seed("change_address")
    env = SupportEnv(max_turns=20)
    bad = [tool_call("lookup_order", order_id="A0000"),  # wrong order id
           tool_call("issue_voucher", amount=5),  # unknown tool
           '<tool_call>{"name": "lookup_order", "arguments": {"order_id": </tool_call>',  # malformed JSON
           tool_call("lookup_order", order_id=1234),  # bad argument type
           tool_call("change_address", order_id="A0000"),  # missing argument
           tool_call("transfer_to_human", reason="  ")]  # raises inside the tool
    _, obs, info = _play(env, bad, seed=seed)
    kinds = ["raised", "unknown_tool", "malformed", "bad_arguments", "bad_arguments", "raised"]
    for o, kind in zip(obs, kinds):
        assert f"error ({kind})" in o, o
    assert info["tool_calls"] == 6 and info["tool_valid"] == 0 and not info["done"]
    assert info["tool_errors"] == {"raised": 2, "unknown_tool": 1, "malformed": 1, "bad_arguments": 2}
    assert episode_metrics([info])["tool_call_validity"] == 0.0
    obs, _, _, info = env.step(12345)  # not even text
    assert "error" in obs and info["tool_calls"] == 7


def test_business_rules_refuse():
    env = SupportEnv()
    s = make_scenario(_seed("delivery_status", status="shipped"))
    oid = s.order.order_id
    _, obs, info = _play(env, [tool_call("change_address", order_id=oid, new_address="1 Main St, X"),
                               tool_call("create_replacement", order_id=oid),
                               tool_call("start_self_service_refund", order_id=oid, reason="r")], scenario=s)
    assert all(o.split(": ", 1)[1].startswith("refused") for o in obs), obs
    assert info["refusals"] == 3 and info["tool_valid"] == 3
    s2 = with_order(make_scenario(_seed("return_item")), refund_eligible=False)
    _, obs, _ = _play(env, [tool_call("start_self_service_refund", order_id=s2.order.order_id, reason="r")],
                      scenario=s2)
    assert "not eligible" in obs[0]


def test_transfer_and_turn_limit_end_the_episode():
    env = SupportEnv(max_turns=3)
    _, _, info = _play(env, [tool_call("transfer_to_human", reason="customer request")], seed=1)
    assert info["done"] and info["transferred"] and not info["resolved"]
    with pytest.raises(RuntimeError):
        env.step("hello")
    _, obs, info = _play(env, ["Let me check."] * 5, seed=_seed("replacement", "calm"))
    assert len(obs) == 3 and info["done"] and info["turns"] == 3


def test_several_calls_in_one_message_and_tool_schemas():
    env = SupportEnv()
    seed = _seed("delivery_status")
    oid = make_scenario(seed).order.order_id
    _, obs, info = _play(env, [tool_call("lookup_order", order_id=oid) + tool_call("check_delivery", order_id=oid)],
                         seed=seed)
    assert obs[0].count("\n") == 1 and info["tool_calls"] == 2 and info["minutes"] == pytest.approx(0.4 + 0.5 + 0.6)
    names = [t["function"]["name"] for t in env.tools.schemas()]
    assert names == ["lookup_order", "start_self_service_refund", "create_replacement", "change_address",
                     "check_delivery", "transfer_to_human"]


# ---- metrics -------------------------------------------------------------------------------------------

def test_episode_metrics_over_a_batch():
    infos = [i for _, i in run_episodes(oracle_policy, range(10))]
    infos += [i for _, i in run_episodes(evasive_policy, range(10))]
    m = episode_metrics(infos)
    assert m["resolution_rate"] == 0.5 and m["complaint_rate"] == 0.5 and m["human_request_rate"] == 0.5
    assert m["refunds_completed"] == sum(i["refund_completed"] for i in infos[:10])
    assert m["transfer_rate"] == 0.0 and m["tool_call_validity"] == 1.0
    assert m["mean_turns"] == pytest.approx(sum(i["turns"] for i in infos) / 20)
    assert m["mean_minutes"] == pytest.approx(sum(i["minutes"] for i in infos) / 20)
    assert 0 < m["evasive_rate"] < 1
    with pytest.raises(ValueError):
        episode_metrics([])
    assert math.isnan(episode_metrics(infos[10:])["tool_call_validity"])  # no calls at all
