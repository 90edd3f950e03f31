"""The Ray side of ``vocabtrim generate``: an actor pool over prompt files, resumable, one output per input.

How a run goes:
1. Checks before any heavy work: flags, the target/drafter tokenizers, ``--chat-template`` against the
   tokenizer and the prompt columns, every input file (Parquet, prompt column), ``--drafter-layers`` and the
   head's manifest against the drafter's config, the ids of the files not yet generated; only then ``--out``
   (its ``settings.json`` must match this run's settings once it holds an output).
2. Input files whose output is already complete are skipped, and so are the rows of the others that an earlier
   run saved as parts (resume).
3. ``--workers`` actors each load the target, drafter and head once. The driver streams each remaining
   file in chunks of rows and keeps at most ``IN_FLIGHT`` chunks queued per actor. An actor turns
   rows into token ids (bad rows become error rows), streams them through one ``vocabtrim.engine.Engine``
   (continuous batching: up to ``--batch-size`` rows in flight, a finished row's slot refilled at once; the
   worker runs the rows of the chunks it holds in one run, ``vocabtrim.chunk_stream``; vLLM's the same, its
   rows added to vLLM's engine as they come)
   and returns the results.
4. The driver saves the rows that are back as parts of their file (``DIR/.parts/<name>/``) every
   ``PART_ROWS`` rows or ``PART_SECONDS`` seconds and when the run stops. When all of a file's rows are back,
   one of its ``WRITERS`` threads writes ``DIR/<name>`` atomically from them while the pool runs on (locally a
   temporary name, then rename; on an object store one upload of the finished file), with the file's engine
   statistics in the Parquet footer, and deletes the parts (``vocabtrim.generate_outputs``). A killed run leaves
   only complete outputs and parts behind, so a rerun generates every row it lacks exactly once.
5. ``DIR/summary.json`` sums the outputs of all input files (generated now or by an earlier run).

``--prompts``, ``--out`` and ``--head`` are locations (``vocabtrim.storage``): local paths or object-store URIs.
Only ``vocabtrim.storage`` touches them; messages show them without their query (``storage.display``).

Rows are independent of their batch-mates and of the worker that runs them: each row's seed is
``row_seed(--seed, row key)`` (``vocabtrim.prompts``), and the engine's noise is a function of that seed
and the position only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from vocabtrim import storage, validate
from vocabtrim.chat import TEMPLATE_KEY, as_user_message, check_message_lists, template_sha256, wraps_strings
from vocabtrim.corpus import is_messages_type, message_extra_fields
from vocabtrim.errors import RunFailed, UserError, first_line
from vocabtrim.faults import injected_fault
from vocabtrim.head.files import HEAD_FILE
from vocabtrim.generate_outputs import (
    PART_ROWS,
    PART_SECONDS,
    RESULT_COLUMNS,
    ChunkStats,
    Part,
    add_lists,
    add_stats,
    find_parts,
    finished,
    output_path,
    output_schema,
    remove_parts,
    result_table,
    save_part,
    write_output,
)
from vocabtrim.prompts import (
    PromptChunk,
    PromptFile,
    check_ids,
    check_room,
    encode_prompt,
    inspect_prompt_files,
    max_prompt_tokens,
    read_chunks,
)
from vocabtrim.special_tokens import eos_ids, of_model

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
IN_FLIGHT = 2  # chunks out on each actor at once (their rows share its engine run: ``chunk_stream``)
WRITERS = 8  # outputs the driver writes at once, beside the pool


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
    chat_template: str = "auto"  # vocabtrim.chat: how string prompts are fed
    id_column: str = "id"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    gamma: int | str = "auto"  # "auto" (0..max_gamma, chosen each step) or a fixed number
    max_gamma: int = 6
    sampler: str = "gumbel"
    compile: bool = False
    batch_size: int = 8
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    address: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    rows_per_task: int | None = None  # rows sent to an actor at a time (default: 4 batches)
    part_rows: int = PART_ROWS  # rows of a file held on the driver before they are saved as a part
    part_seconds: float = PART_SECONDS  # a file's rows held this long are saved as a part as the next chunk comes back
    fault_injection: str | None = None  # tests only: faults.injected_fault; "oom-above:<n>": the engine runs out of memory above n rows
    engine: str = "native"  # native | vllm (vocabtrim.vllm_backend)


# ---------------------------------------------------------------------------------------------
# Checks and settings (driver, before Ray)
# ---------------------------------------------------------------------------------------------


def check_config(cfg: GenerateConfig) -> None:
    """Refuse flag combinations that can never work, in one line."""
    from vocabtrim.engine.scheduler import SAMPLERS
    from vocabtrim.models import check_runs_alone
    from vocabtrim.vllm_backend import check_generate_config  # --engine (imports no vLLM)

    check_generate_config(cfg)
    validate.pool(cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
    validate.sampling(cfg.temperature, cfg.top_p, cfg.top_k)
    validate.one_of("sampler", cfg.sampler, SAMPLERS)
    validate.at_least("max_new_tokens", cfg.max_new_tokens, 1)
    validate.at_least("batch_size", cfg.batch_size, 1)
    validate.drafter_layers(cfg.drafter_layers)
    check_runs_alone("target", cfg.target)
    validate.gamma(cfg.gamma)  # with --no-draft too: gamma sets the room a prompt has
    validate.max_gamma(cfg.max_gamma)
    if cfg.no_draft:
        if cfg.head:
            raise UserError("--head needs a drafter: drop --no-draft or --head")
    else:
        if cfg.drafter is None and cfg.drafter_layers is None:
            raise UserError("no drafter: pass --drafter MODEL, --drafter-layers N (drafter = first N target layers), or --no-draft")
    if cfg.head and not storage.is_file(storage.join(cfg.head, HEAD_FILE)):
        if storage.is_file(storage.join(cfg.head, "config.json")):  # build-head's output for an EAGLE-3 drafter
            raise UserError(f"--head {storage.display(cfg.head)} is a model folder (a re-trimmed EAGLE-3 drafter, say), not a trimmed "
                            "head: pass it as --drafter and drop --head")
        raise UserError(f"--head {storage.display(cfg.head)} holds no {HEAD_FILE}: pass a folder written by `vocabtrim build-head`")
    if not cfg.prompt_column:
        raise UserError("--prompt-column must not be empty")
    folder = storage.input_folder_holding(os.fspath(cfg.out), cfg.prompts)
    if folder is not None:
        raise UserError(f"--out {storage.display(cfg.out)} is inside the prompts folder {storage.display(folder)}: a rerun would "
                        "read its outputs as prompts; use an --out outside it")
    if cfg.id_column in RESULT_COLUMNS:
        raise UserError(f"--id-column {cfg.id_column!r} clashes with an output column: pick another name")


def _drafter_name(cfg: GenerateConfig) -> str | None:
    if cfg.no_draft:
        return None
    return cfg.drafter if cfg.drafter is not None else cfg.target


def check_models(cfg: GenerateConfig, files: list[PromptFile]) -> tuple[str, bool, str | None]:
    """Load the tokenizers (not the models), refuse a mismatched pair, and apply ``--chat-template``
    (``vocabtrim.chat``): refuse message-list prompts when the tokenizer has no chat template or the mode is
    ``never``. Returns the tokenizer fingerprint, whether string prompts are wrapped as user messages, and the
    hash of the chat template prompts go through (None under ``never`` or without one)."""
    from vocabtrim.models import (check_declared_widths, check_eagle3_drafter, check_pair, check_weights, is_eagle3,
                                  load_tokenizer, tokenizer_fingerprint)

    target_tok = load_tokenizer(cfg.target, cfg.trust_remote_code)
    check_weights(cfg.target)
    drafter = _drafter_name(cfg)
    if drafter is not None and drafter != cfg.target and not (cfg.engine == "vllm" and drafter == "ngram"):  # ngram: no model
        if is_eagle3(drafter):  # usually no tokenizer: its t2d is checked against the target's vocabulary
            check_eagle3_drafter(drafter, cfg.target, target_tokenizer=target_tok, trust_remote_code=cfg.trust_remote_code)
        else:
            check_pair(target_tok, load_tokenizer(drafter, cfg.trust_remote_code))
            check_declared_widths(cfg.target, drafter, cfg.trust_remote_code)
            check_weights(drafter)
    if cfg.engine == "native":  # vLLM's max_model_len may differ (rope scaling): its workers check with it
        check_room(cfg.target, cfg.max_new_tokens, validate.gamma(cfg.gamma), cfg.max_gamma, cfg.trust_remote_code)
    wrap = wraps_strings(cfg.chat_template, target_tok, cfg.target)
    for f in files:
        if is_messages_type(f.prompt_type):
            check_message_lists(cfg.chat_template, target_tok, cfg.target,
                                f"{storage.display(f.path)} holds message lists in {cfg.prompt_column!r}")
    return tokenizer_fingerprint(target_tok), wrap, template_sha256(target_tok, cfg.chat_template)


def check_drafter(cfg: GenerateConfig, fingerprint: str) -> str | None:
    """Refuse, before ``--out`` is touched or Ray starts, ``--head`` or ``--drafter-layers`` with an EAGLE-3
    drafter, a ``--drafter-layers`` the drafter does not have, a ``--head`` file that is not a readable trimmed
    head, and a ``--head`` whose manifest does not fit the drafter: another tokenizer, or another vocabulary size
    or architecture (``--drafter-layers`` included) than the drafter's config says. The drafter's config is read
    here, not its weights: the workers compare the head's rows with the drafter's loaded LM head. A drafter whose
    config cannot be read here (a hub id offline) is left to them. Returns the head file's sha256 (None without
    ``--head``): the file is read once here."""
    if cfg.no_draft or (not cfg.head and cfg.drafter_layers is None):
        return None
    from vocabtrim.models import EAGLE3_NO_HEAD, EAGLE3_NO_LAYERS, is_eagle3

    if is_eagle3(_drafter_name(cfg)):  # either engine
        raise UserError(EAGLE3_NO_HEAD if cfg.head else EAGLE3_NO_LAYERS)
    config = _drafter_config(cfg)
    if not cfg.head:
        return None
    from vocabtrim.head.io import ARCHITECTURE_KEYS, load_head, read_head_file, read_head_manifest

    shown = storage.display(cfg.head)
    manifest = read_head_manifest(cfg.head)
    rebuild = "rebuild it with `vocabtrim build-head` for this drafter"
    if manifest.get("tokenizer_fingerprint") != fingerprint:
        raise UserError(f"head {shown} was built for another tokenizer ({manifest.get('tokenizer_fingerprint')}, this one is {fingerprint}): {rebuild}")
    data = read_head_file(cfg.head)
    load_head(cfg.head, data=data)  # checked (shapes, K, ids); the workers compare its rows with the drafter's
    built_for = manifest.get("drafter_architecture") or {}
    for key in ARCHITECTURE_KEYS if config is not None else ():
        this = config.get(key)
        if key in built_for and this is not None and built_for[key] != this:
            flag = " (--drafter-layers)" if key == "num_hidden_layers" else ""
            raise UserError(f"head {shown} was built for another drafter ({key}{flag} {built_for[key]}, this drafter {this}): {rebuild}")
    return hashlib.sha256(data).hexdigest()


def _drafter_config(cfg: GenerateConfig) -> dict | None:
    """The drafter's architecture as its config.json gives it (``--drafter-layers`` applied), or None if unreadable."""
    from vocabtrim.head.io import ARCHITECTURE_KEYS
    from vocabtrim.models import declared_config

    text = declared_config(_drafter_name(cfg), cfg.trust_remote_code)
    if text is None:  # e.g. a hub id with no network: the workers check the loaded drafter
        return None
    found = {k: getattr(text, k, None) for k in ARCHITECTURE_KEYS}
    layers = found["num_hidden_layers"]
    if cfg.drafter_layers is not None:
        validate.drafter_layers(cfg.drafter_layers, layers)
        found["num_hidden_layers"] = cfg.drafter_layers
    return {k: v for k, v in found.items() if v is not None}


