"""An asyncio front for the synchronous engine: one background thread owns the `LLMEngine`.

`LLMEngine` is not thread-safe, so every call into it (add, abort, step, stats) happens on
the one thread this module starts. The event loop talks to that thread through a
thread-safe command queue; the thread hands outputs back through per-request
`asyncio.Queue`s (``loop.call_soon_threadsafe``) and answers commands that need a reply
(admission, stats) through `concurrent.futures.Future`s. While no request is unfinished
the thread blocks on the command queue: it never spins.

A step that raises fails only the requests it concerns (those holding KV blocks: the
running ones and any part-way through prefill), which get `EngineStepError`; requests
still waiting untouched keep their place and the loop lives on. Only
``max_consecutive_step_failures`` failed steps in a row (a broken device, not a bad
request) stop the thread; then every request gets `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from livethinking.engine.outputs import RequestOutput
from livethinking.engine.sampling_params import SamplingParams

__all__ = ["PAUSE_MODES", "AsyncEngine", "EngineDeadError", "EngineStepError"]

_log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread is not running (never started, shut down, or steps kept failing)."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in it; the request was aborted (the
    detail is logged by the engine thread, never sent to clients)."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    reply: concurrent.futures.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Stats:
    reply: concurrent.futures.Future


@dataclass(slots=True)
class _Call:
    """Run ``fn(engine)`` on the engine thread between steps; its result is the reply."""

    fn: object
    reply: concurrent.futures.Future


@dataclass(slots=True)
class _Pause:
    mode: str  # PAUSE_MODES
    reply: concurrent.futures.Future


@dataclass(slots=True)
class _AbortAll:
    reply: concurrent.futures.Future


@dataclass(slots=True)
class _Resume:
    reply: concurrent.futures.Future


class _Stop:
    pass


PAUSE_MODES = ("abort", "retract", "in_place")
_CONTROLS = (_Call, _Pause, _AbortAll, _Resume)
_REPLIED = (_Add, _Stats, *_CONTROLS)  # commands whose caller awaits a reply


@dataclass(slots=True)
class _Route:
    """Where the engine thread delivers one request's outputs."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


