"""A head folder on disk: save a head, read its manifest, load it back checked against the drafter."""

from __future__ import annotations

import json
import os

import torch

from vocabtrim import storage
from vocabtrim.engine.heads import check_support
from vocabtrim.errors import UserError, first_line, user_error_unless_fault
from vocabtrim.head.files import EAGLE3_MANIFEST_KIND, HEAD_FILE, MANIFEST_FILE, MANIFEST_KIND
from vocabtrim.head.trimmed import TrimmedHead

ARCHITECTURE_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)


def drafter_architecture(model) -> dict:
    """The drafter's shape, as recorded in a head's manifest and checked when the head is loaded."""
    cfg = model.config
    return {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS if getattr(cfg, k, None) is not None}


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


def read_head_manifest(head_dir: str | os.PathLike, *, eagle3: bool = False) -> dict:
    """The manifest ``build-head`` wrote in ``head_dir``: a trimmed head's, or with ``eagle3`` a re-trimmed
    EAGLE-3 drafter's."""
    head_dir = os.fspath(head_dir)
    kind, what = (EAGLE3_MANIFEST_KIND, "re-trimmed EAGLE-3 drafter's manifest") if eagle3 else (MANIFEST_KIND, "trimmed-head manifest")
    return storage.read_manifest(
        storage.join(head_dir, MANIFEST_FILE), kind, what,
        missing=f"{storage.display(head_dir)} holds no trimmed head (no {MANIFEST_FILE}): build one with `vocabtrim build-head`",
        writer="`vocabtrim build-head`",
    )


def read_head_file(head_dir: str | os.PathLike) -> bytes:
    """The bytes of ``head_dir``'s head file; one UserError line when it cannot be read, unless the machine is at
    fault (``machine_fault``: the error itself, retried by the caller)."""
    path = storage.join(os.fspath(head_dir), HEAD_FILE)
    try:
        return storage.read_bytes(path)
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot read {storage.display(path)}: {first_line(exc)}")


def load_head(head_dir: str | os.PathLike, drafter_model=None, tokenizer=None, data: bytes | None = None) -> TrimmedHead:
    """Read a head written by ``build_head`` and check that it belongs to this drafter and tokenizer.
    ``data``: the head file's bytes when the caller has read them (``read_head_file``).

    Refused, in one UserError line: another tokenizer (fingerprint), another vocabulary size or
    architecture, rows that are not this drafter's LM-head rows (compared at the drafter's precision,
    so a float32-built head loads into a bfloat16 drafter), ids out of range or unsorted.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    head_dir = os.fspath(head_dir)
    manifest = read_head_manifest(head_dir)
    data = read_head_file(head_dir) if data is None else data
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise UserError(f"cannot read {storage.display(storage.join(head_dir, HEAD_FILE))}: {first_line(exc)}") from exc
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