def settings_of(cfg: GenerateConfig, fingerprint: str, head_sha256: str | None = None,
                chat_template_sha256: str | None = None, message_fields: list[str] | None = None) -> dict:
    """What decides a row's completion (``head_sha256``: ``check_drafter``'s; ``chat_template_sha256``:
    ``check_models``'s; ``message_fields``: the prompt files' message fields beside role and content, which go to
    the chat template). A rerun into the same ``--out`` must match it exactly (``LATER_SETTINGS`` where recorded).

    ``--batch-size`` and ``--workers`` are not settings: rows do not depend on them.
    """
    draft = not cfg.no_draft
    gamma = validate.gamma(cfg.gamma)
    room = cfg.max_gamma if gamma is None else gamma  # the draft positions a verify pass may write past the last token
    # --engine vllm is recorded; native runs record no engine, so outputs written before --engine existed resume.
    engine = {"engine": cfg.engine} if cfg.engine != "native" else {}
    return {
        **engine,
        "target": storage.settings_key(cfg.target),
        "drafter": storage.settings_key(_drafter_name(cfg)),
        "drafter_layers": cfg.drafter_layers if draft else None,
        "head_sha256": head_sha256,
        "no_draft": cfg.no_draft,
        "gamma": ("auto" if gamma is None else gamma) if draft else None,
        "max_gamma": cfg.max_gamma if draft and gamma is None else None,
        "sampler": cfg.sampler,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "top_k": int(cfg.top_k),
        "seed": int(cfg.seed),
        "prompt_column": cfg.prompt_column,
        "chat_template": cfg.chat_template,
        "id_column": cfg.id_column,
        "dtype": cfg.dtype,
        "tokenizer": fingerprint,
        # The template prompts are rendered with (the tokenizer's fingerprint leaves it out); none where none is used,
        # as settings written before it was recorded.
        **({TEMPLATE_KEY: chat_template_sha256} if chat_template_sha256 else {}),
        # Recorded where messages have such fields: outputs written before they went to the template (none recorded)
        # are then refused, not mixed with the new rendering.
        **({"message_fields": sorted(message_fields)} if message_fields else {}),
        # --no-draft: gamma still sets the room a prompt has (prompts.max_prompt_tokens: max_gamma + 1 or gamma + 1
        # positions), so which rows are error rows; recorded where it is not the defaults' (as settings written
        # before it was recorded).
        **({"prompt_room_gamma": room} if not draft and room != GenerateConfig.max_gamma else {}),
        # Another device gives other floats (and --dtype auto another dtype). No key on the CPU, as settings written
        # before it was recorded.
        **({"device": "cuda"} if cfg.gpus_per_worker > 0 else {}),
        # The rejection sampler's uniforms at temperature > 0 (sampling.noise_uniform): version 2 fills their 53 bits
        # from two keys. Outputs of version 1 (no key) do not resume under it; greedy and Gumbel outputs are the same.
        **({"uniforms": 2} if cfg.sampler == "rejection" and cfg.temperature > 0 and cfg.engine == "native" else {}),
    }


