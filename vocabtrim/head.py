"""The trimmed drafter head: the drafter's LM-head rows for the kept token ids.

- ``select_ids``: which ids to keep (top-K, or the smallest K reaching a coverage), special tokens always in.
- ``build_head``: histogram + drafter → ``HEAD_DIR/head.safetensors``, ``manifest.json``, ``coverage.png``
  and the optional exports (``sglang``: a token map for SGLang's ``--speculative-token-map``;
  ``eagle``: the ``d2t``/``t2d`` tensors EAGLE-3 checkpoints hold).
- ``load_head``: read a head back, refusing one built for another drafter or tokenizer.

The histogram, the head folder and every file in it are locations (``vocabtrim.storage``): local paths or
object-store URIs (``s3://bucket/head``); each file is written whole (a temporary file renamed, or one upload).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vocabtrim import storage
from vocabtrim.engine.heads import check_support
from vocabtrim.errors import UserError
from vocabtrim.special_tokens import of_model, special_token_ids

HEAD_FILE = "head.safetensors"
MANIFEST_FILE = "manifest.json"
PLOT_FILE = "coverage.png"
SGLANG_FILE = "sglang_token_map.pt"
EAGLE_FILE = "eagle_d2t.safetensors"
SPECFORGE_FILE = "specforge_vocab_mapping.pt"
EXPORTS = ("sglang", "eagle", "specforge")
EAGLE3_MANIFEST_KIND = "vocabtrim-eagle3-head"
MANIFEST_KIND = "vocabtrim-head"


@dataclass
class TrimmedHead:
    """The LM head restricted to K kept ids.

    token_ids: int64 [K], sorted full-vocabulary ids.
    weight:    [K, hidden], the drafter's LM-head rows for those ids (a copy, never a view of the embedding).
    bias:      [K] or None.
    """

    token_ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[0])

    def to(self, device=None, dtype=None) -> "TrimmedHead":
        return TrimmedHead(
            token_ids=self.token_ids.to(device),
            weight=self.weight.to(device=device, dtype=dtype),
            bias=None if self.bias is None else self.bias.to(device=device, dtype=dtype),
        )


def head_from_ids(model, token_ids) -> TrimmedHead:
    """Copy the rows of ``model``'s LM head for ``token_ids`` (sorted, deduplicated)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).unique(sorted=True).cpu()
    head = model.get_output_embeddings()
    weight = head.weight.detach()[ids.to(head.weight.device)].clone()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach()[ids.to(bias.device)].clone()
    return TrimmedHead(token_ids=ids, weight=weight, bias=bias)


