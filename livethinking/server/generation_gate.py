"""Who may generate and when weights may change: SGLang's pause flag and model-update lock.

Every generation request (``/generate``, ``/v1/completions``, ``/v1/chat/completions``)
first waits while generation is paused, then holds a *reader* slot for its whole life (a
stream: until its last event). A weight update takes the *writer* side: it waits for the
readers to finish and lets no new one in meanwhile, unless generation is paused, when it
runs at once (the paused requests, kept in place or retracted, continue afterwards on the
new weights; SGLang's ``update_weights_from_*`` skip the lock the same way).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["GenerationGate"]


class GenerationGate:
    """The pause flag plus an asyncio readers-writer lock that prefers the writer."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self.readers = 0
        self.paused = False
        self._writing = False
        self._writers_waiting = 0
        self._one_update = asyncio.Lock()  # updates never overlap, paused or not

    def _open(self) -> bool:
        return not self.paused and not self._writing and self._writers_waiting == 0

    def try_enter(self) -> bool:
        """Take a slot now if nothing holds generation back (no waiting); else False."""
        if self._cond.locked() or not self._open():
            return False
        self.readers += 1
        return True

    async def enter(self) -> None:
        """Wait until generation is not paused and no update runs or waits; take a slot."""
        async with self._cond:
            await self._cond.wait_for(self._open)
            self.readers += 1

    async def leave(self) -> None:
        """Give a slot taken by :meth:`enter` back."""
        async with self._cond:
            self.readers -= 1
            self._cond.notify_all()

    async def set_paused(self, paused: bool) -> None:
        """Pause (new requests wait) or continue (they proceed)."""
        async with self._cond:
            self.paused = paused
            self._cond.notify_all()

    async def wait_drained(self) -> None:
        """Wait until no generation request holds a slot."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.readers == 0)

    @contextlib.asynccontextmanager
    async def updating(self):
        """Hold the writer side for a weight update (at once while paused); one update at
        a time."""
        async with self._one_update:
            async with self._exclusive():
                yield

    @contextlib.asynccontextmanager
    async def _exclusive(self):
        async with self._cond:
            if self.paused:
                exclusive = False
            else:
                self._writers_waiting += 1
                try:
                    await self._cond.wait_for(lambda: self.readers == 0 and not self._writing)
                finally:
                    self._writers_waiting -= 1
                    self._cond.notify_all()
                self._writing = exclusive = True
        try:
            yield
        finally:
            if exclusive:
                async with self._cond:
                    self._writing = False
                    self._cond.notify_all()
