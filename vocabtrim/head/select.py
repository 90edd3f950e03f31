"""Choosing the kept ids from a histogram, and describing the choice."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vocabtrim import histogram, validate
from vocabtrim.errors import UserError


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
    validate.trim(top_k, coverage, vocab_size)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] > vocab_size:
        extra = int(np.flatnonzero(counts[vocab_size:])[0] + vocab_size) if counts[vocab_size:].any() else None
        if extra is not None:
            raise UserError(f"the histogram counts token id {extra}, outside the drafter's vocabulary of {vocab_size}: calibrate "
                            "with a model of this drafter's vocabulary")
        counts = counts[:vocab_size]
    counts = np.concatenate([counts, np.zeros(vocab_size - counts.shape[0], dtype=np.int64)])
    total = int(counts.sum())
    if total == 0:
        raise UserError("the histogram is empty (no tokens were counted): calibrate on a corpus with text")
    special = sorted({int(i) for i in special_ids if 0 <= int(i) < vocab_size})
    ranked = histogram.ranked_ids(counts)
    if top_k is not None:
        if top_k < len(special):
            raise UserError(f"--top-k {top_k} is smaller than the {len(special)} special tokens that are always kept")
        others = ranked[~np.isin(ranked, special)][: top_k - len(special)]
        k_frequent = int(np.count_nonzero(counts[others]))
        k_unseen = int(others.shape[0]) - k_frequent
        ids = np.union1d(others, np.asarray(special, dtype=np.int64))
    else:
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
