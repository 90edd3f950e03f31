"""The kept ids as other tools read them: SGLang's token map, EAGLE-3's ``d2t``/``t2d``, SpecForge's mapping."""

from __future__ import annotations

import torch

from vocabtrim import storage
from vocabtrim.errors import UserError
from vocabtrim.head.files import EAGLE_FILE, SGLANG_FILE, SPECFORGE_FILE

EXPORTS = ("sglang", "eagle", "specforge")


def export_sglang(token_ids: torch.Tensor, path: str) -> None:
    """The kept ids as SGLang's ``--speculative-token-map`` reads them:
    ``torch.tensor(torch.load(path, weights_only=True), dtype=torch.int32)`` (a list of ints)."""
    ids = [int(i) for i in token_ids.tolist()]
    storage.atomic_write(path, lambda tmp: torch.save(ids, tmp))


def export_eagle(token_ids: torch.Tensor, vocab_size: int, path: str) -> None:
    """EAGLE-3's id maps: ``d2t`` int64 [K] with ``d2t[i] = token_ids[i] - i`` (draft id i → target id
    ``i + d2t[i]``) and ``t2d`` bool [V] marking the kept target ids."""
    from safetensors.torch import save_file

    d2t, t2d = mapping_tensors(token_ids, vocab_size)
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


WRITERS = {
    "sglang": (SGLANG_FILE, lambda ids, vocab_size, path: export_sglang(ids, path)),
    "eagle": (EAGLE_FILE, export_eagle),
    "specforge": (SPECFORGE_FILE, export_specforge),
}


def write_exports(token_ids: torch.Tensor, vocab_size: int, folder: str, exports, earlier: dict | None = None) -> dict:
    """Write each export named in ``exports`` (of ``EXPORTS``) into ``folder``; returns ``{export: file name}`` for the
    manifest. ``earlier``: the manifest an earlier build left in ``folder``; the exports it lists that this build
    does not write are removed (they would map another vocabulary)."""
    written = {}
    for name in EXPORTS:
        file, write = WRITERS[name]
        if name in exports:
            write(token_ids, vocab_size, storage.join(folder, file))
            written[name] = file
    ours = {file for file, _ in WRITERS.values()}  # a name the manifest lists that is no export's is left alone
    for file in set((earlier or {}).get("exports", {}).values()) & ours - set(written.values()):
        storage.delete(storage.join(folder, file))
    return written
