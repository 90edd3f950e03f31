"""The Ray side of ``vocabtrim generate``: an actor pool over prompt files, resumable, one output per input.

How a run goes:
1. Checks before any heavy work: flags, the target/drafter tokenizers, the head folder, every input
   file (Parquet, prompt column), and ``--out`` (its ``settings.json`` must match this run's settings).
2. Input files whose output is already complete are skipped (resume).
3. ``--workers`` actors each load the target, drafter and head once. The driver streams each remaining
   file in chunks of rows and keeps at most ``IN_FLIGHT`` chunks queued per actor. An actor turns
   rows into token ids (bad rows become error rows), runs the ``SpeculativeEngine`` on batches of
   ``--batch-size`` and returns the results.
4. When all of a file's chunks are back, the driver writes ``DIR/<name>`` atomically (locally a temporary
   name, then rename; on an object store one upload of the finished file), with the file's engine
   statistics in the Parquet footer. A killed run leaves only complete outputs behind, so a rerun
   generates each missing file once and every row exactly once.
5. ``DIR/summary.json`` sums the outputs of all input files (generated now or by an earlier run).

``--prompts``, ``--out`` and ``--head`` are locations (``vocabtrim.storage``): local paths or object-store URIs.
Only ``vocabtrim.storage`` touches them; messages show them without their query (``storage.display``).

Rows are independent of their batch-mates and of the worker that runs them: each row's seed is
``row_seed(--seed, row key)`` (``vocabtrim.prompts``), and the engine draws that row's randomness from
its own generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim import storage
from vocabtrim.errors import UserError
from vocabtrim.prompts import PromptFile, encode_prompt, inspect_prompt_files, read_chunks

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"  # vocabtrim.head.HEAD_FILE (not imported: that module loads torch)
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
STATS_KEY = b"vocabtrim.generate"
IN_FLIGHT = 2  # chunks queued per actor: one running, one waiting
RESULT_COLUMNS = ["completion", "completion_tokens", "draft_proposed", "draft_accepted", "finish_reason", "error"]
RESULT_TYPES = [pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.string(), pa.string()]


@dataclass
class GenerateConfig:
    """Everything ``vocabtrim generate`` takes (flags of the same names)."""

    target: str
    prompts: list[str]
    out: str
    drafter: str | None = None
    drafter_layers: int | None = None
    head: str | None = None
    no_draft: bool = False
    prompt_column: str = "prompt"
    id_column: str = "id"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    gamma: int = 4
    batch_size: int = 8
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    address: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    rows_per_task: int | None = None  # rows sent to an actor at a time (default: 4 batches)
    engine: str = "native"  # native | vllm (vocabtrim.vllm_backend)


# ---------------------------------------------------------------------------------------------
# Checks and settings (driver, before Ray)
# ---------------------------------------------------------------------------------------------


def _positive(name: str, value) -> None:
    if value is None or int(value) < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def check_config(cfg: GenerateConfig) -> None:
    """Refuse flag combinations that can never work, in one line."""
    from vocabtrim.vllm_backend import check_generate_config  # --engine (imports no vLLM)

    check_generate_config(cfg)
    for name in ("max_new_tokens", "batch_size", "workers"):
        _positive("--" + name.replace("_", "-"), getattr(cfg, name))
    if cfg.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {cfg.gpus_per_worker}")
    if cfg.cpus_per_worker is not None and cfg.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {cfg.cpus_per_worker}")
    if cfg.no_draft:
        if cfg.head:
            raise UserError("--head needs a drafter: drop --no-draft or --head")
    else:
        _positive("--gamma", cfg.gamma)
        if cfg.drafter is None and cfg.drafter_layers is None:
            raise UserError("no drafter: pass --drafter MODEL, --drafter-layers N (drafter = first N target layers), or --no-draft")
    if cfg.head and not storage.is_file(storage.join(cfg.head, HEAD_FILE)):
        raise UserError(f"--head {storage.display(cfg.head)} holds no {HEAD_FILE}: pass a folder written by `vocabtrim build-head`")
    if not cfg.prompt_column:
        raise UserError("--prompt-column must not be empty")
    if cfg.id_column in RESULT_COLUMNS:
        raise UserError(f"--id-column {cfg.id_column!r} clashes with an output column: pick another name")


def _drafter_name(cfg: GenerateConfig) -> str | None:
    if cfg.no_draft:
        return None
    return cfg.drafter if cfg.drafter is not None else cfg.target


def _model_key(name: str | None) -> str | None:
    """A model name as recorded in settings: local paths made absolute, other names (hub ids, URIs) as given."""
    if name is None:
        return None
    if storage.is_uri(name):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _file_sha256(where: str) -> str:
    h = hashlib.sha256()
    with storage.open_input_file(where) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_models(cfg: GenerateConfig, files: list[PromptFile]) -> str:
    """Load the tokenizers (not the models), refuse a mismatched pair, and refuse message-list prompts
    when the tokenizer has no chat template. Returns the tokenizer fingerprint."""
    from vocabtrim.models import check_pair, load_tokenizer, tokenizer_fingerprint

    target_tok = load_tokenizer(cfg.target, cfg.trust_remote_code)
    drafter = _drafter_name(cfg)
    if drafter is not None and drafter != cfg.target and not (cfg.engine == "vllm" and drafter == "ngram"):
        check_pair(target_tok, load_tokenizer(drafter, cfg.trust_remote_code))
    if getattr(target_tok, "chat_template", None) is None:
        for f in files:
            if pa.types.is_list(f.prompt_type) or pa.types.is_large_list(f.prompt_type):
                raise UserError(
                    f"{storage.display(f.path)} holds message lists in {cfg.prompt_column!r} but {cfg.target}'s tokenizer has no chat template"
                )
    return tokenizer_fingerprint(target_tok)


def settings_of(cfg: GenerateConfig, fingerprint: str) -> dict:
    """What decides a row's completion. A rerun into the same ``--out`` must match it exactly.

    ``--batch-size`` and ``--workers`` are not settings: rows do not depend on them.
    """
    draft = not cfg.no_draft
    # --engine vllm is recorded; native runs record no engine, so outputs written before --engine existed resume.
    engine = {"engine": cfg.engine} if cfg.engine != "native" else {}
    return {
        **engine,
        "target": _model_key(cfg.target),
        "drafter": _model_key(_drafter_name(cfg)),
        "drafter_layers": cfg.drafter_layers if draft else None,
        "head_sha256": _file_sha256(storage.join(cfg.head, HEAD_FILE)) if cfg.head else None,
        "no_draft": cfg.no_draft,
        "gamma": cfg.gamma if draft else None,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "top_k": int(cfg.top_k),
        "seed": int(cfg.seed),
        "prompt_column": cfg.prompt_column,
        "id_column": cfg.id_column,
        "dtype": cfg.dtype,
        "tokenizer": fingerprint,
    }


def _write_json(where: str, data: dict) -> None:
    storage.atomic_write(where, (json.dumps(data, indent=2, default=str) + "\n").encode())


def prepare_out(out: str, settings: dict) -> None:
    """Create ``--out`` and record the settings, or check them against the recorded ones."""
    shown = storage.display(out)
    recorded_path = storage.join(out, SETTINGS_FILE)
    if storage.is_file(recorded_path):
        try:
            recorded = json.loads(storage.read_text(recorded_path))
        except (OSError, ValueError) as exc:
            raise UserError(f"{storage.display(recorded_path)} is unreadable ({_first_line(exc)}): use a new --out") from exc
        keys = list(settings) + [k for k in recorded if k not in settings]  # a key only one side has differs too (engine)
        diffs = [f"{k} {recorded.get(k)!r} vs {settings.get(k)!r}" for k in keys if recorded.get(k) != settings.get(k)]
        if diffs:
            raise UserError(
                f"{shown} holds outputs made with other settings ({'; '.join(diffs[:3])}"
                f"{'; …' if len(diffs) > 3 else ''}): rerun with the same settings to resume, or use a new --out"
            )
        return
    if storage.is_file(out):
        raise UserError(f"--out {shown} is a file, not a folder")
    if any(storage.name(p).endswith(".parquet") for p in storage.walk_files(out)):
        raise UserError(f"--out {shown} already holds Parquet files but no {SETTINGS_FILE}: use a new or empty --out")
    storage.makedirs(out)
    _write_json(recorded_path, settings)


def remove_stale_temporaries(out: str) -> None:
    """Partial files a killed run left behind in a local ``--out`` (never complete outputs: those have their
    final names). Local writes go through ``storage`` (``.<name>.<random>.tmp`` beside the target; earlier
    versions wrote ``.<name>.tmp-<random>``). Object stores hold no partial objects: an upload appears whole."""
    if not storage.is_local(out):
        return
    root = Path(storage.local_path(out))
    for pattern in (".*.tmp", ".*.tmp-*"):
        for tmp in root.rglob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def output_path(out: str, file: PromptFile) -> str:
    return storage.join(out, file.name)


def is_complete(out: str, file: PromptFile) -> bool:
    """An output exists under its final name only once fully written; its row count must match the input."""
    path = output_path(out, file)
    shown = storage.display(path)
    try:
        with storage.open_input_file(path) as f:
            rows = pq.read_metadata(f).num_rows
    except FileNotFoundError:
        return False
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{shown} is not a readable output ({_first_line(exc)}): delete it and rerun") from exc
    if rows != file.num_rows:
        raise UserError(
            f"{shown} has {rows} rows but {storage.display(file.path)} has {file.num_rows}: the input changed; use a new --out"
        )
    return True


# ---------------------------------------------------------------------------------------------
# One chunk of rows on a worker (pure apart from the engine)
# ---------------------------------------------------------------------------------------------


@dataclass
class ChunkStats:
    """Engine statistics summed over a chunk, a file or a run (see ``EngineStats``)."""

    accepted_hist: list[int] = field(default_factory=list)  # [gamma + 1]
    target_passes_rows: int = 0  # sum over rows of the target passes each took part in
    drafter_seconds: float = 0.0
    drafter_forwards: int = 0
    target_seconds: float = 0.0
    target_passes: int = 0  # batched target forward passes
    prefill_seconds: float = 0.0
    engine_seconds: float = 0.0
    # --engine vllm: vLLM's own speculative counters (vllm:spec_decode_*), summed
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)  # [gamma]

    def add(self, other: "ChunkStats") -> "ChunkStats":
        lists = ("accepted_hist", "spec_accepted_per_position")
        return ChunkStats(
            **{k: [a + b for a, b in zip(_pad(getattr(self, k), getattr(other, k)), _pad(getattr(other, k), getattr(self, k)))] for k in lists},
            **{k: getattr(self, k) + getattr(other, k) for k in asdict(self) if k not in lists},
        )


def _pad(a: list[int], b: list[int]) -> list[int]:
    return list(a) + [0] * max(0, len(b) - len(a))


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def generate_chunk(engine, tokenizer, prompts: list, keys: list[str], *, seed: int, batch_size: int, max_prompt_tokens: int) -> dict:
    """Generate for one chunk of rows; returns the result columns (``RESULT_COLUMNS``) and ``stats``.

    Rows are encoded (bad ones become error rows), sorted by prompt length to pad little, run in
    batches of ``batch_size``, and returned in input order. A batch the engine fails on is retried row
    by row, so one bad row cannot take its batch-mates down with it.
    """
    from vocabtrim.sampling import row_seed

    n = len(prompts)
    cols = {c: [None] * n for c in RESULT_COLUMNS}
    stats = ChunkStats(accepted_hist=[0] * (engine.gamma + 1))
    encoded = {}
    for i, value in enumerate(prompts):
        ids, problem = encode_prompt(value, tokenizer, max_prompt_tokens)
        if problem:
            _set_error(cols, i, problem)
        else:
            encoded[i] = ids
    order = sorted(encoded, key=lambda i: (len(encoded[i]), i))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        try:
            outs = _run_engine(engine, [encoded[i] for i in rows], [row_seed(seed, keys[i]) for i in rows], stats)
        except Exception:  # retry alone: only the rows that fail by themselves become errors
            log.warning("a batch of %d rows failed; retrying row by row", len(rows), exc_info=True)
            outs = []
            for i in rows:
                try:
                    outs.extend(_run_engine(engine, [encoded[i]], [row_seed(seed, keys[i])], stats))
                except Exception as exc:
                    outs.append(exc)
        for i, out in zip(rows, outs):
            if isinstance(out, BaseException):
                _set_error(cols, i, f"generation failed: {_first_line(out)}")
                continue
            cols["completion"][i] = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            cols["completion_tokens"][i] = len(out.token_ids)
            cols["draft_proposed"][i] = out.proposed
            cols["draft_accepted"][i] = out.accepted
            cols["finish_reason"][i] = out.finish_reason
            stats.target_passes_rows += out.target_passes
            stats.accepted_hist = [a + b for a, b in zip(stats.accepted_hist, out.accepted_hist)]
    return {"columns": cols, "stats": asdict(stats)}


def _set_error(cols: dict, i: int, message: str) -> None:
    cols["completion_tokens"][i] = 0
    cols["draft_proposed"][i] = 0
    cols["draft_accepted"][i] = 0
    cols["finish_reason"][i] = "error"
    cols["error"][i] = message


def _run_engine(engine, prompts, seeds, stats: ChunkStats):
    outs = engine.generate(prompts, seeds)
    s = engine.last_stats
    stats.drafter_seconds += s.drafter_seconds
    stats.drafter_forwards += s.drafter_forwards
    stats.target_seconds += s.target_seconds
    stats.target_passes += s.target_passes
    stats.prefill_seconds += s.prefill_seconds
    stats.engine_seconds += s.wall_seconds
    if hasattr(s, "spec_drafts"):  # --engine vllm
        stats.spec_drafts += s.spec_drafts
        stats.spec_draft_tokens += s.spec_draft_tokens
        stats.spec_accepted_tokens += s.spec_accepted_tokens
        per = s.spec_accepted_per_position
        stats.spec_accepted_per_position = [a + b for a, b in zip(_pad(stats.spec_accepted_per_position, per), _pad(per, stats.spec_accepted_per_position))]
    return outs


# ---------------------------------------------------------------------------------------------
# The Ray actor
# ---------------------------------------------------------------------------------------------


class GenerateWorker:
    """Holds the target, drafter, head and engine; generates chunks of rows.

    Construction never raises: a user error while loading (a mismatched pair, a head built for another
    drafter) is kept and reported by ``info()``, so the driver can print it in one line.
    """

    def __init__(self, cfg: dict, threads: int):
        import torch

        from transformers.utils import logging as hf_logging

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        hf_logging.disable_progress_bar()  # one progress bar (the driver's), not one per weight load
        self.cfg = GenerateConfig(**cfg)
        self.error = None
        try:
            self._load()
        except UserError as exc:
            self.error = str(exc)

    def _load(self) -> None:
        if self.cfg.engine == "vllm":
            from vocabtrim.vllm_backend import load_for_generate

            self.engine, self.tokenizer, self.max_prompt_tokens = load_for_generate(self.cfg)
            return
        from vocabtrim.models import load_pair
        from vocabtrim.sampling import SamplingParams
        from vocabtrim.speculative import SpeculativeEngine

        c = self.cfg
        pair = load_pair(
            c.target,
            None if c.no_draft else c.drafter,
            None if c.no_draft else c.drafter_layers,
            dtype=c.dtype,
            trust_remote_code=c.trust_remote_code,
            need_drafter=not c.no_draft,
        )
        head = None
        if c.head:
            from vocabtrim.head import load_head

            head = load_head(c.head, drafter_model=pair.drafter, tokenizer=pair.tokenizer)
        tok = pair.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(pair.target, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
        self.engine = SpeculativeEngine(
            pair.target,
            pair.drafter,
            head=head,
            gamma=c.gamma,
            sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k),
            eos_token_ids=sorted(eos),
            max_new_tokens=c.max_new_tokens,
            pad_token_id=pad,
        )
        self.tokenizer = tok
        context = self.engine.context_length or (1 << 62)
        if c.max_new_tokens >= context:
            raise UserError(f"--max-new-tokens {c.max_new_tokens} leaves no room for a prompt in the target's context of {context} tokens")
        self.max_prompt_tokens = context - c.max_new_tokens

    def info(self) -> dict:
        return {"error": self.error}

    def run(self, prompts: list, keys: list[str]) -> dict:
        # vLLM gets the whole chunk at once and batches it itself (--batch-size rows at a time, refilled
        # as rows finish); the native engine gets batches of --batch-size.
        batch_size = max(1, len(prompts)) if self.cfg.engine == "vllm" else self.cfg.batch_size
        return generate_chunk(
            self.engine,
            self.tokenizer,
            prompts,
            keys,
            seed=self.cfg.seed,
            batch_size=batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
        )


def start_workers(cfg: GenerateConfig) -> list:
    """Create the actor pool and wait until every actor has loaded its models."""
    import ray

    from vocabtrim.ray_utils import check_resources, default_cpus_per_worker, wait_ready

    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else default_cpus_per_worker(cfg.workers)
    check_resources(cfg.workers, cfg.gpus_per_worker, cpus)
    # One torch thread per CPU the actor holds: more threads than reserved CPUs collapse under contention
    # (measured: 2 threads on a busy 2-core machine decode 20x slower than 1). --cpus-per-worker 2 gives 2.
    threads = max(1, int(cpus))
    actor_cls = ray.remote(GenerateWorker).options(
        num_cpus=cpus, num_gpus=cfg.gpus_per_worker, max_restarts=1, max_task_retries=1
    )
    spec = {k: v for k, v in asdict(cfg).items()}
    actors = [actor_cls.remote(spec, threads) for _ in range(cfg.workers)]
    try:
        infos = wait_ready([a.info.remote() for a in actors], f"{cfg.workers} generate workers",
                           shape=(cpus, cfg.gpus_per_worker))
    except BaseException:
        stop_workers(actors)
        raise
    errors = [i["error"] for i in infos if i["error"]]
    if errors:
        stop_workers(actors)
        raise UserError(errors[0])
    return actors


def stop_workers(actors: list) -> None:
    import ray

    for a in actors:
        ray.kill(a)  # a vLLM engine's own process ends with its actor (vLLM watches its parent)


# ---------------------------------------------------------------------------------------------
# Driver: schedule chunks, assemble files, write them atomically
# ---------------------------------------------------------------------------------------------


@dataclass
class _FileState:
    file: PromptFile
    ids: dict = field(default_factory=dict)  # chunk start -> Arrow id array
    results: dict = field(default_factory=dict)  # chunk start -> columns
    stats: ChunkStats = field(default_factory=ChunkStats)
    pending: int = 0
    all_sent: bool = False


def write_output(path: str, id_column: str, id_type, ids: list[pa.Array], columns: list[dict], stats: ChunkStats) -> dict:
    """Write one output file atomically; returns its file-level statistics (also stored in its footer)."""
    id_arrays = [a.cast(id_type) if id_type is not None else a for a in ids]
    id_array = pa.concat_arrays(id_arrays) if id_arrays else pa.array([], type=id_type or pa.string())
    arrays = [id_array]
    for name, typ in zip(RESULT_COLUMNS, RESULT_TYPES):
        arrays.append(pa.array([v for c in columns for v in c[name]], type=typ))
    table = pa.Table.from_arrays(arrays, names=[id_column] + RESULT_COLUMNS)
    file_stats = _file_stats(table, stats)
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(file_stats).encode()})
    storage.write_with(path, lambda tmp: pq.write_table(table, tmp))  # whole file or nothing
    return file_stats


def _file_stats(table: pa.Table, stats: ChunkStats) -> dict:
    reasons = table.column("finish_reason").to_pylist()
    return {
        "rows": table.num_rows,
        "errored_rows": sum(r == "error" for r in reasons),
        "generated_tokens": sum(table.column("completion_tokens").to_pylist()),
        "draft_proposed": sum(table.column("draft_proposed").to_pylist()),
        "draft_accepted": sum(table.column("draft_accepted").to_pylist()),
        **asdict(stats),
    }


def read_file_stats(path: str) -> dict:
    with storage.open_input_file(path) as f:
        meta = pq.read_schema(f).metadata or {}
    if STATS_KEY not in meta:
        raise UserError(f"{storage.display(path)} was not written by vocabtrim generate: use a new --out")
    return json.loads(meta[STATS_KEY])


def _chunk_source(files: list[PromptFile], cfg: GenerateConfig, rows_per_task: int):
    """Yield ``(file index, chunk)``; ``(file index, None)`` once a file's chunks are all out."""
    for index, file in enumerate(files):
        for chunk in read_chunks(file, cfg.prompt_column, cfg.id_column, rows_per_task):
            yield index, chunk
        yield index, None


