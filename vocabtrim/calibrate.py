"""The Ray side of calibration: a pool of counting actors, the shard ledger, and the reducer.

Flow (``run_calibrate``):
1. On the driver, before Ray starts: check the flags, load the tokenizer, cut the corpus into shards
   with stable ids (``vocabtrim.corpus``), and claim ``DIR/shards/`` for these settings.
2. Shards with no ledger entry go to a pool of ``ShardCounter`` actors (``--workers``), at most
   ``depth`` calls in flight per actor (backpressure: a million shards never means a million pending
   calls). Each actor loads the tokenizer, and for generated sources the model, once.
3. Each finished shard's partial histogram is written by the driver to ``DIR/shards/<shard_id>.npz``
   (``storage.write_bytes``: a temporary file renamed into place, or one object upload; a ledger entry
   is complete or absent). ``DIR`` may be a local folder or an object-store URI (``s3://…``). An actor that dies (killed,
   crashed, its node lost) is replaced and the shards it held are counted again; a shard delivered
   twice is recorded once (the ledger knows its entries: one listing at start-up, then each it writes; the
   second delivery is dropped without asking the store).
4. The reducer reads exactly one ledger entry per shard id of this corpus and sums them: an id is
   summed once whatever retries or duplicate deliveries happened. A rerun skips shards already in
   the ledger. Output: ``DIR/histogram.parquet`` and ``DIR/manifest.json``.

Sources: ``corpus`` counts the corpus's own tokens (batched fast-tokenizer encode, no special tokens
added); ``drafter`` / ``target`` treat each row as a prompt (as ``--chat-template`` says, ``vocabtrim.chat``:
by default a user message in the chat template when the tokenizer has one), generate ``max_new_tokens`` at ``temperature`` with the row's
own seed (``row_seed(seed, "<file name>:<row key>")``), and count only the generated tokens.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from vocabtrim import corpus, histogram, storage, validate
from vocabtrim.chat import TEMPLATE_KEY, check_message_lists, template_sha256, wraps_strings
from vocabtrim.errors import UserError, first_line, machine_fault, user_error_unless_fault
from vocabtrim.ray_utils import StartingActor, close_engine

log = logging.getLogger(__name__)

SOURCES = ("corpus", "drafter", "target")
GENERATED_SHARD_BYTES = 16 << 10
GENERATED_SHARD_ROWS = 32
DEFAULT_BATCH = {"corpus": 1024, "drafter": 16, "target": 16}


@dataclass
class CalibrateConfig:
    """Everything ``vocabtrim calibrate`` needs (one field per flag, plus Python-only knobs)."""

    drafter: str
    corpus: list[str]
    out: str
    drafter_layers: int | None = None
    text_column: str = "text"
    source: str = "corpus"
    target: str | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    batch_size: int | None = None  # rows per encode / generate call; None: 1024 for corpus, 16 generated
    address: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    shard_bytes: int | None = None  # None: 16 MiB for corpus, 16 KiB for generated sources
    shard_rows: int | None = None  # None: no limit for corpus, 32 rows for generated sources (Parquet, Arrow)
    depth: int = 2  # calls in flight per actor
    show_progress: bool = True
    chat_template: str = "auto"  # generated sources: vocabtrim.chat's rule for the corpus rows used as prompts
    engine: str = "native"  # generated sources: native | vllm (vocabtrim.vllm_backend)


# ---------------------------------------------------------------------------------------------
# One shard's counts and the ledger
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardCount:
    """The partial histogram of one shard, sparse: ``ids`` int64 [N] ascending, ``counts`` int64 [N]."""

    shard_id: str
    path: str
    ids: np.ndarray
    counts: np.ndarray
    rows: int
    skipped_rows: int
    tokens: int
    cpu_seconds: float = 0.0  # the counting process's CPU time for this shard (not stored in the ledger)


class Ledger:
    """``DIR/shards/``: one file per finished shard id, written atomically; the reducer's only input.
    (``train.FeatureLedger`` is the same ledger holding one shard's target features per file.)"""

    RUN_FILE = "_run.json"
    SUFFIX = ".npz"
    HOLDS = "counts"  # what the entries are, for messages
    LATER_KEYS = (TEMPLATE_KEY,)  # run keys that ledgers written by an earlier vocabtrim lack (storage.claim)
    READ_THREADS = 16  # entries the reducer reads at once (round trips to an object store overlap)
    WRITERS = 8  # entries the driver writes at once, beside the pool (``count_shards``): each held until written

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        storage.makedirs(self.folder)
        # One listing up front (not one lookup per shard: a million shards on an object store).
        names = (storage.name(f) for f in storage.walk_files(self.folder))
        self._recorded = {n[: -len(self.SUFFIX)] for n in names if n.endswith(self.SUFFIX)}

    def path(self, shard_id: str) -> str:
        return storage.join(self.folder, f"{shard_id}{self.SUFFIX}")

    def done(self, shard_id: str) -> bool:
        return shard_id in self._recorded

    def claim(self, run_key: dict) -> None:
        """Bind the ledger to one set of settings (``storage.claim``); refuse to mix counts made with other
        settings, and entries with no record of theirs."""
        storage.claim(self.folder, self.RUN_FILE, run_key, what=self.HOLDS, stray=lambda name: name.endswith(self.SUFFIX),
                      later=self.LATER_KEYS)

    def record(self, result: ShardCount) -> bool:
        """Write ``result`` under its shard id; False (nothing written) if that id is already recorded.

        "Recorded" is what the start-up listing found plus what this ledger wrote since, asked of no store: one
        run writes into a folder at a time (``vocabtrim.lease``; on an object store the user's to keep), so no
        entry appears that this ledger does not know of. The histogram's exactness does not rest on it either: an
        entry is a whole file named by its shard id, and ``reduce`` reads one per id."""
        target = self.path(result.shard_id)
        if result.shard_id in self._recorded:
            return False
        meta = {k: getattr(result, k) for k in ("shard_id", "path", "rows", "skipped_rows", "tokens")}
        meta["path"] = storage.display(meta["path"])  # a URI's query (endpoints, keys) is not written down
        buf = io.BytesIO()
        np.savez_compressed(buf, ids=result.ids.astype(np.int64), counts=result.counts.astype(np.int64), meta=np.array(json.dumps(meta)))
        storage.atomic_write(target, buf.getvalue())
        self._recorded.add(result.shard_id)
        return True

    def read(self, shard_id: str) -> ShardCount:
        path = self.path(shard_id)
        try:
            with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                ids, counts = data["ids"], data["counts"]
        except Exception as exc:
            user_error_unless_fault(
                exc, f"ledger entry {storage.display(path)} is unreadable ({first_line(exc)}): delete it and rerun to count that shard again")
        if meta["shard_id"] != shard_id:
            raise UserError(f"ledger entry {storage.display(path)} belongs to shard {meta['shard_id']}: delete it and rerun")
        return ShardCount(ids=ids, counts=counts, **meta)

    def reduce(self, shard_ids: list[str], vocab_size: int) -> tuple[np.ndarray, list[ShardCount]]:
        """Sum exactly one entry per shard id (each id once, however often it was recorded).

        Returns (counts int64 [≥ vocab_size], per-shard entries without their arrays, in shard order).
        Entries are read ``READ_THREADS`` at a time (on an object store each is a round trip) and summed in shard
        order (``storage.each_in_order``: at most twice that many held at once).
        """
        total = np.zeros(vocab_size, dtype=np.int64)
        entries = []
        for entry in storage.each_in_order(self.read, dict.fromkeys(shard_ids), self.READ_THREADS):  # ids unique, in order
            part = histogram.from_sparse(entry.ids, entry.counts, 0)
            total = histogram.add_into(total, part)
            entry.ids = entry.counts = None
            entries.append(entry)
        return total, entries


# ---------------------------------------------------------------------------------------------
# The counting actor (plain class: usable without Ray too)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterSpec:
    """What a counting actor needs to build itself."""

    source: str
    tokenizer: str  # model name whose tokenizer counts (the drafter; for generated sources the model that generates: the same
    # ids, and its chat template builds the prompts)
    tokenizer_json: object = None  # the fast tokenizer serialized (str, or a Ray ObjectRef to one): corpus counting needs no transformers
    model: str | None = None  # model that generates (generated sources)
    model_layers: int | None = None  # --drafter-layers for source drafter
    text_column: str = "text"
    batch_rows: int = 1024
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False
    threads: int = 1
    gpus: float = 0.0  # GPUs per actor: the native engine's device, vLLM's tensor parallelism
    wrap_prompts: bool = True  # generated sources: each row as a user message in the chat template (vocabtrim.chat)
    engine: str = "native"  # generated sources: native | vllm


def prompt_value(value, line: bool = False):
    """A corpus row as a prompt: a non-blank string as it is (``line``: a ``.txt`` row, whose line break ends the
    line rather than the prompt, without it), a list of {role, content} messages made clean
    (``prompts.check_messages``), or None for a row that is neither (skipped, as an empty row is)."""
    from vocabtrim.prompts import check_messages

    if isinstance(value, str):
        if line:
            value = value.removesuffix("\n").removesuffix("\r")
        return value if value.strip() else None
    if isinstance(value, list):
        return check_messages(value)[0]
    return None


def build_prompt(tokenizer, value, limit: int, wrap: bool = True) -> list[int] | None:
    """Token ids of a row's ``prompt_value`` as a prompt, or None where the chat template rejects its messages.

    A string: with ``wrap``, a user message in the tokenizer's chat template (``vocabtrim.chat``: the caller
    decides ``wrap`` from ``--chat-template``); else the text as it is. A string longer than ``limit`` tokens
    keeps the start of the user text (the template around it stays whole) and, failing that, its last
    ``limit`` tokens. A list of messages: the chat template with the generation prompt added, its last
    ``limit`` tokens (the latest turns); without ``wrap`` (no template is to be applied) it is no prompt (None).
    A raw string is encoded as ``generate`` encodes it, with the special tokens the tokenizer adds (BOS).
    """

    def encode(t: str, special: bool = False) -> list[int]:
        return tokenizer(t, add_special_tokens=special)["input_ids"]

    def template(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def as_prompt(text: str) -> list[int]:  # a raw string gets the special tokens the tokenizer adds (BOS), as generate's
        return encode(template([{"role": "user", "content": text}])) if wrap else encode(text, special=True)

    if not isinstance(value, str):
        if not wrap:  # no template applied (--chat-template never, or none in the tokenizer): the row is skipped
            return None
        try:
            return encode(template(value))[-limit:]
        except Exception as exc:  # the template rejects these messages (an unsupported role, say): the row is skipped
            if machine_fault(exc):
                raise
            return None
    ids = as_prompt(value)
    if len(ids) > limit:
        content = encode(value)
        budget = max(1, len(content) - (len(ids) - limit))
        ids = as_prompt(tokenizer.decode(content[:budget]))[-limit:]
    return ids


def batch_prompts(tokenizer, texts: list, keys: list[str], limit: int, wrap: bool = True,
                  lines: bool = False) -> tuple[list[list[int]], list[str]]:
    """The prompts of a batch of corpus rows and their keys: each row's ``prompt_value`` through
    ``build_prompt``; rows that are no prompt (blank, not text, malformed messages), whose messages the chat
    template rejects, or that encode to no token are left out. ``lines``: the rows are a ``.txt`` file's lines."""
    kept = [(p, k) for t, k in zip(texts, keys)
            if (v := prompt_value(t, lines)) is not None and (p := build_prompt(tokenizer, v, limit, wrap))]
    return [p for p, _ in kept], [k for _, k in kept]


def _limit_threads(threads: int, torch_too: bool) -> None:
    """One tokenizer (and torch) thread pool of ``threads`` per actor; set before the first encode."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if torch_too:
        import torch

        torch.set_num_threads(threads)


class ShardCounter(StartingActor):
    """Counts the tokens of one shard at a time: ``count(shard) -> ShardCount``."""

    def _build(self, spec: CounterSpec):
        _limit_threads(spec.threads, torch_too=spec.source != "corpus")
        self.spec = spec
        self.engine = None
        if spec.source == "corpus" and spec.tokenizer_json is not None:
            from tokenizers import Tokenizer

            data = spec.tokenizer_json
            if not isinstance(data, str):
                import ray

                data = ray.get(data)
            self.tokenizer = None
            self._fast = Tokenizer.from_str(data)
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            return
        from vocabtrim.models import load_tokenizer

        self.tokenizer = load_tokenizer(spec.tokenizer, spec.trust_remote_code)
        self.vocab_size = len(self.tokenizer)
        self._fast = getattr(self.tokenizer, "_tokenizer", None)
        if spec.source != "corpus":
            self._load_engine()

    def _load_engine(self) -> None:
        import torch

        from vocabtrim.prompts import max_prompt_tokens

        spec = self.spec
        if spec.engine == "vllm":
            from vocabtrim.vllm_backend import load_for_calibrate

            self.engine, width = load_for_calibrate(
                spec.model, spec.model_layers, self.tokenizer, temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                batch_rows=spec.batch_rows, dtype=spec.dtype, gpus=spec.gpus, trust_remote_code=spec.trust_remote_code,
            )
            self.vocab_size = max(self.vocab_size, width)
            self.prompt_limit = max_prompt_tokens(self.engine.context_length, spec.max_new_tokens, 0, 0, whose=f"{spec.model}'s")
            return

        from vocabtrim.engine import make_engine
        from vocabtrim.engine.sampling import SamplingParams
        from vocabtrim.models import load_drafter, load_model, logits_width
        from vocabtrim.special_tokens import eos_ids, of_model

        device = torch.device("cuda") if spec.gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
        if spec.model_layers is not None:
            model, _ = load_drafter(spec.model, spec.model_layers, dtype=spec.dtype, device=device, trust_remote_code=spec.trust_remote_code)
        else:
            model = load_model(spec.model, dtype=spec.dtype, device=device, trust_remote_code=spec.trust_remote_code)
        self.vocab_size = max(self.vocab_size, logits_width(model))
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30
        self.prompt_limit = max_prompt_tokens(context, spec.max_new_tokens, 0, 0, whose=f"{spec.model}'s")
        self.engine = make_engine(
            model,
            sampling=SamplingParams(temperature=spec.temperature),
            eos_token_ids=tuple(eos_ids(self.tokenizer, of_model(model))),
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_rows,
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (the fast Rust path when there is one)."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[list[int]], row_ids: list[str]) -> list[list[int]]:
        """Generated token ids (only the generated ones) for each prompt, sampled with its row's seed."""
        from vocabtrim.engine.sampling import row_seed

        if not prompts:
            return []
        seeds = [row_seed(self.spec.seed, r) for r in row_ids]
        return [list(out.token_ids) for out in self.engine.generate(prompts, seeds)]

    def close(self) -> None:
        """Close the engine before the pool kills this actor (``ray_utils.close_engine``)."""
        close_engine(getattr(self, "engine", None))

    def count(self, shard: corpus.Shard) -> ShardCount:
        spec = self.spec
        cpu = time.process_time()
        total = np.zeros(self.vocab_size, dtype=np.int64)
        rows = skipped = tokens = 0
        for batch in corpus.iter_shard(shard, spec.text_column, spec.batch_rows):
            if self.engine is None:
                texts = [t for t in batch.texts if isinstance(t, str)]
                ids = self.encode(texts)
            else:
                keys = [f"{shard.name}:{k}" for k in batch.keys]
                ids = self.generate(*batch_prompts(self.tokenizer, batch.texts, keys, self.prompt_limit, spec.wrap_prompts,
                                                   lines=shard.kind == "txt"))
            rows += len(ids)  # one token list per row counted
            skipped += len(batch.texts) - len(ids)
            part = histogram.count_ids(ids, self.vocab_size)
            tokens += int(part.sum())
            total = histogram.add_into(total, part)
        ids_, counts = histogram.to_sparse(total)
        return ShardCount(shard.shard_id, shard.path, ids_, counts, rows, skipped, tokens, time.process_time() - cpu)


# ---------------------------------------------------------------------------------------------
# The actor pool and the driver loop
# ---------------------------------------------------------------------------------------------


class CounterPool:
    """``workers`` ShardCounter actors (refused in one line first where the cluster can never hold them:
    ``ray_utils.check_resources``); ``replace`` swaps a dead one for a fresh one.

    Restarts are the driver's job (``count_shards`` runs the actors under ``ray_utils.ActorPool``, which
    replaces a dead actor in ``actors`` and resubmits the shards it held) rather than Ray's ``max_restarts``: the actors' constructor argument references the
    tokenizer in the object store, which Ray's own restart cannot guarantee to find again.
    Pass ``max_restarts``/``max_task_retries`` to add Ray's in-place restarts on top.
    """

    def __init__(
        self,
        spec: CounterSpec,
        workers: int,
        *,
        cpus_per_worker: float,
        gpus_per_worker: float = 0.0,
        max_restarts: int = 0,
        max_task_retries: int = 0,
        actor_class=None,
    ):
        import ray

        from vocabtrim.ray_utils import check_resources

        check_resources(workers, gpus_per_worker, cpus_per_worker)
        self._cls = ray.remote(actor_class or ShardCounter)
        self._options = dict(
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )
        if isinstance(getattr(spec, "tokenizer_json", None), str):
            # Shared once through the object store (a nested ref keeps the actor's own arguments small).
            spec = replace(spec, tokenizer_json=ray.put(spec.tokenizer_json))
        self.spec = spec
        self.actors = [self._start() for _ in range(workers)]

    def _start(self):
        return self._cls.options(**self._options).remote(self.spec)

    def wait_ready(self) -> None:
        """Block until every actor has built itself (its tokenizer and model are loaded)."""
        from vocabtrim.ray_utils import wait_ready

        wait_ready([a.pid.remote() for a in self.actors], f"{len(self.actors)} counting actors",
                   shape=(self._options["num_cpus"] or 0, self._options["num_gpus"] or 0))

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        from vocabtrim.ray_utils import kill_actors

        kill_actors(self.actors)
        self.actors = []

    def __enter__(self) -> "CounterPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@dataclass
class CountStats:
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # summed over the counting actors
    actor_replacements: int = 0
    duplicate_deliveries: int = 0


def count_shards(
    pool: CounterPool,
    shards: list[corpus.Shard],
    ledger: Ledger,
    *,
    progress=None,
    on_recorded: Callable[[ShardCount, CounterPool], None] | None = None,
    depth: int = 2,
    max_attempts: int = 3,
    method: str = "count",
) -> CountStats:
    """Count ``shards`` on ``pool``, recording each result in ``ledger`` as it arrives.

    The pool's actors run under ``ray_utils.ActorPool``'s failure policy: at most ``depth`` calls per actor
    in flight; a failed or dead actor is replaced and its shards counted again, up to ``max_attempts``
    times per shard (then ``RunFailed``); a UserError raised while reading a shard ends the run as a
    UserError. The ledger keeps a shard counted twice once. ``method``: the actor method called per shard (``count``; the
    feature extractors of ``train-drafter`` use ``extract``), whose result has ``shard_id``, ``rows``,
    ``tokens`` and ``cpu_seconds`` and is what ``ledger.record`` takes.

    Entries are written by ``ledger.WRITERS`` threads beside the pool (on an object store each is an upload and a
    copy: one at a time, the driver's writes would bound the cluster's rate), at most that many at once. A shard
    counts (``stats``, ``progress``, ``on_recorded``, on the driver's thread) once its entry is written; a failed
    write ends the run with its error, and a run that ends early lets the writes under way end (each whole or not
    at all).
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from vocabtrim.ray_utils import ActorPool

    stats = CountStats()
    start = time.perf_counter()
    runner = ActorPool(pool._start, lambda actor, shard: getattr(actor, method).remote(shard), 0, depth=depth,
                       max_attempts=max_attempts, describe=lambda shard: f"shard {shard.shard_id}", actors=pool.actors)
    writes: dict = {}  # Future -> the result it writes
    writing: set[str] = set()  # their shard ids
    writer = ThreadPoolExecutor(ledger.WRITERS, thread_name_prefix="vocabtrim-ledger")

    def recorded(block: bool = False) -> None:
        """Take the finished writes (waiting for one where ``block``); a failed one raises its error here."""
        done = [f for f in writes if f.done()]
        if not done and block:
            done = list(wait(writes, return_when=FIRST_COMPLETED).done)
        for f in done:
            result = writes.pop(f)
            writing.discard(result.shard_id)
            if not f.result():  # a failure raises here; False: recorded by another write
                stats.duplicate_deliveries += 1
                continue
            stats.shards += 1
            stats.rows += result.rows
            stats.tokens += result.tokens
            stats.cpu_seconds += result.cpu_seconds
            if progress is not None:
                progress.update(1, tokens=result.tokens)
            if on_recorded is not None:
                on_recorded(result, pool)

    def on_result(shard, result: ShardCount) -> None:
        if ledger.done(result.shard_id) or result.shard_id in writing:
            stats.duplicate_deliveries += 1
        else:
            writing.add(result.shard_id)
            writes[writer.submit(ledger.record, result)] = result
        recorded(block=len(writes) >= ledger.WRITERS)

    try:
        runner.run(shards, on_result)
        while writes:
            recorded(block=True)
    finally:
        writer.shutdown(wait=True)
    stats.actor_replacements = runner.replacements
    stats.seconds = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    tokenizer_fingerprint: str
    vocab_size: int
    shards: list
    spec: CounterSpec
    run_key: dict
    generator: str | None = None  # the model that generates, for generated sources


def _check_config(config: CalibrateConfig) -> None:
    from vocabtrim.models import check_runs_alone
    from vocabtrim.vllm_backend import check_calibrate_engine  # imports no vLLM

    validate.one_of("source", config.source, SOURCES)
    validate.pool(config.workers, config.gpus_per_worker, config.cpus_per_worker)
    if config.batch_size is not None:
        validate.at_least("batch_size", config.batch_size, 1)
    if config.source != "corpus":
        validate.at_least("max_new_tokens", config.max_new_tokens, 1)
        validate.sampling(config.temperature)
    validate.drafter_layers(config.drafter_layers)
    check_runs_alone("drafter", config.drafter, " (calibrate counts with its tokenizer), then re-trim the EAGLE-3 drafter "
                        "with `vocabtrim build-head --drafter` and the calibration")
    check_runs_alone("target", config.target)
    if storage.is_file(config.out):
        raise UserError(f"--out {storage.display(config.out)} is a file: pass a folder")
    folder = storage.input_folder_holding(config.out, config.corpus)
    if folder is not None:
        raise UserError(f"--out {storage.display(config.out)} is inside the corpus folder {storage.display(folder)}: a rerun "
                        "would read its files as corpus; use an --out outside it")
    check_calibrate_engine(config.engine, config.source, config.gpus_per_worker, config.address, config.temperature)


def _generator(config: CalibrateConfig) -> tuple[str | None, int | None]:
    """(model name, layers) of the model that generates, for generated sources."""
    if config.source == "drafter":
        return config.drafter, config.drafter_layers
    if config.source == "target":
        target = config.target or (config.drafter if config.drafter_layers is not None else None)
        if target is None:
            raise UserError("--source target needs --target MODEL (or --drafter-layers, whose target is the full --drafter)")
        return target, None
    return None, None


def plan(config: CalibrateConfig) -> _Plan:
    """Everything decided before Ray starts: checks, tokenizer, shards, the ledger's run key."""
    from vocabtrim.models import check_declared_widths, check_pair, check_weights, declared_config, load_tokenizer, tokenizer_fingerprint
    from vocabtrim.prompts import check_room

    _check_config(config)
    if config.drafter_layers is not None:  # recorded in the manifest, and build-head reads it: the drafter must have them
        drafter_config = declared_config(config.drafter, config.trust_remote_code)
        if drafter_config is not None:
            validate.drafter_layers(config.drafter_layers, getattr(drafter_config, "num_hidden_layers", None))
    generator, layers = _generator(config)
    tokenizers = {config.drafter: load_tokenizer(config.drafter, config.trust_remote_code)}
    tokenizer = tokenizers[config.drafter]
    for other in dict.fromkeys(m for m in (generator, config.target) if m is not None and m != config.drafter):
        tokenizers[other] = load_tokenizer(other, config.trust_remote_code)
        check_pair(tokenizers[other], tokenizer)  # --target too when it does not generate
        check_declared_widths(other, config.drafter, config.trust_remote_code)
    # Prompts are built with the chat template of the model that generates (tokenizers checked the same above, their
    # templates may differ: a base drafter, an instruct target).
    prompter = generator if generator is not None else config.drafter
    prompter_tokenizer = tokenizers[prompter]
    wrap = wraps_strings(config.chat_template, prompter_tokenizer, prompter) if generator is not None else False
    if generator is not None:
        check_weights(generator)  # a GGUF model converts once here, not in every actor; damaged weights refused now
        if config.engine == "native":  # vLLM's max_model_len may differ (rope scaling): its actors check with it
            check_room(generator, config.max_new_tokens, 0, 0, config.trust_remote_code, whose=f"{generator}'s")
    generated = config.source != "corpus"
    shard_bytes = config.shard_bytes or (GENERATED_SHARD_BYTES if generated else corpus.DEFAULT_SHARD_BYTES)
    shard_rows = config.shard_rows or (GENERATED_SHARD_ROWS if generated else None)
    shards = corpus.make_shards(config.corpus, config.text_column, shard_bytes, shard_rows, messages=generated)
    if not shards or corpus.file_rows(shards) == 0:
        raise UserError(f"the corpus is empty: no rows in {' '.join(map(storage.display, config.corpus))}")
    with_messages = next((s for s in shards if s.messages), None)
    if with_messages is not None:
        check_message_lists(config.chat_template, prompter_tokenizer, prompter,
                            f"{storage.display(with_messages.path)} holds message lists in {config.text_column!r}")
    fingerprint = tokenizer_fingerprint(tokenizer)
    run_key = {"version": 1, "tokenizer_fingerprint": fingerprint, "source": config.source, "text_column": config.text_column}
    if generator is not None:
        run_key.update(
            model=generator, model_layers=layers, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature, seed=config.seed, dtype=config.dtype,
        )
        if config.gpus_per_worker > 0:  # another device gives other floats (and --dtype auto another dtype); no key: the CPU,
            run_key["device"] = "cuda"  # as ledgers written before it was recorded
        if config.chat_template != "auto":  # auto is what ledgers written before the flag did: they stay resumable
            run_key["chat_template"] = config.chat_template
        template = template_sha256(prompter_tokenizer, config.chat_template)
        if template:  # the template prompts are rendered with; none where none is used, as ledgers written before it was
            run_key[TEMPLATE_KEY] = template
        if config.engine != "native":  # likewise: native is what ledgers written before --engine did
            run_key["engine"] = config.engine
    fast = getattr(tokenizer, "_tokenizer", None)
    spec = CounterSpec(
        source=config.source,
        tokenizer=prompter,
        tokenizer_json=fast.to_str() if fast is not None and config.source == "corpus" else None,
        model=generator,
        model_layers=layers,
        text_column=config.text_column,
        batch_rows=config.batch_size or DEFAULT_BATCH[config.source],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        gpus=config.gpus_per_worker,
        wrap_prompts=wrap,
        engine=config.engine,
    )
    return _Plan(fingerprint, len(tokenizer), shards, spec, run_key, generator)


def _progress_bar(config: CalibrateConfig, total: int, initial: int):
    from vocabtrim.progress import Progress

    return Progress(total, "shard", "calibrate", initial=initial, enabled=config.show_progress)


def _file_summary(entries: list[ShardCount]) -> list[dict]:
    files: dict[str, dict] = {}
    for e in entries:
        shown = storage.display(e.path)  # entries record it so; earlier ones the location as given
        f = files.setdefault(shown, {"path": shown, "shards": 0, "rows": 0, "skipped_rows": 0, "tokens": 0})
        f["shards"] += 1
        f["rows"] += e.rows
        f["skipped_rows"] += e.skipped_rows
        f["tokens"] += e.tokens
    return list(files.values())


def run_calibrate(config: CalibrateConfig, *, on_recorded=None) -> dict:
    """Count the corpus into ``config.out`` (resuming from its ledger; held by ``lease``: one run at a time) and
    return the manifest."""
    from vocabtrim.lease import lease

    with lease(os.fspath(config.out)):
        return _calibrate(config, on_recorded)


def _calibrate(config: CalibrateConfig, on_recorded) -> dict:
    from vocabtrim.ray_utils import default_cpus_per_worker, init_ray

    wall = time.perf_counter()
    p = plan(config)
    out = config.out
    storage.check_out_kind(out, histogram.MANIFEST_KIND)
    ledger = Ledger(storage.join(out, "shards"))
    ledger.claim(p.run_key)
    storage.remove_temporaries(out)  # killed runs' partial manifest.json or histogram (the ledger's claim did shards/)
    todo = [s for s in p.shards if not ledger.done(s.shard_id)]
    if todo:  # the manifest describes the histogram of every shard a run was given: one stopped now leaves none,
        storage.delete(storage.join(out, "manifest.json"))  # not an earlier run's of fewer files
    stats = CountStats()
    startup = 0.0
    cpus = config.cpus_per_worker
    if todo:
        init_ray(config.address)
        cpus = cpus or default_cpus_per_worker(config.workers)
        spec = CounterSpec(**{**asdict(p.spec), "threads": max(1, int(cpus))})
        t0 = time.perf_counter()
        # Workers beyond the shards to count are not started (nor asked of the cluster).
        with CounterPool(spec, min(config.workers, len(todo)), cpus_per_worker=cpus, gpus_per_worker=config.gpus_per_worker) as pool:
            pool.wait_ready()
            startup = time.perf_counter() - t0
            bar = _progress_bar(config, len(p.shards), len(p.shards) - len(todo))
            try:
                stats = count_shards(pool, todo, ledger, progress=bar, on_recorded=on_recorded, depth=config.depth)
            finally:
                bar.close()
    counts, entries = ledger.reduce([s.shard_id for s in p.shards], p.vocab_size)
    total = int(counts.sum())
    if total == 0:
        raise UserError(f"the corpus gave no tokens: every row of {' '.join(map(storage.display, config.corpus))} is empty or has no {config.text_column!r} text")
    histogram.save(counts, storage.join(out, "histogram.parquet"))
    wall = time.perf_counter() - wall
    manifest = {
        "kind": histogram.MANIFEST_KIND,
        "version": 1,
        "tokenizer_fingerprint": p.tokenizer_fingerprint,
        "vocab_size": p.vocab_size,
        "histogram_fingerprint": histogram.fingerprint(counts),
        "source": config.source,
        "drafter": config.drafter,
        "drafter_layers": config.drafter_layers,
        "generator": p.generator,
        "max_new_tokens": config.max_new_tokens if p.generator else None,
        "temperature": config.temperature if p.generator else None,
        "seed": config.seed if p.generator else None,
        "text_column": config.text_column,
        "chat_template": config.chat_template if p.generator else None,
        "engine": config.engine if p.generator else None,
        "prompts_wrapped": p.spec.wrap_prompts if p.generator else None,
        "total_tokens": total,
        "distinct_tokens": int(np.count_nonzero(counts)),
        "rows": sum(e.rows for e in entries),
        "skipped_rows": sum(e.skipped_rows for e in entries),
        "shards": len(p.shards),
        "shards_counted": stats.shards,
        "shards_resumed": len(p.shards) - len(todo),
        "files": _file_summary(entries),
        "workers": config.workers,
        "cpus_per_worker": cpus,
        "gpus_per_worker": config.gpus_per_worker,
        "tokens_counted": stats.tokens,
        "startup_seconds": round(startup, 3),
        "counting_seconds": round(stats.seconds, 3),
        "counting_cpu_seconds": round(stats.cpu_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(stats.tokens / stats.seconds, 1) if stats.seconds > 0 else None,
        "tokens_per_second_end_to_end": round(stats.tokens / wall, 1) if wall > 0 else None,
        "actor_replacements": stats.actor_replacements,
        "duplicate_deliveries": stats.duplicate_deliveries,
    }
    storage.atomic_write(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest
