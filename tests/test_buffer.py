"""The rollout buffer (slime_rl/buffer.py): FIFO, back-pressure, staleness limit, close, state round trip."""

from __future__ import annotations

import threading

import pytest

from slime_rl.buffer import BufferClosed, RolloutBuffer, group_version
from slime_rl.types import Sample


def group(gid: int, *versions: int) -> list[Sample]:
    """A group of one sample per version list entry; each sample's tokens carry that version."""
    return [Sample(prompt_ids=[1], response_ids=[2, 3], group_id=gid, index=i, weight_versions=[v, v])
            for i, v in enumerate(versions or (0,))]


def gids(groups) -> list[int]:
    return [g[0].group_id for g in groups]


def test_fifo_and_counts():
    buf = RolloutBuffer(capacity=8)
    for i in range(5):
        buf.put(group(i))
    assert gids(buf.get(3, trainer_version=0)) == [0, 1, 2] and len(buf) == 2
    assert gids(buf.get(2, trainer_version=0)) == [3, 4]
    assert buf.metrics() == {"buffer/put": 5.0, "buffer/got": 5.0, "buffer/stale": 0.0,
                             "buffer/max_trained_staleness": 0.0, "buffer/waiting": 0.0}


def test_group_version_is_the_oldest_token():
    g = group(0, 3, 5)
    g[1].weight_versions = [5, 4]
    assert group_version(g, default=9) == 3
    assert group_version([Sample(prompt_ids=[1], response_ids=[])], default=9) == 9


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_staleness_limit_sets_old_groups_aside(max_staleness):
    buf = RolloutBuffer(capacity=16, max_staleness=max_staleness)
    for v in range(5):  # groups generated under versions 0..4
        buf.put(group(v, v))
    got = buf.get(5 - 4 + max_staleness, trainer_version=4)
    assert all(4 - g[0].weight_versions[0] <= max_staleness for g in got)
    assert gids(got) == list(range(4 - max_staleness, 5))
    stale = buf.take_stale()
    assert gids(stale) == list(range(0, 4 - max_staleness)) and buf.take_stale() == []
    m = buf.metrics()
    assert m["buffer/stale"] == 4 - max_staleness and m["buffer/max_trained_staleness"] == max_staleness


def test_a_group_with_one_old_token_is_as_old_as_that_token():
    buf = RolloutBuffer(capacity=4, max_staleness=1)
    g = group(7, 3, 3)
    g[0].weight_versions = [1, 3]  # interrupted and resumed: first token from version 1
    buf.put(g)
    buf.put(group(8, 3))
    assert gids(buf.get(1, trainer_version=3)) == [8] and gids(buf.take_stale()) == [7]


def test_put_blocks_when_full_until_the_trainer_takes():
    buf = RolloutBuffer(capacity=2)
    buf.put(group(0))
    buf.put(group(1))
    with pytest.raises(TimeoutError, match="full"):
        buf.put(group(2), timeout=0.05)
    done = threading.Event()
    producer = threading.Thread(target=lambda: (buf.put(group(2)), done.set()))
    producer.start()
    assert not done.wait(0.1)  # still blocked: the buffer is full
    assert gids(buf.get(1, trainer_version=0)) == [0]
    producer.join(5)
    assert done.is_set() and len(buf) == 2


def test_get_waits_for_enough_groups_and_a_timeout_loses_nothing():
    buf = RolloutBuffer(capacity=4)
    buf.put(group(0))
    with pytest.raises(TimeoutError, match="1 of 2"):
        buf.get(2, trainer_version=0, timeout=0.05)
    assert len(buf) == 1
    result = {}
    consumer = threading.Thread(target=lambda: result.update(got=buf.get(2, trainer_version=0)))
    consumer.start()
    buf.put(group(1))
    consumer.join(5)
    assert gids(result["got"]) == [0, 1]


def test_close_wakes_waiters():
    buf = RolloutBuffer(capacity=1)
    errors = []

    def consume():
        try:
            buf.get(1, trainer_version=0)
        except BufferClosed as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    buf.close()
    consumer.join(5)
    assert len(errors) == 1


def test_state_round_trip_and_bad_arguments():
    buf = RolloutBuffer(capacity=4, max_staleness=0)
    buf.put(group(0, 0))
    buf.put(group(1, 1))
    buf.get(1, trainer_version=1)  # group 0 is stale, group 1 trained
    buf.put(group(2, 1))
    other = RolloutBuffer(capacity=4, max_staleness=0)
    other.load_state_dict(buf.state_dict())
    assert other.metrics() == buf.metrics() and gids(other.take_stale()) == [0]
    assert gids(other.get(1, trainer_version=1)) == [2]
    with pytest.raises(ValueError, match="capacity"):
        RolloutBuffer(capacity=0)
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutBuffer(capacity=1, max_staleness=-1)
    with pytest.raises(ValueError, match="empty group"):
        buf.put([])
