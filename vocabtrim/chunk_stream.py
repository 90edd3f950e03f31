"""One engine run shared by the chunks a generate worker holds (``Engine.open``, ``VllmEngine.open``).

A worker holds up to ``generate.IN_FLIGHT`` chunks. Run one at a time, each chunk's last rows would leave the
batch's slots empty until its longest row ends; here every chunk's rows join one run as the chunk arrives, so the
slots that a chunk's finished rows free go to the next chunk's rows at once (continuous batching across chunks).
Each ``generate`` call (one per chunk, from the actor's threads) waits for its own rows; one thread steps the run.

A row's completion does not depend on its batch-mates, so the rows come out as a run of their chunk alone gives
them. The run's statistics (passes, seconds) are counted to chunks as they finish: a chunk takes what the run
spent since the chunk before it finished, so a run's figures sum exactly and a chunk's are its share in time.

Out of memory starts the run again with half the rows in flight, and the rows not finished with it (from the
start: a row's completion does not depend on where it restarts), until the run holds no row (then the full batch
again: with two chunks out at a time, that may be the job's end); any other failure of the run fails every chunk it holds and every chunk given later (the pool retries them
on a fresh worker).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, fields

log = logging.getLogger(__name__)
CLOSE_WAIT_S = 10.0  # how long ``close`` waits for the step under way


@dataclass
class _Chunk:
    prompts: list
    seeds: list
    outs: list
    left: int
    done: threading.Event = field(default_factory=threading.Event)
    spent: object = None  # its share of the run's EngineStats, once done
    error: BaseException | None = None


class ChunkStream:
    """``generate(prompts, seeds) -> (outputs, EngineStats)`` for the chunks of one worker, from any thread."""

    def __init__(self, engine, batch_size: int, threads: int, out_of_memory, release_memory):
        """``out_of_memory(exc)``: whether ``exc`` is running out of memory; ``release_memory()`` frees what it can
        before the run starts again with fewer rows; ``threads``: the stepping thread's torch threads."""
        self.engine, self.batch_size, self.threads = engine, batch_size, threads
        self._out_of_memory, self._release_memory = out_of_memory, release_memory
        self._cond = threading.Condition()
        self._queued: list[_Chunk] = []  # chunks given, not yet added to the run
        self._broken: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def generate(self, prompts: list[list[int]], seeds: list[int]):
        """Every row's ``RowOutput`` (in order), and the chunk's share of the run's statistics (None for no rows)."""
        if not prompts:
            return [], None
        chunk = _Chunk(list(prompts), list(seeds), [None] * len(prompts), len(prompts))
        with self._cond:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queued.append(chunk)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vocabtrim-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        chunk.done.wait()
        if chunk.error is not None:
            raise chunk.error
        return chunk.outs, chunk.spent

    def close(self) -> None:
        """Stop the stepping thread once the step under way ends (the chunks it holds fail), and wait for it
        (``CLOSE_WAIT_S`` at most): the engine is then the caller's to close."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT_S)

    # -- the stepping thread ------------------------------------------------------------------

    def _loop(self) -> None:
        holding: list[_Chunk] = []
        try:
            self._steps(holding)
        except BaseException as exc:  # the run failed: every chunk it holds, and any given later, fail with it
            with self._cond:
                self._broken = exc
                self._fail(holding + self._queued, exc)
                self._queued = []

    def _steps(self, holding: list) -> None:
        import torch

        torch.set_num_threads(self.threads)  # a thread's own setting: the actor's is its main thread's
        batch = self.batch_size
        run, owner = self.engine.open(batch_size=batch), {}  # run row -> (chunk, its place in the chunk)
        taken = _zero(run.stats)  # the run's statistics counted to chunks so far
        carried = _zero(run.stats)  # runs given up: what they spent that no chunk took
        while True:
            with self._cond:
                while not self._queued and not run.busy and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail(holding + self._queued, RuntimeError("the engine was closed"))
                    self._queued = []
                    return
                new, self._queued = self._queued, []
                holding.extend(new)  # from here their fault is the run's: they fail with it
            if not run.busy and batch < self.batch_size:  # empty after running out of memory: the full batch again
                batch = self.batch_size
                carried = _plus(carried, _minus(run.stats, taken))
                run = self.engine.open(batch_size=batch)
                taken = _zero(run.stats)
            for chunk in new:
                for j, r in enumerate(run.add(chunk.prompts, chunk.seeds)):
                    owner[r] = (chunk, j)
            try:
                finished = run.advance()
            except Exception as exc:
                if not self._out_of_memory(exc) or batch == 1:
                    raise
                log.warning("out of memory with %d rows in flight; starting the run again with %d (the full batch "
                            "again once the run holds no row)", batch, batch // 2)
                batch //= 2
                carried = _plus(carried, _minus(run.stats, taken))
                run.drop()
                self._release_memory()
                run = self.engine.open(batch_size=batch)
                taken = _zero(run.stats)
                restart = sorted(owner.items())
                owner = {}
                for (chunk, j) in (o for _, o in restart):
                    (r,) = run.add([chunk.prompts[j]], [chunk.seeds[j]])
                    owner[r] = (chunk, j)
                continue
            for r, out in finished:
                chunk, j = owner.pop(r)
                chunk.outs[j] = out
                chunk.left -= 1
                if chunk.left == 0:
                    chunk.spent = _plus(carried, _minus(run.stats, taken))
                    carried, taken = _zero(run.stats), _copy(run.stats)
                    holding.remove(chunk)
                    chunk.done.set()

    @staticmethod
    def _fail(chunks: list[_Chunk], exc: BaseException) -> None:
        for chunk in chunks:
            chunk.error = exc
            chunk.done.set()


def _zero(stats):
    return type(stats)(batch_size=stats.batch_size, gamma_hist=[0] * len(stats.gamma_hist))


def _copy(stats):
    return _plus(_zero(stats), stats)


def _plus(a, b):
    return _combine(a, b, 1)


def _minus(a, b):
    return _combine(a, b, -1)


def _combine(a, b, sign: int):
    """EngineStats ``a + sign * b``, field by field (``batch_size``: a's)."""
    out = _zero(a)
    for f in fields(a):
        if f.name == "batch_size":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, list):
            n = max(len(x), len(y))
            x, y = x + [0] * (n - len(x)), y + [0] * (n - len(y))
            setattr(out, f.name, [u + sign * v for u, v in zip(x, y)])
        else:
            setattr(out, f.name, x + sign * y)
    return out
