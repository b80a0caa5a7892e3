"""Rollouts produced ahead of training, with bounded staleness.

`RolloutsAhead` runs ``sample_batch()`` in a background thread while the trainer trains on
earlier batches: the producer starts a batch only while fewer than ``max_ahead`` batches
are sampled but not yet taken (one permit per batch, given back by :meth:`get`), so the
batch a step takes was begun at most ``max_ahead`` weight versions earlier, and the
producer idles when it is that far ahead. The trainer takes batches in order with :meth:`get`. The
weights reach the servers between batches or in the middle of one (a server lets the
requests in flight finish on the old weights first), so each sample carries the version
that produced it and the trainer drops those more than ``max_staleness`` versions behind.
Both sides' idle time is measured: the trainer's waiting in :meth:`get`, the producer's
waiting for room.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

__all__ = ["RolloutsAhead"]


class RolloutsAhead:
    """A producer thread ``max_ahead`` batches ahead of the consumer."""

    def __init__(self, sample_batch: Callable[[], object], *, max_ahead: int) -> None:
        if max_ahead < 1:
            raise ValueError(f"max_ahead must be >= 1, got {max_ahead}")
        self._sample = sample_batch
        self._ready: queue.Queue = queue.Queue()
        self._permits = threading.Semaphore(max_ahead)
        self._stop = threading.Event()
        self.producer_idle_s = 0.0  # waiting to be allowed ahead
        self.producer_busy_s = 0.0  # sampling
        self._thread = threading.Thread(target=self._run, name="livethinking-rollouts",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            waiting = time.perf_counter()
            if not self._permits.acquire(timeout=0.1):
                self.producer_idle_s += time.perf_counter() - waiting
                continue
            began = time.perf_counter()
            self.producer_idle_s += began - waiting
            if self._stop.is_set():
                return
            try:
                item = ("batch", self._sample())
            except BaseException as exc:  # handed to the trainer, which raises it
                item = ("error", exc)
            self.producer_busy_s += time.perf_counter() - began
            self._ready.put(item)
            if item[0] == "error":
                return

    def get(self, timeout: float | None = None) -> tuple[object, float]:
        """The next batch, and the seconds the trainer waited for it (its idle time)."""
        began = time.perf_counter()
        kind, value = self._ready.get(timeout=timeout)
        waited = time.perf_counter() - began
        self._permits.release()
        if kind == "error":
            raise RuntimeError(f"sampling rollouts ahead failed: {value}") from value
        return value, waited

    def close(self, timeout: float = 30.0) -> None:
        """Stop producing (a batch being sampled is finished and thrown away)."""
        self._stop.set()
        self._thread.join(timeout)