class AsyncEngine:
    """Runs one `LLMEngine` in a background thread and streams its outputs to asyncio.

    ``generate`` admits a request (the engine's ``ValueError`` / ``EngineFullError`` are
    raised to its caller), then yields the request's cumulative `RequestOutput` after each
    engine step until it finishes. Closing or cancelling the iterator early (a client that
    went away) aborts the request, which frees its KV blocks.
    """

    def __init__(self, engine, *, max_consecutive_step_failures: int = 3) -> None:
        if max_consecutive_step_failures < 1:
            raise ValueError(f"max_consecutive_step_failures must be >= 1, got "
                             f"{max_consecutive_step_failures}")
        self.engine = engine
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # touched by the engine thread only
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Commands are queued only while the thread accepts them; the thread stops
        # accepting (under the lock) before its last drain, so none is left unanswered.
        self._accepting = False
        self._accepting_lock = threading.Lock()
        self._paused = False  # touched by the engine thread only: no stepping while set

    @property
    def tokenizer(self):
        """The engine's tokenizer (read-only use from other threads)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output the engine accepts, in tokens."""
        return self.engine.max_model_len

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread (no-op when it already runs)."""
        if self.running:
            return
        self._error = None
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="livethinking-engine",
                                        daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread after the step in progress and wait for it; unfinished
        requests are aborted and their consumers get `EngineDeadError`."""
        thread = self._thread
        if thread is None:
            return
        self._submit(_Stop())
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the engine thread did not stop within {timeout} s")
        self._thread = None
        self._drain_after_stop()  # a command that raced the stop

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       *, arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Admit a request and yield its cumulative outputs, the last one finished.

        Raises what the engine's ``add_request`` raises (``ValueError`` for a bad request,
        ``EngineFullError`` when the waiting queue is full) before yielding anything.
        """
        self._check_alive()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        reply: concurrent.futures.Future = concurrent.futures.Future()
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        admitted: bool | None = None  # None: unknown (the add command may still run)
        finished = False
        self._submit(_Add(request_id, prompt, params, arrival, loop, outputs, reply))
        try:
            try:
                await asyncio.wrap_future(reply)
            except BaseException as exc:
                if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    admitted = False
                raise
            admitted = True
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            # Cancelled, closed early or failed: free the request's KV blocks now. Never
            # await here: this runs inside cancelled scopes and generator finalizers.
            if admitted is not False and not finished:
                self._submit(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (unknown ids are ignored)."""
        self._submit(_Abort(request_id))

    async def call(self, fn):
        """``fn(engine)`` run on the engine thread between two steps (nothing else touches
        the engine meanwhile); returns its result or raises its exception."""
        return await self._ask(lambda reply: _Call(fn, reply))

    async def pause(self, mode: str) -> int:
        """Stop stepping (SGLang's ``pause_generation`` modes): ``abort`` ends every request
        now with finish reason "abort" (their consumers get that last output);
        ``retract`` frees every request's KV blocks, to be recomputed after
        :meth:`resume`; ``in_place`` keeps everything as it is. Returns the requests
        aborted or sequences retracted (0 for in_place)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        return await self._ask(lambda reply: _Pause(mode, reply))

    async def abort_all(self) -> int:
        """End every request now with finish reason "abort" (without pausing); returns
        how many."""
        return await self._ask(_AbortAll)

    async def resume(self) -> None:
        """Step again after :meth:`pause`."""
        await self._ask(_Resume)

    async def _ask(self, make):
        self._check_alive()
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(make(reply))
        return await asyncio.wrap_future(reply)

    async def stats(self):
        """The engine's `EngineStats`, read on the engine thread after the commands sent
        before this call were applied."""
        if not self.running:
            return self.engine.stats()  # no other thread touches the engine
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Stats(reply))
        return await asyncio.wrap_future(reply)

    # -- the engine thread ------------------------------------------------------------

    def _submit(self, command) -> None:
        """Queue a command for the engine thread, or answer it as dead when the thread
        no longer accepts commands."""
        with self._accepting_lock:
            if self._accepting:
                self._commands.put(command)
                return
        if isinstance(command, _REPLIED) and command.reply.set_running_or_notify_cancel():
            command.reply.set_exception(EngineDeadError("the engine is not running"))

    def _check_alive(self) -> None:
        if not self.running:
            raise EngineDeadError("the engine is not running")

    def _run(self) -> None:
        engine = self.engine
        failures = 0  # failed steps in a row
        try:
            while True:
                # Block for a command while idle or paused; otherwise take what is queued
                # and step.
                if not engine.has_unfinished_requests() or self._paused:
                    if not self._apply(self._commands.get()):
                        return
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if not self._apply(command):
                        return
                if engine.has_unfinished_requests() and not self._paused:
                    try:
                        self._step()
                    except Exception:
                        failures += 1
                        _log.exception("engine step failed (%d in a row)", failures)
                        if failures >= self.max_consecutive_step_failures:
                            raise
                        self._fail_step()
                    else:
                        failures = 0
        except BaseException as exc:  # unrecoverable: fail everyone, refuse new work
            self._error = exc  # logged above or here; the thread ends (health: 503)
            _log.error("the engine thread stops: %r", exc)
            self._fail_all(EngineDeadError("the engine stopped after repeated failures"))
        finally:
            with self._accepting_lock:
                self._accepting = False
            self._fail_all(EngineDeadError("the engine was shut down"))
            self._drain_after_stop()

    def _apply(self, command) -> bool:
        """Apply one command on the engine thread; False means stop."""
        if isinstance(command, _Add):
            if command.reply.set_running_or_notify_cancel():
                try:
                    self.engine.add_request(command.request_id, command.prompt, command.params,
                                            arrival_time=command.arrival_time)
                except Exception as exc:  # ValueError, EngineFullError: the caller's problem
                    command.reply.set_exception(exc)
                else:
                    self._routes[command.request_id] = _Route(command.loop, command.outputs)
                    command.reply.set_result(None)
        elif isinstance(command, _Abort):
            if self._routes.pop(command.request_id, None) is not None:
                try:
                    self.engine.abort_request(command.request_id)
                except Exception:
                    _log.exception("aborting request %s failed", command.request_id)
        elif isinstance(command, _Stats):
            if command.reply.set_running_or_notify_cancel():
                try:
                    command.reply.set_result(self.engine.stats())
                except Exception as exc:
                    command.reply.set_exception(exc)
        elif isinstance(command, _CONTROLS):
            if command.reply.set_running_or_notify_cancel():
                try:
                    command.reply.set_result(self._control(command))
                except Exception as exc:
                    command.reply.set_exception(exc)
        elif isinstance(command, _Stop):
            return False
        return True

    def _control(self, command):
        if isinstance(command, _Call):
            return command.fn(self.engine)
        if isinstance(command, _Resume):
            self._paused = False
            return None
        if isinstance(command, _AbortAll):
            return self._abort_all()
        self._paused = True
        if command.mode == "retract":
            return self.engine.retract_all()
        return self._abort_all() if command.mode == "abort" else 0

    def _abort_all(self) -> int:
        routes, self._routes = self._routes, {}
        for request_id, route in routes.items():
            output = self.engine.abort_request(request_id)
            if output is not None:
                route.put(output)  # finished, with finish reason "abort"
        return len(routes)

    def _step(self) -> None:
        for output in self.engine.step():
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            if output.finished:
                del self._routes[output.request_id]
            route.put(output)

    def _fail_step(self) -> None:
        """Abort the requests a failed step concerned and send each `EngineStepError`."""
        engine = self.engine
        scheduler = engine.scheduler
        concerned = {seq.request_id for seq in scheduler.running}
        concerned |= {seq.request_id for seq in scheduler.waiting if seq.block_table}
        if not concerned:  # the failure came before any sequence held blocks
            concerned = set(engine.requests)
        for request_id in concerned:
            engine.abort_request(request_id)
            route = self._routes.pop(request_id, None)
            if route is not None:
                route.put(EngineStepError("the engine failed while generating this request"))

    def _fail_all(self, error: BaseException) -> None:
        routes, self._routes = self._routes, {}
        for request_id, route in routes.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                pass
            route.put(error)

    def _drain_after_stop(self) -> None:
        """Answer commands that arrived after the stop, so no caller waits forever."""
        dead = EngineDeadError("the engine was shut down")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _REPLIED) and command.reply.set_running_or_notify_cancel():
                command.reply.set_exception(dead)