def run_pool(actors: list, files: list[PromptFile], cfg: GenerateConfig, out: str, on_rows, on_written) -> None:
    """Feed every row of ``files`` to ``actors`` (``IN_FLIGHT`` chunks each) and write each file when done.

    ``on_rows(n)`` is called as each chunk of n rows comes back; ``on_written(file, stats)`` after each write.
    """
    import ray

    rows_per_task = cfg.rows_per_task or cfg.batch_size * 4
    source = _chunk_source(files, cfg, rows_per_task)
    states = {i: _FileState(file=f) for i, f in enumerate(files)}
    inflight: dict = {}  # ObjectRef -> (actor, file index, chunk start)
    load = {id(a): 0 for a in actors}
    exhausted = False
    id_name = cfg.id_column

    def finish_if_done(index: int) -> None:
        st = states[index]
        if st.all_sent and st.pending == 0:
            starts = sorted(st.ids)
            file_stats = write_output(
                output_path(out, st.file),
                id_name,
                st.file.id_type,
                [st.ids[s] for s in starts],
                [st.results[s] for s in starts],
                st.stats,
            )
            del states[index]
            on_written(st.file, file_stats)

    def fill() -> None:
        nonlocal exhausted
        while not exhausted:
            actor = min(actors, key=lambda a: load[id(a)])
            if load[id(actor)] >= IN_FLIGHT:
                return
            try:
                index, chunk = next(source)
            except StopIteration:
                exhausted = True
                return
            st = states[index]
            if chunk is None:
                st.all_sent = True
                finish_if_done(index)  # an empty file, or one whose chunks are all back
                continue
            st.ids[chunk.start] = chunk.ids
            st.pending += 1
            ref = actor.run.remote(chunk.prompts, chunk.keys)
            inflight[ref] = (actor, index, chunk.start)
            load[id(actor)] += 1

    fill()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        actor, index, start = inflight.pop(ref)
        load[id(actor)] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"a generate worker died ({_first_line(exc)}); the files already written to {storage.display(out)} are complete: "
                "rerun the same command to resume"
            ) from exc
        st = states[index]
        st.results[start] = result["columns"]
        st.stats = st.stats.add(ChunkStats(**result["stats"]))
        st.pending -= 1
        on_rows(len(result["columns"]["finish_reason"]))
        finish_if_done(index)
        fill()


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def per_position_acceptance(hist: list[int]) -> list[float | None]:
    """hist[j] = steps that accepted exactly j drafts → for each draft position i (1..gamma), the fraction of
    steps that reached position i (accepted the i-1 drafts before it) and accepted draft i too."""
    out = []
    for i in range(1, len(hist)):
        reached = sum(hist[i - 1 :])
        out.append(sum(hist[i:]) / reached if reached else None)
    return out