# ---------------------------------------------------------------------------------------------
# Choosing the kept ids
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The kept ids: ``token_ids`` int64 [K] ascending; ``k_frequent`` of them chosen by frequency,
    ``k_unseen`` never counted in the histogram (the top-K filler, smallest id first), the rest special
    tokens; ``coverage`` = share of the histogram's tokens on the kept ids; ``distinct_ids`` = ids the
    histogram counted at least once."""

    token_ids: np.ndarray
    k_frequent: int
    coverage: float
    special_ids: list[int] = field(default_factory=list)
    k_unseen: int = 0
    distinct_ids: int = 0

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[0])


def select_ids(
    counts: np.ndarray,
    *,
    top_k: int | None = None,
    coverage: float | None = None,
    special_ids=(),
    vocab_size: int,
) -> Selection:
    """Choose the kept ids from a histogram (int64 [≤ vocab_size]).

    top_k: exactly K ids in all: the special ids, then the most frequent others (ties: smaller id first;
           ids never seen fill up, smallest first, when the histogram has fewer than K non-zero ids).
    coverage: the smallest K whose most frequent ids cover ``coverage`` of the counted tokens,
              plus any special ids not among them.
    """
    from vocabtrim import histogram

    if (top_k is None) == (coverage is None):
        raise UserError("pass exactly one of --top-k K or --coverage C")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] > vocab_size:
        extra = int(np.flatnonzero(counts[vocab_size:])[0] + vocab_size) if counts[vocab_size:].any() else None
        if extra is not None:
            raise UserError(f"the histogram counts token id {extra}, outside the drafter's vocabulary of {vocab_size}")
        counts = counts[:vocab_size]
    counts = np.concatenate([counts, np.zeros(vocab_size - counts.shape[0], dtype=np.int64)])
    total = int(counts.sum())
    if total == 0:
        raise UserError("the histogram is empty (no tokens were counted): calibrate on a corpus with text")
    special = sorted({int(i) for i in special_ids if 0 <= int(i) < vocab_size})
    ranked = histogram.ranked_ids(counts)
    if top_k is not None:
        if top_k < 1 or top_k > vocab_size:
            raise UserError(f"--top-k must be between 1 and the drafter's vocabulary size {vocab_size}, got {top_k}")
        if top_k < len(special):
            raise UserError(f"--top-k {top_k} is smaller than the {len(special)} special tokens that are always kept")
        others = ranked[~np.isin(ranked, special)][: top_k - len(special)]
        k_frequent = int(np.count_nonzero(counts[others]))
        k_unseen = int(others.shape[0]) - k_frequent
        ids = np.union1d(others, np.asarray(special, dtype=np.int64))
    else:
        if not 0 < coverage <= 1:
            raise UserError(f"--coverage must be in (0, 1], got {coverage}")
        cumulative = np.cumsum(counts[ranked]) / total
        k_frequent = min(int(np.searchsorted(cumulative, coverage, side="left")) + 1, int(np.count_nonzero(counts)))
        k_unseen = 0
        ids = np.union1d(ranked[:k_frequent], np.asarray(special, dtype=np.int64))
    ids = ids.astype(np.int64)
    return Selection(ids, k_frequent, histogram.coverage_of(counts, ids), special, k_unseen, int(np.count_nonzero(counts)))


def describe_kept(manifest: dict) -> str:
    """One line saying where a head's K ids came from: by frequency, special tokens, never seen."""
    k, frequent, unseen = manifest["k"], manifest["k_frequent"], manifest.get("k_unseen", 0)
    special = k - frequent - unseen
    of = f"{manifest['k_before']:,} draft ids of the EAGLE-3 drafter" if "k_before" in manifest else f"{manifest['vocab_size']:,} ids"
    text = f"kept K={k:,} of {of}: {frequent:,} by frequency, {special:,} special tokens"
    if unseen:
        text += f", {unseen:,} never seen in the histogram (filler, smallest id first)"
    return text + f"; coverage {manifest['coverage']:.2%} of the counted tokens"


def unseen_warning(manifest: dict) -> str | None:
    """The warning for a --top-k larger than the ids the histogram counted, else None."""
    unseen = manifest.get("k_unseen", 0)
    if not unseen:
        return None
    return (
        f"--top-k {manifest['k']:,} exceeds the {manifest['distinct_ids']:,} distinct ids counted: {unseen:,} kept ids were "
        "never seen, so their rows are chosen by id order and the coverage figure says nothing about them; "
        "count more tokens or lower --top-k"
    )


# ---------------------------------------------------------------------------------------------
# Fingerprints of the drafter the head is for
# ---------------------------------------------------------------------------------------------


ARCHITECTURE_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)


def drafter_architecture(model) -> dict:
    """The drafter's shape, as recorded in a head's manifest and checked when the head is loaded."""
    cfg = model.config
    return {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS if getattr(cfg, k, None) is not None}


# ---------------------------------------------------------------------------------------------
# Building and saving
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildHeadConfig:
    """Everything ``vocabtrim build-head`` needs."""

    histogram: str  # a calibration folder (or its histogram.parquet): a path or a URI
    drafter: str
    out: str  # the head folder: a path or a URI
    drafter_layers: int | None = None
    top_k: int | None = None
    coverage: float | None = None
    export: list[str] = field(default_factory=list)
    dtype: str = "auto"
    trust_remote_code: bool = False
    target: str | None = None  # an EAGLE-3 drafter's target, for its tokenizer when the folder has none


