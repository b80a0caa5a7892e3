"""`RolloutsAhead`: a producer at most ``max_ahead`` batches ahead, in order, errors
handed to the trainer, idle time of both sides."""

import threading
import time

import pytest

from livethinking.rollout import RolloutsAhead


@pytest.mark.parametrize("max_ahead", [1, 2, 3])
def test_producer_stays_within_max_ahead(max_ahead):
    version = {"now": 0}
    started = []
    lock = threading.Lock()

    def sample():
        with lock:
            started.append(version["now"])
            index = len(started) - 1
        time.sleep(0.002)
        return index, version["now"] if index % 2 else started[index]

    ahead = RolloutsAhead(sample, max_ahead=max_ahead)
    try:
        for step in range(12):
            (index, begun_at), waited = ahead.get(timeout=10)
            assert index == step and waited >= 0  # in order
            assert version["now"] - started[index] <= max_ahead  # bounded staleness
            time.sleep(0.01)  # training
            with lock:
                assert len(started) <= step + 1 + max_ahead  # never further ahead
            version["now"] += 1  # the push
        assert ahead.producer_busy_s > 0 and ahead.producer_idle_s > 0
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()


def test_a_failing_sampler_reaches_the_trainer():
    def sample():
        raise ValueError("server exploded")

    ahead = RolloutsAhead(sample, max_ahead=1)
    with pytest.raises(RuntimeError, match="server exploded"):
        ahead.get(timeout=10)
    ahead.close()
    with pytest.raises(ValueError, match="max_ahead"):
        RolloutsAhead(sample, max_ahead=0)
