"""A generate worker's chunks in one engine run (``vocabtrim.chunk_stream``): each chunk's rows as a run of
their own gives them, the slots its rows free taken by the next chunk's, statistics that sum, out of memory and
failures."""

import threading

import pytest
import torch
from tiny import make_model, noisy_copy

from vocabtrim.chunk_stream import ChunkStream
from vocabtrim.engine import make_engine
from vocabtrim.engine.sampling import SamplingParams, row_seed
from vocabtrim.generate import _OutOfMemoryAbove, _is_out_of_memory

V = 300


@pytest.fixture(scope="module")
def engine():
    target = make_model(V, layers=2, seed=0, init_std=1.0).double()
    drafter = noisy_copy(target, scale=0.03)
    return make_engine(target, drafter, gamma=3, sampling=SamplingParams(temperature=0.8), eos_token_ids=(2,),
                       max_new_tokens=16, batch_size=4)


def chunks(n_chunks: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (rows,), generator=g)],
             [row_seed(5, f"c{c}-r{r}") for r in range(rows)]) for c in range(n_chunks)]


def from_threads(stream: ChunkStream, work):
    """Each chunk given from its own thread, as a threaded actor's calls are: [(outputs, stats) or the error]."""
    results = [None] * len(work)

    def one(i):
        try:
            results[i] = stream.generate(*work[i])
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


class Watched:
    """The engine, its open runs watched: the most rows a step had in flight."""

    def __init__(self, engine):
        self.engine, self.most, self.runs = engine, 0, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def open(self, max_new_tokens=None, batch_size=None):
        run, watched = self.engine.open(max_new_tokens, batch_size), self
        self.runs += 1

        class Run:
            def __getattr__(self, name):
                return getattr(run, name)

            def advance(self):
                run._fill()
                watched.most = max(watched.most, run.n)
                return run.advance()

        return Run()


def test_chunks_share_one_run_and_each_row_is_what_its_chunk_alone_gives(engine):
    work = chunks(4, 3)
    alone = [engine.generate(*w) for w in work]
    stats_alone = []
    for w in work:
        engine.generate(*w)
        stats_alone.append(engine.last_stats)
    watched = Watched(engine)
    stream = ChunkStream(watched, 4, 1, _is_out_of_memory, lambda: None)
    results = from_threads(stream, work)
    assert [r[0] for r in results] == alone  # tokens and every figure
    assert watched.most == 4 > 3 and watched.runs == 1  # a chunk's 3 rows, and a 4th from another, in one step
    spent = [r[1] for r in results]
    tokens = sum(s.generated_tokens for s in spent)
    assert tokens == sum(len(o.token_ids) for out in alone for o in out)
    passes = sum(s.target_passes for s in spent)
    assert passes == sum(sum(s.gamma_hist) for s in spent) and 0 < passes < sum(s.target_passes for s in stats_alone)
    assert sum(s.rows_stepped for s in spent) == sum(o.target_passes for out in alone for o in out)
    assert stream.generate([], []) == ([], None)
    stream.close()


def test_out_of_memory_starts_the_run_again_with_fewer_rows_and_the_same_rows(engine, caplog):
    work = chunks(3, 4, seed=1)
    alone = [[o.token_ids for o in engine.generate(*w)] for w in work]
    stream = ChunkStream(_OutOfMemoryAbove(engine, 2), 4, 1, _is_out_of_memory, lambda: None)
    results = from_threads(stream, work)
    assert [[o.token_ids for o in r[0]] for r in results] == alone
    assert caplog.text.count("starting the run again with 2") == 1
    assert all(s.rows_stepped <= 2 * s.target_passes for _, s in results)  # at most 2 rows in flight
    outs, _ = stream.generate(*work[0])  # idle since: the full batch is tried again (and runs out again here)
    assert [o.token_ids for o in outs] == alone[0] and caplog.text.count("starting the run again with 2") == 2
    stream.close()


def test_a_failing_run_fails_every_chunk_it_holds_and_the_next(engine):
    class Broken:
        def __getattr__(self, name):
            return getattr(engine, name)

        def open(self, max_new_tokens=None, batch_size=None):
            run = engine.open(max_new_tokens, batch_size)

            class Run:
                def __getattr__(self, name):
                    return getattr(run, name)

                def advance(self):
                    if run.stats.target_passes >= 3:
                        raise RuntimeError("CUDA error: an illegal memory access was encountered")
                    return run.advance()

            return Run()

    stream = ChunkStream(Broken(), 4, 1, _is_out_of_memory, lambda: None)
    results = from_threads(stream, chunks(2, 3, seed=2))
    assert all(isinstance(r, RuntimeError) and "illegal memory access" in str(r) for r in results)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        stream.generate(*chunks(1, 2)[0])
    never = ChunkStream(_OutOfMemoryAbove(engine, 0), 4, 1, _is_out_of_memory, lambda: None)
    with pytest.raises(torch.OutOfMemoryError):  # out of memory even at one row in flight
        never.generate(*chunks(1, 2)[0])

    def release():  # freeing memory fails too: outside the step, the chunks still fail rather than wait forever
        raise RuntimeError("CUDA error: unspecified launch failure")

    worse = ChunkStream(_OutOfMemoryAbove(engine, 2), 4, 1, _is_out_of_memory, release)
    results = from_threads(worse, chunks(2, 3, seed=3))
    assert all(isinstance(r, RuntimeError) and "launch failure" in str(r) for r in results)