def save_head(head: TrimmedHead, folder: str | os.PathLike, manifest: dict) -> None:
    """Write ``head.safetensors`` (token_ids int64 [K], weight [K, hidden], bias [K] if any) and ``manifest.json``."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    storage.makedirs(folder)
    tensors = {"token_ids": head.token_ids.to(torch.int64).contiguous().cpu(), "weight": head.weight.contiguous().cpu()}
    if head.bias is not None:
        tensors["bias"] = head.bias.contiguous().cpu()
    meta = {k: str(manifest[k]) for k in ("tokenizer_fingerprint", "drafter_fingerprint", "k", "vocab_size") if k in manifest}
    storage.atomic_write(storage.join(folder, HEAD_FILE), lambda tmp: save_file(tensors, tmp, metadata=meta))
    storage.atomic_write(storage.join(folder, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())


def export_sglang(token_ids: torch.Tensor, path: str) -> None:
    """The kept ids as SGLang's ``--speculative-token-map`` reads them:
    ``torch.tensor(torch.load(path, weights_only=True), dtype=torch.int32)`` (a list of ints)."""
    ids = [int(i) for i in token_ids.tolist()]
    storage.atomic_write(path, lambda tmp: torch.save(ids, tmp))


def export_eagle(token_ids: torch.Tensor, vocab_size: int, path: str) -> None:
    """EAGLE-3's id maps: ``d2t`` int64 [K] with ``d2t[i] = token_ids[i] - i`` (draft id i → target id
    ``i + d2t[i]``) and ``t2d`` bool [V] marking the kept target ids."""
    from safetensors.torch import save_file

    ids = token_ids.to(torch.int64)
    d2t = ids - torch.arange(ids.shape[0], dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    storage.atomic_write(path, lambda tmp: save_file({"d2t": d2t, "t2d": t2d}, tmp))


def mapping_tensors(token_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's id maps for sorted kept ids [K]: ``d2t`` int64 [K] (``i + d2t[i]`` is draft id i's target
    id) and ``t2d`` bool [vocab_size]; refuses ids outside the vocabulary."""
    ids = token_ids.to(torch.int64).cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UserError(f"kept id {int(ids.max())} is outside the target's vocabulary of {vocab_size}")
    d2t = ids - torch.arange(ids.shape[0], dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def export_specforge(token_ids: torch.Tensor, vocab_size: int, path: str) -> None:
    """The vocabulary mapping SpecForge (``load_vocab_mapping``) and the EAGLE repo read:
    ``torch.save({"d2t": int64 [K], "t2d": bool [V]})``, V the target's vocabulary size (checked)."""
    d2t, t2d = mapping_tensors(token_ids, vocab_size)
    if t2d.shape[0] != vocab_size or int(t2d.sum()) != d2t.shape[0]:
        raise RuntimeError("t2d must be as long as the target's vocabulary and mark exactly the K kept ids")
    storage.atomic_write(path, lambda tmp: torch.save({"d2t": d2t, "t2d": t2d}, tmp))


def plot_coverage(counts: np.ndarray, k: int, coverage: float, path: str, title: str = "") -> None:
    """Coverage against K (log-scaled K axis), the chosen K marked; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vocabtrim import histogram

    curve = histogram.coverage_curve(counts)
    ks = np.arange(1, curve.shape[0] + 1)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, curve, color="tab:blue", lw=1.6, label="top-K coverage")
    ax.axvline(k, color="tab:red", ls="--", lw=1)
    ax.axhline(coverage, color="tab:red", ls=":", lw=0.8)
    ax.plot([k], [coverage], "o", color="tab:red", label=f"chosen K = {k:,} ({coverage:.2%})")
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, curve.shape[0]))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("K (kept token ids, log scale)")
    ax.set_ylabel("share of counted tokens covered")
    ax.set_title(title or "Coverage of the calibration histogram")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    storage.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _histogram_paths(where: str) -> tuple[str, str]:
    """``(calibration folder, its histogram.parquet)`` for a folder or a ``.parquet`` file location."""
    where = os.fspath(where)
    folder = storage.parent(where) if storage.name(where).endswith(".parquet") else where
    if not storage.is_dir(folder):
        shown = storage.display(where)
        raise UserError(f"no calibration folder at {shown}: run `vocabtrim calibrate --out {shown}` first")
    return folder, storage.join(folder, "histogram.parquet")


def _check_build_config(config: BuildHeadConfig) -> None:
    if (config.top_k is None) == (config.coverage is None):
        raise UserError("pass exactly one of --top-k K or --coverage C")
    if config.coverage is not None and not 0 < config.coverage <= 1:
        raise UserError(f"--coverage must be in (0, 1], got {config.coverage}")
    if config.top_k is not None and config.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {config.top_k}")
    unknown = [e for e in config.export if e not in EXPORTS]
    if unknown:
        raise UserError(f"unknown --export {unknown[0]!r}: use {', '.join(EXPORTS)}")
    if storage.is_file(os.fspath(config.out)):
        raise UserError(f"--out {storage.display(os.fspath(config.out))} is a file: pass a folder")


def build_head(config: BuildHeadConfig) -> dict:
    """Histogram + drafter → the trimmed head folder; returns its manifest. An EAGLE-3 drafter is
    re-trimmed instead (``build_eagle3_head``)."""
    from vocabtrim import histogram
    from vocabtrim.calibrate import read_manifest
    from vocabtrim.models import head_rows_fingerprint, is_eagle3, load_drafter, load_tokenizer, logits_width, tokenizer_fingerprint

    _check_build_config(config)
    if is_eagle3(config.drafter):
        return build_eagle3_head(config)
    folder, hist_path = _histogram_paths(config.histogram)
    calibration = read_manifest(folder)
    tokenizer = load_tokenizer(config.drafter, config.trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if calibration["tokenizer_fingerprint"] != fingerprint:
        raise UserError(
            f"the histogram in {storage.display(folder)} was counted with another tokenizer ({calibration['tokenizer_fingerprint']}, "
            f"drafter {fingerprint}): calibrate with this drafter"
        )
    counts = histogram.load(hist_path)
    model, _ = load_drafter(config.drafter, config.drafter_layers, dtype=config.dtype, device="cpu", trust_remote_code=config.trust_remote_code)
    vocab = logits_width(model)
    selection = select_ids(
        counts, top_k=config.top_k, coverage=config.coverage,
        special_ids=special_token_ids(tokenizer, of_model(model)), vocab_size=vocab,
    )
    head = head_from_ids(model, selection.token_ids)
    out = os.fspath(config.out)
    storage.makedirs(out)
    manifest = {
        "kind": MANIFEST_KIND,
        "version": 1,
        "k": selection.k,
        "k_frequent": selection.k_frequent,
        "k_unseen": selection.k_unseen,
        "distinct_ids": selection.distinct_ids,
        "vocab_size": vocab,
        "hidden_size": int(head.weight.shape[1]),
        "has_bias": head.bias is not None,
        "dtype": str(head.weight.dtype).removeprefix("torch."),
        "top_k": config.top_k,
        "coverage_target": config.coverage,
        "coverage": selection.coverage,
        "special_ids": selection.special_ids,
        "tokenizer_fingerprint": fingerprint,
        "drafter_fingerprint": head_rows_fingerprint(model),
        "drafter_architecture": drafter_architecture(model),
        "drafter": config.drafter,
        "drafter_layers": config.drafter_layers,
        "histogram": storage.display(hist_path),
        "histogram_fingerprint": histogram.fingerprint(counts),
        "calibration_source": calibration.get("source"),
        "calibration_tokens": int(counts.sum()),
        "exports": {},
    }
    if "sglang" in config.export:
        export_sglang(head.token_ids, storage.join(out, SGLANG_FILE))
        manifest["exports"]["sglang"] = SGLANG_FILE
    if "eagle" in config.export:
        export_eagle(head.token_ids, vocab, storage.join(out, EAGLE_FILE))
        manifest["exports"]["eagle"] = EAGLE_FILE
    if "specforge" in config.export:
        export_specforge(head.token_ids, vocab, storage.join(out, SPECFORGE_FILE))
        manifest["exports"]["specforge"] = SPECFORGE_FILE
    plot_coverage(
        np.concatenate([counts[:vocab], np.zeros(max(0, vocab - counts.shape[0]), dtype=np.int64)]),
        selection.k, selection.coverage, storage.join(out, PLOT_FILE),
        title=(
            f"{Path(config.drafter).name}{f', {config.drafter_layers} layers' if config.drafter_layers else ''}: "
            f"source {calibration.get('source')}, {int(counts.sum()):,} tokens"
        ),
    )
    manifest["plot"] = PLOT_FILE
    save_head(head, out, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Re-trimming an EAGLE-3 drafter
# ---------------------------------------------------------------------------------------------


def _eagle3_tokenizer(config: BuildHeadConfig):
    """An EAGLE-3 folder's own tokenizer, else ``--target``'s (SpecForge checkpoints carry none)."""
    from vocabtrim.models import BUNDLED, BUNDLED_EAGLE3, eagle3_folder, load_tokenizer

    folder = eagle3_folder(config.drafter)
    if (Path(folder).expanduser() / "tokenizer_config.json").is_file():
        return load_tokenizer(folder, config.trust_remote_code)
    if config.target is None and config.drafter == BUNDLED_EAGLE3:
        return load_tokenizer(BUNDLED, config.trust_remote_code)
    if config.target is None:
        raise UserError(f"the EAGLE-3 folder {config.drafter} has no tokenizer: pass --target MODEL (its target)")
    return load_tokenizer(config.target, config.trust_remote_code)


def build_eagle3_head(config: BuildHeadConfig) -> dict:
    """Re-trim an EAGLE-3 drafter: keep the top-K (or coverage-C) ids of the histogram *among its draft
    vocabulary* (special tokens in it always kept), and write a new EAGLE-3 checkpoint folder at ``out``:
    its lm_head rows for those ids, new ``d2t``/``t2d``, every other tensor unchanged; with
    ``manifest.json``, ``coverage.png`` and the exports. ``--coverage`` counts the tokens the drafter can
    propose; the manifest's ``coverage`` is over the whole histogram."""
    import shutil

    from vocabtrim import eagle3, histogram
    from vocabtrim.calibrate import read_manifest
    from vocabtrim.models import tokenizer_fingerprint

    folder, hist_path = _histogram_paths(config.histogram)
    calibration = read_manifest(folder)
    tokenizer = _eagle3_tokenizer(config)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if calibration["tokenizer_fingerprint"] != fingerprint:
        raise UserError(
            f"the histogram in {storage.display(folder)} was counted with another tokenizer ({calibration['tokenizer_fingerprint']}, "
            f"this drafter's target {fingerprint}): calibrate with this target's tokenizer"
        )
    if config.drafter_layers is not None:
        raise UserError("--drafter-layers does not apply to an EAGLE-3 drafter (it has one layer): drop it")
    from vocabtrim.models import eagle3_folder

    model = eagle3.load_eagle3(eagle3_folder(config.drafter), target_vocab=None)
    vocab = model.config.vocab_size
    counts = histogram.load(hist_path)
    counts = np.concatenate([counts[:vocab], np.zeros(max(0, vocab - counts.shape[0]), dtype=np.int64)])
    draft_ids = model.token_ids.cpu().numpy()
    K0 = draft_ids.shape[0]
    if config.top_k is not None and config.top_k > K0:
        raise UserError(f"--top-k {config.top_k} is larger than the drafter's draft vocabulary of {K0}: re-trimming only removes ids")
    in_draft = set(int(i) for i in draft_ids)
    special = [int(np.searchsorted(draft_ids, i)) for i in special_token_ids(tokenizer) if i in in_draft]
    sub_counts = counts[draft_ids]
    if int(sub_counts.sum()) == 0:
        raise UserError("no counted token falls inside the drafter's draft vocabulary: calibrate on text for this target")
    selection = select_ids(sub_counts, top_k=config.top_k, coverage=config.coverage, special_ids=special, vocab_size=K0)
    keep = torch.from_numpy(draft_ids[selection.token_ids])
    trimmed = eagle3.retrim(model, keep)
    out = os.fspath(config.out)
    storage.makedirs(out)
    eagle3.save_eagle3(trimmed, out)
    src = Path(eagle3_folder(config.drafter)).expanduser()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).is_file() and storage.is_local(out):
            shutil.copyfile(src / name, Path(storage.local_path(out)) / name)
    kept = keep.numpy()
    manifest = {
        "kind": EAGLE3_MANIFEST_KIND,
        "version": 1,
        "k": int(kept.shape[0]),
        "k_before": int(K0),
        "k_frequent": selection.k_frequent,
        "vocab_size": vocab,
        "top_k": config.top_k,
        "coverage_target": config.coverage,
        "coverage": histogram.coverage_of(counts, kept),
        "coverage_before": histogram.coverage_of(counts, draft_ids),
        "special_ids": [int(draft_ids[i]) for i in special],
        "tokenizer_fingerprint": fingerprint,
        "drafter": config.drafter,
        "histogram": storage.display(hist_path),
        "histogram_fingerprint": histogram.fingerprint(counts),
        "calibration_source": calibration.get("source"),
        "calibration_tokens": int(counts.sum()),
        "exports": {},
    }
    if "sglang" in config.export:
        export_sglang(keep, storage.join(out, SGLANG_FILE))
        manifest["exports"]["sglang"] = SGLANG_FILE
    if "eagle" in config.export:
        export_eagle(keep, vocab, storage.join(out, EAGLE_FILE))
        manifest["exports"]["eagle"] = EAGLE_FILE
    if "specforge" in config.export:
        export_specforge(keep, vocab, storage.join(out, SPECFORGE_FILE))
        manifest["exports"]["specforge"] = SPECFORGE_FILE
    plot_coverage(counts, manifest["k"], manifest["coverage"], storage.join(out, PLOT_FILE),
                  title=f"{Path(config.drafter).name} (EAGLE-3) re-trimmed: source {calibration.get('source')}, {int(counts.sum()):,} tokens")
    manifest["plot"] = PLOT_FILE
    storage.atomic_write(storage.join(out, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_head_manifest(head_dir: str | os.PathLike) -> dict:
    head_dir = os.fspath(head_dir)
    return storage.read_manifest(
        storage.join(head_dir, MANIFEST_FILE), MANIFEST_KIND, "trimmed-head manifest",
        missing=f"{storage.display(head_dir)} holds no trimmed head (no {MANIFEST_FILE}): build one with `vocabtrim build-head`",
    )


def load_head(head_dir: str | os.PathLike, drafter_model=None, tokenizer=None) -> TrimmedHead:
    """Read a head written by ``build_head`` and check that it belongs to this drafter and tokenizer.

    Refused, in one UserError line: another tokenizer (fingerprint), another vocabulary size or
    architecture, rows that are not this drafter's LM-head rows (compared at the drafter's precision,
    so a float32-built head loads into a bfloat16 drafter), ids out of range or unsorted.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    head_dir = os.fspath(head_dir)
    manifest = read_head_manifest(head_dir)
    path = storage.join(head_dir, HEAD_FILE)
    try:
        tensors = load(storage.read_bytes(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {storage.display(path)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    head_dir = storage.display(head_dir)  # for the messages below
    ids, weight, bias = tensors.get("token_ids"), tensors.get("weight"), tensors.get("bias")
    if ids is None or weight is None or ids.dtype != torch.int64 or ids.dim() != 1 or weight.dim() != 2:
        raise UserError(f"{head_dir}/{HEAD_FILE} is not a trimmed head (needs token_ids int64 [K] and weight [K, hidden])")
    k = ids.shape[0]
    if weight.shape[0] != k or (bias is not None and bias.shape != (k,)) or k != manifest.get("k"):
        raise UserError(f"{head_dir}: token_ids, weight, bias and the manifest disagree on K")
    check_support(ids, manifest.get("vocab_size") or int(ids.max()) + 1, f"head {head_dir}")
    if tokenizer is not None:
        from vocabtrim.models import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_fingerprint") != fp:
            raise UserError(
                f"head {head_dir} was built for another tokenizer ({manifest.get('tokenizer_fingerprint')}, this one is {fp}): "
                "rebuild it with `vocabtrim build-head` for this drafter"
            )
    if drafter_model is not None:
        _check_drafter(head_dir, manifest, ids, weight, bias, drafter_model)
    return TrimmedHead(token_ids=ids, weight=weight, bias=bias)


def _check_drafter(head_dir, manifest: dict, ids, weight, bias, drafter) -> None:
    from vocabtrim.eagle3 import Eagle3Model
    from vocabtrim.models import logits_width

    if isinstance(drafter, Eagle3Model):
        raise UserError(
            f"--head {head_dir} is for a causal-LM drafter; an EAGLE-3 drafter carries its own draft vocabulary: "
            "re-trim it with `vocabtrim build-head --drafter <its folder>` and pass the new folder as --drafter"
        )

    vocab = logits_width(drafter)
    rebuild = "rebuild it with `vocabtrim build-head` for this drafter"
    if manifest.get("vocab_size") != vocab or int(ids[-1]) >= vocab:
        raise UserError(f"head {head_dir} was built for a vocabulary of {manifest.get('vocab_size')}, this drafter has {vocab}: {rebuild}")
    lm_head = drafter.get_output_embeddings()
    if weight.shape[1] != lm_head.weight.shape[1]:
        raise UserError(f"head {head_dir} has hidden size {weight.shape[1]}, this drafter {lm_head.weight.shape[1]}: {rebuild}")
    built_for, this = manifest.get("drafter_architecture") or {}, drafter_architecture(drafter)
    for key in ARCHITECTURE_KEYS:
        if built_for.get(key) != this.get(key):
            raise UserError(f"head {head_dir} was built for another drafter ({key} {built_for.get(key)}, this drafter {this.get(key)}): {rebuild}")
    rows = lm_head.weight.detach()[ids.to(lm_head.weight.device)]
    same = torch.equal(weight.to(device=rows.device, dtype=rows.dtype), rows)
    drafter_bias = getattr(lm_head, "bias", None)
    if (bias is None) != (drafter_bias is None):
        same = False
    elif bias is not None:
        same = same and torch.equal(bias.to(drafter_bias.device, drafter_bias.dtype), drafter_bias.detach()[ids.to(drafter_bias.device)])
    if not same:
        raise UserError(f"head {head_dir} was built for another drafter: its rows differ from this drafter's LM head; {rebuild}")