def summarize(file_stats: list[dict], settings: dict, run: dict) -> dict:
    total = {}
    for s in file_stats:
        for k, v in s.items():
            if isinstance(v, list):  # accepted_hist, spec_accepted_per_position
                total[k] = [a + b for a, b in zip(_pad(total.get(k, []), v), _pad(v, total.get(k, [])))]
            else:
                total[k] = total.get(k, 0) + v
    get = total.get
    hist = get("accepted_hist", [])
    tokens = get("generated_tokens", 0)
    run_tokens = run.pop("generated_tokens_this_run")
    wall = run["wall_seconds"]
    return {
        "rows": get("rows", 0),
        "errored_rows": get("errored_rows", 0),
        "generated_tokens": tokens,
        "draft_proposed": get("draft_proposed", 0),
        "draft_accepted": get("draft_accepted", 0),
        "acceptance_rate": get("draft_accepted", 0) / get("draft_proposed") if get("draft_proposed") else None,
        "target_passes": get("target_passes_rows", 0),
        "tokens_per_target_pass": tokens / get("target_passes_rows") if get("target_passes_rows") else None,
        "mean_acceptance_length": 1 + sum(j * n for j, n in enumerate(hist)) / sum(hist) if sum(hist) else None,
        "accepted_length_histogram": hist,
        "per_position_acceptance": per_position_acceptance(hist),
        "drafter_step_ms": 1000 * get("drafter_seconds", 0) / get("drafter_forwards") if get("drafter_forwards") else None,
        "target_pass_ms": 1000 * get("target_seconds", 0) / get("target_passes") if get("target_passes") else None,
        "engine_seconds": get("engine_seconds", 0.0),
        "tokens_per_engine_second": tokens / get("engine_seconds") if get("engine_seconds") else None,
        "tokens_per_second": run_tokens / wall if run_tokens and wall > 0 else None,
        "wall_seconds": wall,
        "files": run["files"],
        "files_generated": run["files_generated"],
        "files_resumed": run["files_resumed"],
        **({"vllm_spec_decode": _vllm_spec_summary(total)} if settings.get("engine") == "vllm" else {}),
        "settings": settings,
        "run": run,
    }


