"""An asyncio front end to ``Engine``: many concurrent callers, one engine driven by one thread.

The engine is not thread-safe, so every call into it (submit, step, abort) runs on a single
background thread. That thread applies the commands callers post, then runs one ``step`` while any
request is unfinished, and sleeps on its command queue when none is. Each tick's outputs go to their
callers' asyncio queues through ``call_soon_threadsafe``, so the event loop stays free while the
engine computes and new requests join the running batch at the next tick (continuous batching).

    engine = AsyncEngine(Engine(["tiny-random-llama", "tiny-random-qwen2"], method="se"))
    async for out in engine.generate("def fib(n):", SamplingParams(max_new_tokens=32)):
        print(out.text, end="")
    engine.close()

Closing the generator early aborts the request and frees its cache slot: ``aclose()``, an exception
or a cancellation inside the ``async for``, or (after a ``break``) Python collecting it. A tick that
raises fails the requests it was decoding (``EngineStepError``) and no others; the thread serves on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from .engine import Engine, Prompt, RequestOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)
_Requests = Sequence[tuple[Prompt, SamplingParams]]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (closed, or failed outside a tick): no request can be served."""


class EngineStepError(RuntimeError):
    """A tick raised while decoding this request: it was aborted (its batch with it); the engine serves on."""


@dataclass
class ServingStats:
    """Counters since start, written by the engine thread only (readers may see a tick's update half
    done). Request and token counts are per target (the engine's target names)."""
    prompt_tokens: Counter[str] = field(default_factory=Counter)
    generated_tokens: Counter[str] = field(default_factory=Counter)
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)  # (target, finish_reason)
    latency_s: Counter[str] = field(default_factory=Counter)  # summed over finished requests, submission to end
    aborted: int = 0
    failed: int = 0  # ended by a tick that raised
    busy_s: float = 0.0     # wall time inside Engine.step
    drafts_tested: list[int] = field(default_factory=list)    # per model, over finished requests
    drafts_accepted: list[int] = field(default_factory=list)


@dataclass(eq=False)  # hashed by identity
class _Batch:
    """Requests submitted together by one caller, for one target; outputs go to its queue as (index, output).
    Its requests share one admission group (``Engine.submit``)."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    target: str | None
    ids: list[int] = field(default_factory=list)  # engine request ids, set on the engine thread


class AsyncEngine:
    """Serves an ``Engine`` to asyncio code; see the module docstring. Owns the engine from here on:
    do not call its methods directly while this is running."""

    def __init__(self, engine: Engine):
        self.engine = engine
        n = len(engine.runner_names)
        self.stats = ServingStats(drafts_tested=[0] * n, drafts_accepted=[0] * n,
                                  finished=Counter({(t, r): 0 for t in engine.targets for r in ("stop", "length")}))
        # (batch, requests): submit them; (batch, None): abort what is left of the batch; None: close.
        self._commands: queue.SimpleQueue[tuple[_Batch, _Requests | None] | None] = queue.SimpleQueue()
        self._live: dict[int, tuple[_Batch, int]] = {}  # engine request id -> (batch, index); engine thread writes
        self._lock = threading.Lock()  # a command is either posted before the thread stops, or refused
        self._error: BaseException | None = None
        self._close_reason = "the engine was closed"  # the message of the EngineDeadError close() sends
        self._thread = threading.Thread(target=self._run, name="se-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._error is None

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._live)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       target: str | None = None) -> AsyncIterator[RequestOutput]:
        """One request's outputs, tick by tick; the last one has ``finish_reason`` and ``result`` set.
        Raises ValueError if the engine rejects the request."""
        async with aclosing(self.generate_batch([(prompt, params or SamplingParams())], target)) as outputs:
            async for _, out in outputs:
                yield out

    async def generate_batch(self, requests: _Requests, target: str | None = None
                             ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submits requests together (for one of the engine's targets, as in ``Engine.submit``) and
        yields (index into requests, output) as the engine commits tokens, until every one has
        finished. All or none: if the engine rejects one (ValueError), none runs. Leaving early aborts
        the unfinished ones. EngineDeadError if the engine stops; EngineStepError if a tick fails
        while decoding one of them (the others are aborted too)."""
        if target is None and len(self.engine.targets) == 1:
            (target,) = self.engine.targets
        batch = _Batch(asyncio.get_running_loop(), asyncio.Queue(), target)
        if not self._post((batch, requests)):
            raise EngineDeadError(f"the engine is not running ({self._error})") from self._error
        unfinished = len(requests)
        try:
            while unfinished:
                item = await batch.queue.get()
                if isinstance(item, BaseException):
                    unfinished = 0  # nothing of the batch is left in the engine
                    raise item
                if item[1].finish_reason is not None:
                    unfinished -= 1
                yield item
        finally:
            if unfinished:  # commands run in order: this one after the submission
                self._post((batch, None))

    def close(self, reason: str | None = None) -> None:
        """Stops the engine thread after its current tick; unfinished requests end with EngineDeadError
        (saying ``reason``, if given)."""
        if reason is not None:
            self._close_reason = reason
        self._post(None)
        self._thread.join()

    def _post(self, command: tuple[_Batch, _Requests | None] | None) -> bool:
        """Queues a command for the engine thread; False (and dropped) once that thread has stopped."""
        with self._lock:
            if self._error is None:
                self._commands.put(command)
            return self._error is None

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._apply_commands():
                if self.engine.has_unfinished():
                    self._step()
            error: BaseException = EngineDeadError(self._close_reason)
        except Exception as e:  # outside a tick: the thread's own state is in doubt, stop serving
            logger.exception("the engine thread failed; no further requests are served")
            error = e
        with self._lock:
            self._error = error
        batches = {batch for batch, _ in self._live.values()}
        while not self._commands.empty():  # submitted before the lock was taken: refuse them
            if (command := self._commands.get()) is not None and command[1] is not None:
                batches.add(command[0])
        for batch in batches:
            _send(batch, error)
        self._live.clear()

    def _apply_commands(self) -> bool:
        """Runs the commands posted so far (when idle, waits for one); False once close() was called."""
        try:
            commands = [self._commands.get(block=not self.engine.has_unfinished())]
        except queue.Empty:
            return True
        while not self._commands.empty():
            commands.append(self._commands.get())
        for command in commands:
            if command is None:
                return False
            batch, requests = command
            if requests is None:
                self.stats.aborted += self._abort(batch)
            else:
                self._submit(batch, requests)
        return True

    def _submit(self, batch: _Batch, requests: _Requests) -> None:
        try:
            for prompt, params in requests:
                ids = self.engine.encode(prompt)
                batch.ids.append(self.engine.submit(ids, params, batch.target, group=batch))
                self.stats.prompt_tokens[batch.target] += len(ids)
        except Exception as e:  # bad input: nothing of this batch runs
            for request_id in batch.ids:
                self.engine.abort(request_id)
            _send(batch, e)
            return
        for index, request_id in enumerate(batch.ids):
            self._live[request_id] = (batch, index)

    def _abort(self, batch: _Batch) -> int:
        """Takes what is left of a batch out of the engine; returns how many requests that was."""
        dropped = 0
        for request_id in batch.ids:
            if self._live.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                dropped += 1
        return dropped

    def _step(self) -> None:
        stats = self.stats
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # this tick's requests are in doubt, the engine's other state is not
            self._fail_tick(e)
            return
        finally:
            stats.busy_s += time.perf_counter() - start
        for out in outputs:
            if (live := self._live.get(out.request_id)) is None:
                continue  # its batch was dropped earlier in this tick
            batch, index = live
            stats.generated_tokens[batch.target] += len(out.token_ids)
            if out.result is not None:
                m = out.result.metrics
                stats.finished[batch.target, out.finish_reason] += 1
                stats.latency_s[batch.target] += m.wall_s
                stats.drafts_tested = [a + b for a, b in zip(stats.drafts_tested, m.drafts_tested)]
                stats.drafts_accepted = [a + b for a, b in zip(stats.drafts_accepted, m.drafts_accepted)]
            if out.finish_reason is not None:
                del self._live[out.request_id]
            if not _send(batch, (index, out)):
                stats.aborted += self._abort(batch)

    def _fail_tick(self, error: Exception) -> None:
        """A tick raised: the requests it was decoding are in an unknown state, so they (and the rest of
        their batches) leave the engine, which frees their slots and caches, and their callers get
        EngineStepError. Requests still waiting for a slot were not touched: they stay queued."""
        waiting = {seq.request_id for seq in self.engine.scheduler.waiting}
        batches = {batch for request_id, (batch, _) in self._live.items() if request_id not in waiting}
        failed = 0
        for batch in batches:
            failed += self._abort(batch)
            _send(batch, EngineStepError(f"the engine failed while decoding this request ({type(error).__name__}: "
                                         f"{error}); it was aborted"))
        self.stats.failed += failed
        logger.error("an engine tick failed; %d requests of %d callers were aborted, the engine serves on",
                     failed, len(batches), exc_info=error)


def _send(batch: _Batch, item: object) -> bool:
    """Hands an item to the caller's event loop; False if that loop has closed (nobody will read the batch,
    e.g. asyncio.run returned while a generator was left open)."""
    try:
        batch.loop.call_soon_threadsafe(batch.queue.put_nowait, item)
    except RuntimeError:
        return False
    return True
