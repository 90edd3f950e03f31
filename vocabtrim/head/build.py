"""``vocabtrim build-head``: histogram + drafter → a head folder; an EAGLE-3 drafter is re-trimmed instead."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vocabtrim import histogram, storage, validate
from vocabtrim.errors import UserError
from vocabtrim.head.export import EXPORTS, write_exports
from vocabtrim.head.files import EAGLE3_MANIFEST_KIND, MANIFEST_FILE, MANIFEST_KIND, PLOT_FILE
from vocabtrim.head.io import drafter_architecture, save_head
from vocabtrim.head.plot import plot_coverage
from vocabtrim.head.select import select_ids
from vocabtrim.head.trimmed import head_from_ids
from vocabtrim.special_tokens import of_model, special_token_ids


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


def _check_build_config(config: BuildHeadConfig) -> None:
    from vocabtrim.models import check_runs_alone, is_eagle3

    validate.trim(config.top_k, config.coverage)
    check_runs_alone("target", config.target)
    if "sglang" in config.export and is_eagle3(config.drafter):
        raise UserError("--export sglang writes SGLang's --speculative-token-map, which SGLang ignores for an EAGLE-3 drafter "
                        "(it reads the d2t in the checkpoint: serve the folder build-head writes): drop --export sglang")
    unknown = [e for e in config.export if e not in EXPORTS]
    if unknown:
        raise UserError(f"unknown --export {unknown[0]!r}: use {', '.join(EXPORTS)}")
    if storage.is_file(os.fspath(config.out)):
        raise UserError(f"--out {storage.display(os.fspath(config.out))} is a file: pass a folder")


def build_head(config: BuildHeadConfig) -> dict:
    """Histogram + drafter → the trimmed head folder (``config.out``, held by ``lease``: one run at a time);
    returns its manifest. An EAGLE-3 drafter is re-trimmed instead (``build_eagle3_head``)."""
    from vocabtrim.lease import lease

    _check_build_config(config)
    with lease(os.fspath(config.out)):
        return _build_head(config)


def _build_head(config: BuildHeadConfig) -> dict:
    from vocabtrim.models import (check_declared_widths, check_pair, head_rows_fingerprint, is_eagle3, load_drafter, load_tokenizer,
                                  logits_width, tokenizer_fingerprint)

    if is_eagle3(config.drafter):
        return build_eagle3_head(config)
    tokenizer = load_tokenizer(config.drafter, config.trust_remote_code)
    if config.target is not None and config.target != config.drafter:  # the pair the head will serve
        check_pair(load_tokenizer(config.target, config.trust_remote_code), tokenizer)
        check_declared_widths(config.target, config.drafter, config.trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    hist_path, calibration, counts = histogram.read_calibration(config.histogram, fingerprint, "drafter")
    model, _ = load_drafter(config.drafter, config.drafter_layers, dtype=config.dtype, device="cpu", trust_remote_code=config.trust_remote_code)
    vocab = logits_width(model)
    selection = select_ids(
        counts, top_k=config.top_k, coverage=config.coverage,
        special_ids=special_token_ids(tokenizer, of_model(model)), vocab_size=vocab,
    )
    head = head_from_ids(model, selection.token_ids)
    out = os.fspath(config.out)
    earlier = storage.check_out_kind(out, MANIFEST_KIND)
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
        "exports": write_exports(head.token_ids, vocab, out, config.export, earlier),
    }
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

    from vocabtrim import eagle3
    from vocabtrim.models import (BUNDLED, BUNDLED_EAGLE3, EAGLE3_NO_LAYERS, check_eagle3_drafter, eagle3_folder, generation_config,
                                  load_tokenizer, tokenizer_fingerprint)

    if config.drafter_layers is not None:
        raise UserError(EAGLE3_NO_LAYERS)
    folder = eagle3_folder(config.drafter)
    out = os.fspath(config.out)
    if storage.is_local(out) and storage.canonical(out) == storage.canonical(folder):
        raise UserError(f"--out {storage.display(out)} is the drafter's own folder: write the re-trimmed drafter to another folder")
    tokenizer = _eagle3_tokenizer(config)
    target = config.target or (BUNDLED if config.drafter == BUNDLED_EAGLE3 else None)
    if target is not None:  # the checkpoint against its target: t2d length, d2t range, feature width, tokenizer
        check_eagle3_drafter(folder, target, target_tokenizer=load_tokenizer(target, config.trust_remote_code),
                             trust_remote_code=config.trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    hist_path, calibration, counts = histogram.read_calibration(config.histogram, fingerprint, "target")
    model = eagle3.load_eagle3(folder, target_vocab=None)
    vocab = model.config.vocab_size
    counts = np.concatenate([counts[:vocab], np.zeros(max(0, vocab - counts.shape[0]), dtype=np.int64)])
    draft_ids = model.token_ids.cpu().numpy()
    K0 = draft_ids.shape[0]
    if config.top_k is not None and config.top_k > K0:
        raise UserError(f"--top-k {config.top_k} is larger than the drafter's draft vocabulary of {K0}: re-trimming only removes ids")
    in_draft = set(int(i) for i in draft_ids)
    generation = generation_config(target if target is not None else folder, config.trust_remote_code)  # its EOS ids
    special = [int(np.searchsorted(draft_ids, i)) for i in special_token_ids(tokenizer, generation) if i in in_draft]
    sub_counts = counts[draft_ids]
    if int(sub_counts.sum()) == 0:
        raise UserError("no counted token falls inside the drafter's draft vocabulary: calibrate on text for this target")
    selection = select_ids(sub_counts, top_k=config.top_k, coverage=config.coverage, special_ids=special, vocab_size=K0)
    keep = torch.from_numpy(draft_ids[selection.token_ids])
    trimmed = eagle3.retrim(model, keep)
    earlier = storage.check_out_kind(out, EAGLE3_MANIFEST_KIND, overwrites=("config.json", eagle3.WEIGHTS_FILE))
    storage.makedirs(out)
    eagle3.save_eagle3(trimmed, out)
    src = Path(folder).expanduser()
    copied = []  # the drafter's files copied beside it: the manifest lists them, so a rerun removes those it no longer copies
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).is_file() and storage.is_local(out):
            shutil.copyfile(src / name, Path(storage.local_path(out)) / name)
            copied.append(name)
        elif earlier is not None and name in earlier.get("copied", []):  # an earlier re-trim's copy, from another drafter
            storage.delete(storage.join(out, name))
    kept = keep.numpy()
    manifest = {
        "kind": EAGLE3_MANIFEST_KIND,
        "version": 1,
        "k": int(kept.shape[0]),
        "k_before": int(K0),
        "k_frequent": selection.k_frequent,
        "k_unseen": selection.k_unseen,
        "distinct_ids": selection.distinct_ids,
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
        "exports": write_exports(keep, vocab, out, config.export, earlier),
        "copied": copied,
    }
    plot_coverage(counts, manifest["k"], manifest["coverage"], storage.join(out, PLOT_FILE),
                  title=f"{Path(config.drafter).name} (EAGLE-3) re-trimmed: source {calibration.get('source')}, {int(counts.sum()):,} tokens")
    manifest["plot"] = PLOT_FILE
    storage.atomic_write(storage.join(out, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    return manifest