def _vllm_spec_summary(total: dict) -> dict:
    """vLLM's own speculative metrics over the run (its vllm:spec_decode_* counters)."""
    drafts, accepted = total.get("spec_drafts", 0), total.get("spec_accepted_tokens", 0)
    per = total.get("spec_accepted_per_position", [])
    return {
        "num_drafts": drafts,
        "num_draft_tokens": total.get("spec_draft_tokens", 0),
        "num_accepted_tokens": accepted,
        "accepted_per_position": per,
        "acceptance_rate_per_position": [n / drafts for n in per] if drafts else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run_generate(cfg: GenerateConfig) -> dict:
    """Generate completions for every row of ``cfg.prompts`` into ``cfg.out``; returns the summary."""
    from vocabtrim.ray_utils import init_ray
    from vocabtrim.sampling import SamplingParams

    wall = time.perf_counter()
    check_config(cfg)
    SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)  # validates the flags
    files = inspect_prompt_files(list(cfg.prompts), cfg.prompt_column, cfg.id_column)
    fingerprint = check_models(cfg, files)
    out = os.fspath(cfg.out)
    settings = settings_of(cfg, fingerprint)
    prepare_out(out, settings)
    remove_stale_temporaries(out)
    todo = [f for f in files if not is_complete(out, f)]

    written: list[dict] = []
    if todo:
        init_ray(cfg.address)
        actors = start_workers(cfg)
        bar = _progress(sum(f.num_rows for f in todo), cfg.progress)
        try:
            run_pool(actors, todo, cfg, out, bar.update, lambda file, stats: written.append(stats))
        finally:
            bar.close()
            stop_workers(actors)

    run = {
        "files": len(files),
        "files_generated": len(todo),
        "files_resumed": len(files) - len(todo),
        "generated_tokens_this_run": sum(s["generated_tokens"] for s in written),
        "wall_seconds": time.perf_counter() - wall,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "gpus_per_worker": cfg.gpus_per_worker,
        "prompts": [storage.display(f.path) for f in files],
        "head": storage.display(cfg.head) if cfg.head else None,
        "engine": cfg.engine,
    }
    summary = summarize([read_file_stats(output_path(out, f)) for f in files], settings, run)
    _write_json(storage.join(out, SUMMARY_FILE), summary)
    return summary


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="generate", file=sys.stderr, dynamic_ncols=True)