def _write_json(where: str, data: dict) -> None:
    storage.atomic_write(where, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _holds_outputs(out: str, names: list[str]) -> bool:
    """Whether ``out`` holds rows made under its recorded settings: a finished output, one of ``names`` (this
    run's output names, whatever their extension), or any Parquet file under its final name, which includes the
    parts of a file under way (``DIR/.parts/<name>/<rows>.parquet``)."""
    found = {storage.relative(p, out) for p in storage.walk_files(out)}
    return any(n in found for n in names) or any(
        storage.name(p).endswith(".parquet") and not storage.name(p).startswith(".") for p in found)


# Settings that outputs written by an earlier vocabtrim did not record: compared only where recorded.
LATER_SETTINGS = (TEMPLATE_KEY,)


def prepare_out(out: str, settings: dict, files: list[PromptFile]) -> None:
    """Create ``--out`` and record the settings, or check them against the recorded ones
    (``storage.claim``). Recorded settings bind the folder only once it holds rows made under them (a finished
    output or a part of one, ``_holds_outputs``): a folder whose earlier run was refused or stopped before any row
    was saved takes the new settings. Killed runs'
    partial files beside the outputs are removed (``storage.remove_temporaries``)."""
    names = [f.name for f in files]
    storage.claim(out, SETTINGS_FILE, settings, what="outputs", binds=lambda: _holds_outputs(out, names),
                  stray=lambda name: name.endswith(".parquet") or name == "manifest.json",  # another command's output
                  later=LATER_SETTINGS)
    storage.remove_temporaries_below(out, {storage.parent(output_path(out, f)) for f in files if "/" in f.name})  # claim did out


# ---------------------------------------------------------------------------------------------
# One chunk of rows on a worker (pure apart from the engine)
# ---------------------------------------------------------------------------------------------


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generate_chunk(engine, tokenizer, prompts: list, keys: list[str], *, seed: int, max_prompt_tokens: int,
                   batch_size: int | None = None, stream=None, encode_lock=None) -> dict:
    """Generate for one chunk of rows; returns the result columns (``RESULT_COLUMNS``) and ``stats``.

    Rows are encoded (what is wrong with a row itself makes it an error row: ``encode_prompt``), sorted
    by prompt length so that rows admitted together pad little, streamed through the engine (continuous
    batching, ``batch_size`` rows in flight) and returned in input order. An engine failure is not a
    row's fault and is raised: out of memory first retries the chunk with half the rows in flight
    (completions do not depend on the batch), anything else goes to the pool, which retries the chunk on
    a fresh worker. With ``stream`` (a ``chunk_stream.ChunkStream`` over ``engine``) the rows join the run the
    worker's other chunks are in, which does the same on its own. ``encode_lock``: held while the tokenizer
    encodes and decodes (chunks generated from several threads share it).
    """
    from vocabtrim.engine.sampling import row_seed

    n = len(prompts)
    cols = {c: [None] * n for c in RESULT_COLUMNS}
    stats = ChunkStats(accepted_hist=[0] * (engine.gamma + 1), reached_hist=[0] * engine.gamma, gamma_hist=[0] * (engine.gamma + 1))
    encoded = {}
    with encode_lock or nullcontext():
        for i, value in enumerate(prompts):
            ids, problem = encode_prompt(value, tokenizer, max_prompt_tokens)
            if problem:
                _set_error(cols, i, problem)
            else:
                encoded[i] = ids
    rows = sorted(encoded, key=lambda i: (len(encoded[i]), i))
    ids, seeds = [encoded[i] for i in rows], [row_seed(seed, keys[i]) for i in rows]
    if stream is not None:
        outs, spent = stream.generate(ids, seeds)
        if spent is not None:
            _add_engine_stats(stats, spent, stream.batch_size)
    else:
        outs = _run_halving(engine, ids, seeds, stats, batch_size)
    with encode_lock or nullcontext():
        completions = [tokenizer.decode(out.token_ids, skip_special_tokens=True) for out in outs]
    if rows:
        for i, out, completion in zip(rows, outs, completions):
            cols["completion"][i] = completion
            cols["completion_tokens"][i] = len(out.token_ids)
            cols["draft_proposed"][i] = out.proposed
            cols["draft_accepted"][i] = out.accepted
            cols["finish_reason"][i] = out.finish_reason
            stats.target_passes_rows += out.target_passes
            stats.accepted_hist = add_lists(stats.accepted_hist, out.accepted_hist)
            stats.reached_hist = add_lists(stats.reached_hist, out.reached_hist)
    return {"columns": cols, "stats": asdict(stats)}


def _set_error(cols: dict, i: int, message: str) -> None:
    cols["completion_tokens"][i] = 0
    cols["draft_proposed"][i] = 0
    cols["draft_accepted"][i] = 0
    cols["finish_reason"][i] = "error"
    cols["error"][i] = message


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_halving(engine, prompts, seeds, stats: ChunkStats, batch_size: int | None = None):
    """``_run_engine``, again with half the rows in flight each time the engine runs out of memory."""
    batch = configured = batch_size or getattr(getattr(engine, "config", None), "batch_size", None) or max(1, len(prompts))
    while True:
        try:
            return _run_engine(engine, prompts, seeds, stats, batch, configured)
        except Exception as exc:
            if not _is_out_of_memory(exc) or batch == 1:
                raise
            log.warning("out of memory with %d rows in flight; retrying the chunk with %d", batch, batch // 2)
            batch //= 2
            _release_memory()


def _run_engine(engine, prompts, seeds, stats: ChunkStats, batch_size: int | None = None, configured: int | None = None):
    """Run the engine on one chunk and add its statistics to ``stats``; occupancy counts against the
    ``configured`` rows in flight (--batch-size), also when out of memory made the engine run fewer."""
    outs = engine.generate(prompts, seeds, batch_size=batch_size)
    _add_engine_stats(stats, engine.last_stats, configured)
    return outs


def _add_engine_stats(stats: ChunkStats, s, configured: int | None = None) -> None:
    """Add an engine's statistics (``EngineStats``, or the vLLM engine's) to ``stats``; occupancy counts
    against the ``configured`` rows in flight."""
    stats.drafter_seconds += s.drafter_seconds
    stats.drafter_forwards += s.drafter_forwards
    stats.target_seconds += s.target_seconds
    stats.target_passes += s.target_passes
    stats.prefill_seconds += s.prefill_seconds
    stats.engine_seconds += s.wall_seconds
    stats.target_rows_stepped += s.rows_stepped
    stats.slot_passes += s.target_passes * (configured or s.batch_size)
    stats.gamma_hist = add_lists(stats.gamma_hist, s.gamma_hist)
    if hasattr(s, "spec_drafts"):  # --engine vllm
        stats.spec_drafts += s.spec_drafts
        stats.spec_draft_tokens += s.spec_draft_tokens
        stats.spec_accepted_tokens += s.spec_accepted_tokens
        stats.spec_accepted_per_position = add_lists(stats.spec_accepted_per_position, s.spec_accepted_per_position)


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

        self.threads = max(1, min(threads, os.cpu_count() or 1))
        torch.set_num_threads(self.threads)
        hf_logging.disable_progress_bar()  # one progress bar (the driver's), not one per weight load
        self.cfg = GenerateConfig(**cfg)
        self.stream = None  # the ChunkStream its chunks share
        self.encode_lock = threading.Lock()  # a tokenizer used from one thread at a time
        self.error: UserError | None = None  # kept whole: a SettingError names its flag on the driver
        try:
            self._load()
        except UserError as exc:
            self.error = exc.with_traceback(None)  # not the frames of a half-loaded engine

    def _load(self) -> None:
        if self.cfg.engine == "vllm":
            from vocabtrim.vllm_backend import load_for_generate

            self.engine, self.tokenizer, self.max_prompt_tokens = load_for_generate(self.cfg)
            self._stream(self.engine)
            return
        from vocabtrim.engine import make_engine
        from vocabtrim.engine.sampling import SamplingParams
        from vocabtrim.models import load_pair

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
            from vocabtrim.head.io import load_head

            head = load_head(c.head, drafter_model=pair.drafter, tokenizer=pair.tokenizer)
        tok = pair.tokenizer
        self.engine = make_engine(
            pair.target,
            pair.drafter,
            head,
            sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k),
            sampler=c.sampler,
            gamma=validate.gamma(c.gamma),
            max_gamma=c.max_gamma,
            batch_size=c.batch_size,
            eos_token_ids=tuple(eos_ids(tok, of_model(pair.target))),
            max_new_tokens=c.max_new_tokens,
            compile=c.compile,
        )
        self.tokenizer = tok
        self.max_prompt_tokens = max_prompt_tokens(self.engine.context_length or (1 << 62), c.max_new_tokens,
                                                   validate.gamma(c.gamma), c.max_gamma)
        self._stream(self.engine)

    def _stream(self, engine) -> None:
        """The run this worker's chunks share (``chunk_stream``)."""
        from vocabtrim.chunk_stream import ChunkStream

        c = self.cfg
        if (c.fault_injection or "").startswith("oom-above:"):
            engine = _OutOfMemoryAbove(engine, int(c.fault_injection.split(":")[1]))
        self.stream = ChunkStream(engine, c.batch_size, self.threads, _is_out_of_memory, _release_memory)

    def info(self) -> dict:
        return {"error": self.error}

    def pid(self) -> int:
        """This worker's process id, once started; the UserError it met starting, if any (``ray_utils.ActorPool``)."""
        if self.error:
            raise self.error
        return os.getpid()

    def close(self) -> None:
        """Close the engine before the pool kills this actor (``ray_utils.close_engine``)."""
        from vocabtrim.ray_utils import close_engine

        if self.stream is not None:
            self.stream.close()
        close_engine(getattr(self, "engine", None))

    def run(self, prompts: list, keys: list[str]) -> dict:
        """One chunk's results. A worker runs ``IN_FLIGHT`` of these at once (a threaded actor), their rows in one
        engine run (``chunk_stream``)."""
        if self.error:
            raise self.error
        injected_fault(self.cfg.fault_injection)
        return generate_chunk(
            self.engine,
            self.tokenizer,
            prompts,
            keys,
            seed=self.cfg.seed,
            max_prompt_tokens=self.max_prompt_tokens,
            stream=self.stream,
            encode_lock=self.encode_lock,
        )


class _OutOfMemoryAbove:
    """Tests only: the engine, running out of memory whenever more than ``limit`` rows are in flight."""

    def __init__(self, engine, limit: int):
        self.engine, self.limit = engine, limit

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def open(self, max_new_tokens=None, batch_size=None):
        return _OutOfMemoryAboveRun(self.engine.open(max_new_tokens, batch_size), self.limit)

    def generate(self, prompts, seeds, max_new_tokens=None, batch_size=None):
        import torch

        if min(len(prompts), batch_size or self.engine.config.batch_size) > self.limit:
            raise torch.OutOfMemoryError("injected: out of memory")
        return self.engine.generate(prompts, seeds, max_new_tokens, batch_size)


class _OutOfMemoryAboveRun:
    """Tests only: an open run (``Engine.open``) of ``_OutOfMemoryAbove``."""

    def __init__(self, run, limit: int):
        self.run, self.limit = run, limit

    def __getattr__(self, name):
        return getattr(self.run, name)

    def advance(self):
        import torch

        if min(self.run.slots, self.run.n + len(self.run.waiting)) > self.limit:
            raise torch.OutOfMemoryError("injected: out of memory")
        return self.run.advance()


def start_workers(cfg: GenerateConfig):
    """The actor pool (``ray_utils.ActorPool``), once every actor has loaded its models."""
    import ray

    from vocabtrim.ray_utils import ActorPool, check_resources, default_cpus_per_worker, wait_ready

    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else default_cpus_per_worker(cfg.workers)
    check_resources(cfg.workers, cfg.gpus_per_worker, cpus)
    # One torch thread per CPU the actor holds: more threads than reserved CPUs collapse under contention
    # (measured: 2 threads on a busy 2-core machine decode 20x slower than 1). --cpus-per-worker 2 gives 2.
    threads = max(1, int(cpus))
    # Restarts are the pool's (a fresh actor, the failed chunk submitted again), not Ray's.
    # A worker takes its IN_FLIGHT chunks at once (their rows share its engine run), and answers pid/close beside them.
    actor_cls = ray.remote(GenerateWorker).options(num_cpus=cpus, num_gpus=cfg.gpus_per_worker, max_restarts=0,
                                                   max_concurrency=IN_FLIGHT + 2)
    spec = {k: v for k, v in asdict(cfg).items()}
    pool = ActorPool(
        lambda: actor_cls.remote(spec, threads),
        lambda actor, item: actor.run.remote(item[1].prompts, item[1].keys),
        cfg.workers,
        depth=IN_FLIGHT,
    )
    try:
        infos = wait_ready([a.info.remote() for a in pool.actors], f"{cfg.workers} generate workers",
                           shape=(cpus, cfg.gpus_per_worker))
    except BaseException:
        pool.shutdown()
        raise
    errors = [i["error"] for i in infos if i["error"]]
    if errors:
        pool.shutdown()
        raise errors[0]
    return pool


# ---------------------------------------------------------------------------------------------
# Driver: schedule chunks, save parts, write each file atomically
# ---------------------------------------------------------------------------------------------


@dataclass
class _FileState:
    file: PromptFile
    parts: list[Part] = field(default_factory=list)  # rows saved, by this run or an earlier one
    sent: dict = field(default_factory=dict)  # chunk start -> Arrow id array, for chunks out on workers
    held: dict = field(default_factory=dict)  # chunk start -> (ids, columns, ChunkStats): back, not saved yet
    held_rows: int = 0
    saved_at: float | None = None  # when rows were last saved, or its first chunk sent
    pending: int = 0
    all_sent: bool = False
    writing: object = None  # the Future of its output's write, once all its rows are back


def _write_file(out: str, st: _FileState, id_name: str, segments: list, remove: bool) -> dict:
    """Write a file's output from ``segments`` (``write_output``), then delete its parts where ``remove``; its
    statistics. Runs on the driver's writer threads: nothing here touches the run's shared state."""
    file_stats = write_output(out, st.file, id_name, segments)
    if remove:
        remove_parts(out, st.file.name)
    return file_stats


def _held_runs(st: _FileState, schema: pa.Schema) -> list[tuple[int, pa.Table, ChunkStats]]:
    """The chunks ``st`` holds as ``(start, table, stats)``, one per run of consecutive chunks, in row order."""
    runs: list[list] = []
    for start in sorted(st.held):
        ids, columns, stats = st.held[start]
        if runs and runs[-1][1] == start:
            runs[-1][1] += len(columns["finish_reason"])
            runs[-1][2].append(ids)
            runs[-1][3].append(columns)
            runs[-1][4] = runs[-1][4].add(stats)
        else:
            runs.append([start, start + len(columns["finish_reason"]), [ids], [columns], stats])
    return [(r[0], result_table(schema, r[2], r[3]), r[4]) for r in runs]


def _save_held(out: str, st: _FileState, id_name: str) -> None:
    """Save the chunks ``st`` holds as parts (one per run of consecutive chunks) and let them go."""
    for start, table, stats in _held_runs(st, output_schema(id_name, st.file.id_type)):
        st.parts.append(save_part(out, st.file, start, table, stats))
    st.held, st.held_rows, st.saved_at = {}, 0, time.monotonic()


def _chunk_source(files: list[PromptFile], cfg: GenerateConfig, rows_per_task: int, wrap_strings: bool = False,
                  saved: dict[str, list[Part]] | None = None):
    """Yield ``(file index, chunk)`` for the rows of ``files`` that no part in ``saved`` (output name -> parts)
    holds; ``(file index, None)`` once a file's chunks are all out.

    ``wrap_strings``: string prompts become one user message (``--chat-template``, decided on the driver)."""
    for index, file in enumerate(files):
        parts = (saved or {}).get(file.name, [])
        first = 0
        for p in parts:  # reading starts at the first row not saved
            if p.start > first:
                break
            first = p.stop
        if first < file.num_rows:
            for chunk in read_chunks(file, cfg.prompt_column, cfg.id_column, rows_per_task, start=first):
                for piece in _unsaved(chunk, parts):
                    if wrap_strings:
                        piece.prompts = [as_user_message(p) for p in piece.prompts]
                    yield index, piece
        yield index, None


def _unsaved(chunk: PromptChunk, parts: list[Part]):
    """The pieces of ``chunk`` that ``parts`` (sorted, disjoint) do not hold, as chunks."""
    start, stop = chunk.start, chunk.start + len(chunk.keys)
    for p in parts:
        if p.stop <= start or p.start >= stop:
            continue
        if p.start > start:
            yield chunk.rows(start, p.start)
        start = max(start, p.stop)
    if start < stop:
        yield chunk.rows(start, stop)


def run_pool(pool, files: list[PromptFile], cfg: GenerateConfig, out: str, on_rows, on_written=lambda file, stats: None,
             wrap_strings: bool = False, saved: dict[str, list[Part]] | None = None) -> None:
    """Feed every row of ``files`` that no part in ``saved`` holds to the actor ``pool`` (``IN_FLIGHT`` chunks per
    actor); write each file when all its rows are back: a file whose rows cannot all be generated is never
    written. Rows that are back are saved as parts (``generate_outputs``) once a file's reach ``cfg.part_rows``
    rows, or ``cfg.part_seconds`` after its last save (checked as any chunk comes back), and when the run stops
    early (Ctrl-C, SIGTERM, a chunk that failed every retry).

    Outputs are written by ``WRITERS`` threads while the pool runs on (on an object store each is an upload and a
    copy, which would otherwise leave the workers waiting on the driver), at most ``WRITERS`` at once; a failed
    write stops the run as it would have inline, its file's rows saved as parts. A stop saves the rows of the files
    not being written first, then kills the workers and lets the writes under way end.

    ``on_rows(n, tokens)`` is called as each chunk of n rows (tokens generated) comes back; ``on_written(file, stats)``
    after each output is written, with its statistics (on the driver's thread).
    ``wrap_strings``: string prompts go to the actors as one user message each.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    rows_per_task = cfg.rows_per_task or cfg.batch_size * 4
    states: dict[int, _FileState] = {}  # the files begun and not yet written
    writes: dict = {}  # Future -> file index: outputs being written
    writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="vocabtrim-write")
    id_name = cfg.id_column

    def finish_if_done(index: int) -> None:
        st = states[index]
        if st.all_sent and st.pending == 0 and st.writing is None:
            schema = output_schema(id_name, st.file.id_type)
            segments = sorted([*((p.start, p) for p in st.parts), *((s, (t, c)) for s, t, c in _held_runs(st, schema))],
                              key=lambda s: s[0])
            remove = bool(st.parts) or st.file.name in (saved or {})
            st.writing = writer.submit(_write_file, out, st, id_name, [s for _, s in segments], remove)
            writes[st.writing] = index
            written(block=len(writes) >= WRITERS)

    def written(block: bool = False) -> None:
        """Take the finished writes (waiting for one where ``block``); a failed one raises its error here."""
        done = [f for f in writes if f.done()]
        if not done and block:
            done = list(wait(writes, return_when=FIRST_COMPLETED).done)
        for f in sorted(done, key=writes.get):
            index = writes.pop(f)
            st = states[index]
            file_stats = f.result()  # a failure: raised with the file's rows still held
            del states[index]
            on_written(st.file, file_stats)

    def items():
        """(file index, chunk) for the pool; a file's end is marked as soon as its last chunk is out."""
        for index, chunk in _chunk_source(files, cfg, rows_per_task, wrap_strings, saved):
            if index not in states:
                states[index] = _FileState(file=files[index], parts=list((saved or {}).get(files[index].name, [])))
            st = states[index]
            if chunk is None:
                st.all_sent = True
                finish_if_done(index)  # an empty file, or one whose chunks are all back
                continue
            st.sent[chunk.start] = chunk.ids
            st.pending += 1
            if st.saved_at is None:
                st.saved_at = time.monotonic()
            yield index, chunk

    def on_result(item, result) -> None:
        index, chunk = item
        st = states[index]
        columns = result["columns"]
        st.held[chunk.start] = (st.sent.pop(chunk.start), columns, ChunkStats(**result["stats"]))
        st.held_rows += len(columns["finish_reason"])
        st.pending -= 1
        on_rows(len(columns["finish_reason"]), sum(t or 0 for t in columns["completion_tokens"]))
        finish_if_done(index)
        written()
        now = time.monotonic()
        for other in [s for s in states.values() if s.held and s.writing is None]:  # this file's, and any other's due
            if other.held_rows >= cfg.part_rows or now - other.saved_at >= cfg.part_seconds:
                _save_held(out, other, id_name)

    def describe(item) -> str:
        index, chunk = item
        return f"rows {chunk.start}..{chunk.start + len(chunk.keys) - 1} of {storage.display(files[index].path)}"

    try:
        pool.run(items(), on_result, describe)
        while writes:
            written(block=True)
    except BaseException:  # stopped early: keep the rows that are back
        def save(held: list[_FileState]) -> None:
            for st in held:
                try:
                    _save_held(out, st, id_name)
                except Exception as exc:  # the stop's own cause is what the user sees
                    log.warning("could not save the generated rows of %s (%s)", storage.display(st.file.path), first_line(exc))

        save([st for st in states.values() if st.held and st.writing is None])  # first: a pod's grace period is short
        if writes:
            pool.shutdown()  # the workers go now, not after the writes under way
            wait(writes)  # each ends whole or not at all
            for f, index in writes.items():
                if f.exception() is None:
                    states.pop(index)
        save([st for st in states.values() if st.held and st.writing is not None])  # the files whose write failed
        raise
    finally:
        writer.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def per_position_acceptance(hist: list[int], reached: list[int]) -> list[float | None]:
    """hist[j] = steps that accepted exactly j drafts, reached[i - 1] = steps that reached draft i (drafted it and
    accepted the i - 1 drafts before it) → for each draft position i (1..gamma), the share of the steps that
    reached it that accepted it (a step accepts draft i only when it reached it: those are sum(hist[i:]))."""
    return [sum(hist[i:]) / reached[i - 1] if i - 1 < len(reached) and reached[i - 1] else None for i in range(1, len(hist))]


def summarize(file_stats: list[dict], settings: dict, run: dict) -> dict:
    total = {}
    for s in file_stats:
        total = add_stats(total, s)
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
        # None where the engine reports neither its gamma per pass, its batches nor its passes' times (vLLM).
        "gamma_histogram": None if settings.get("engine") == "vllm" else get("gamma_hist", []),
        "batch_occupancy": get("target_rows_stepped", 0) / get("slot_passes") if get("target_rows_stepped") else None,
        # Outputs written before reached_hist was recorded leave it unknown: no share rather than a wrong one.
        "per_position_acceptance": per_position_acceptance(
            hist, get("reached_hist", []) if all("reached_hist" in s for s in file_stats) else []),
        "drafter_step_ms": 1000 * get("drafter_seconds", 0) / get("drafter_forwards") if get("drafter_forwards") else None,
        "target_pass_ms": 1000 * get("target_seconds", 0) / get("target_passes") if get("target_seconds") else None,
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
    """Generate completions for every row of ``cfg.prompts`` into ``cfg.out`` (held by ``lease``: one run at a
    time); returns the summary."""
    from vocabtrim.lease import lease

    with lease(os.fspath(cfg.out)):
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> dict:
    from vocabtrim.ray_utils import init_ray

    wall = time.perf_counter()
    check_config(cfg)
    files = inspect_prompt_files(list(cfg.prompts), cfg.prompt_column, cfg.id_column, ids=False)
    if sum(f.num_rows for f in files) == 0:
        raise UserError(f"the prompts are empty: no rows in {' '.join(storage.display(f.path) for f in files)}")
    fingerprint, wrap_strings, template = check_models(cfg, files)
    head_sha256 = check_drafter(cfg, fingerprint)
    out = os.fspath(cfg.out)
    extra = {name for f in files for name in message_extra_fields(f.prompt_type)}
    settings = settings_of(cfg, fingerprint, head_sha256, template, sorted(extra))
    stats = dict(zip((f.name for f in files), storage.each(lambda f: finished(out, f), files)))  # name -> stats or None
    todo = [f for f in files if stats[f.name] is None]
    check_ids(todo, cfg.id_column)  # a finished file's ids were checked when it was generated
    prepare_out(out, settings, files)
    saved = find_parts(out, files)
    for name in saved.keys() - {f.name for f in todo}:  # written by a run stopped before it deleted the file's parts
        remove_parts(out, name)
    saved_rows = sum(p.stop - p.start for f in todo for p in saved.get(f.name, []))

    generated_tokens = 0
    if todo:  # summary.json sums every file a run was given: one stopped now leaves none, not an earlier run's of fewer
        storage.delete(storage.join(out, SUMMARY_FILE))
        init_ray(cfg.address)
        pool = start_workers(cfg)
        bar = _progress(sum(f.num_rows for f in todo) - saved_rows, cfg.progress)

        def on_rows(rows: int, tokens: int) -> None:
            nonlocal generated_tokens
            generated_tokens += tokens
            bar.update(rows, tokens)

        try:
            run_pool(pool, todo, cfg, out, on_rows, lambda file, file_stats: stats.update({file.name: file_stats}),
                     wrap_strings, saved)
        except RunFailed as exc:
            raise RunFailed(f"{exc}; what is generated is saved in {storage.display(out)}: rerun the same command to resume") from exc
        finally:
            bar.close()
            pool.shutdown()

    run = {
        "files": len(files),
        "files_generated": len(todo),
        "files_resumed": len(files) - len(todo),
        "rows_resumed_in_files_under_way": saved_rows,
        "generated_tokens_this_run": generated_tokens,
        "wall_seconds": time.perf_counter() - wall,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "gpus_per_worker": cfg.gpus_per_worker,
        "prompts": [storage.display(f.path) for f in files],
        "string_prompts_wrapped": wrap_strings,
        "head": storage.display(cfg.head) if cfg.head else None,
        "engine": cfg.engine,
    }
    summary = summarize([stats[f.name] for f in files], settings, run)
    _write_json(storage.join(out, SUMMARY_FILE), summary)
    return summary


def _progress(total: int, enabled: bool):
    from vocabtrim.progress import Progress

    return Progress(total, "row", "generate", enabled=enabled)
