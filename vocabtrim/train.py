"""``vocabtrim train-drafter``: train an EAGLE-3 drafter for a target, with a vocabtrim draft vocabulary.

Flow (``run_train``):
1. On the driver: check the flags; the draft vocabulary is the histogram's top-K ids (special tokens
   always in, as ``build-head`` keeps them), or ``--init``'s own; cut the corpus into shards (``vocabtrim.corpus``).
2. Feature extraction, shard by shard, on a pool of ``FeatureExtractor`` actors (the calibrate pool,
   ledger and driver loop: ``calibrate.CounterPool`` / ``count_shards``): each row becomes token ids
   (``--source corpus``: the row's text; ``--source target``: the row as a chat prompt plus the
   target's own response, the loss on the response only), and the target's hidden states at its
   three EAGLE-3 layers, its final (normed) hidden state and its greedy next token at every position.
   One file per shard in ``DIR/features/`` (a rerun skips the shards already there).
3. One ``DrafterTrainer`` actor (a GPU when ``--gpus-per-worker`` gives one) trains with EAGLE-3's
   training-time test (``eagle3.ttt_forward``: ``--ttt-length`` chained steps, each on its own previous
   output, loss weights 0.8^s) against the target's distribution over the draft vocabulary (soft
   cross-entropy, as SpecForge's KL loss), on positions whose target token is in the draft vocabulary.
   Shards ending in a held-out fraction are not trained on: after every epoch the trainer reports the
   held-out acceptance (step-0 greedy agreement with the target, and per TTT step). The drafter starts
   from ``--init``'s weights when given (``initial_drafter``), else from random weights with the target's
   head rows and final norm.
   The training features are read as they are trained on: every row shuffled at once when they fit
   ``--shuffle-gb``, else the shards in a shuffled order, in windows that fit, each window's rows shuffled.
4. After every epoch: the drafter in SpecForge's layout (``DIR/config.json``, ``DIR/model.safetensors``,
   the target's tokenizer files) and ``DIR/train_state.pt`` (weights, optimizer, epoch; read back with
   ``torch.load(weights_only=True)``): a rerun with more ``--epochs`` resumes from the last epoch.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from vocabtrim import corpus, storage, validate
from vocabtrim.calibrate import Ledger, batch_prompts
from vocabtrim.chat import TEMPLATE_KEY, check_message_lists, has_chat_template, template_sha256
from vocabtrim.special_tokens import eos_ids, of_model
from vocabtrim.errors import UserError, first_line, machine_fault, user_error_unless_fault
from vocabtrim.ray_utils import StartingActor

log = logging.getLogger(__name__)

SOURCES = ("corpus", "target")
MANIFEST_KIND = "vocabtrim-eagle3-train"
STATE_FILE = "train_state.pt"
TRAINING_FILE = "training.json"  # the settings the drafter in --out trains under (``storage.claim``)
MIN_ROW_TOKENS = 3  # a training row: a token, the next token it is fed, and the one after that it predicts


@dataclass
class TrainConfig:
    """Everything ``vocabtrim train-drafter`` needs."""

    target: str
    corpus: list[str]
    histogram: str | None  # None only with ``init``: its own draft vocabulary
    top_k: int | None
    out: str
    source: str = "corpus"
    text_column: str = "text"
    max_length: int = 256  # tokens per training row (prompt + response)
    max_new_tokens: int = 128  # --source target: response length
    temperature: float = 0.0  # --source target: 0 trains on the target's greedy responses
    seed: int = 0
    epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 8  # rows per optimizer step
    ttt_length: int = 3
    held_out: float = 0.1  # share of shards held out for the acceptance report
    intermediate_size: int | None = None  # the drafter layer's MLP width (default: the target's)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    address: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    shard_rows: int = 32
    max_shards: int | None = None  # only the first N shards of the corpus (a quick run); None: all
    show_progress: bool = True
    max_steps: int | None = None  # Python-only: stop an epoch after this many steps (tests, quick runs)
    checkpoint_minutes: float = 10.0  # within an epoch, the resume state is written at most this often (0: at epoch ends only)
    shuffle_gb: float = 8.0  # feature bytes (GB of 1e9) the trainer holds at once to shuffle; more features: shuffled window by window
    init: str | None = None  # an EAGLE-3 drafter (folder or the bundled name) to start from: fine-tuning
    init_from_target: bool = False  # a new drafter's layer starts as the target's layer that reads the highest feature layer
    fault_injection: str | None = None  # tests only: faults.injected_fault, at each training call


# ---------------------------------------------------------------------------------------------
# One shard's features and their ledger
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureShard:
    """One shard's rows, concatenated: ``tensors`` holds
    input_ids int64 [N], row_lengths int64 [R], loss_mask uint8 [N] (1: the token is a training target),
    aux [N, 3 x H] and final [N, H] (the target's three layers and its normed last hidden state, bf16),
    target_next int64 [N] (the target's greedy token after each position)."""

    shard_id: str
    path: str
    rows: int
    tokens: int
    tensors: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0


class FeatureLedger(Ledger):
    """``DIR/features/``: one safetensors file per finished shard (the calibrate ledger's rules)."""

    SUFFIX = ".safetensors"
    HOLDS = "features"
    WRITERS = 2  # an entry holds a shard's hidden states (hundreds of MB for a large target): few held at once

    def record(self, result: FeatureShard) -> bool:
        from safetensors.torch import save

        target = self.path(result.shard_id)
        if result.shard_id in self._recorded:  # what the ledger knows: see Ledger.record
            return False
        meta = {"shard_id": result.shard_id, "path": storage.display(result.path),  # a URI's query is not written down
                "rows": str(result.rows), "tokens": str(result.tokens)}
        storage.atomic_write(target, save(result.tensors, metadata=meta))
        self._recorded.add(result.shard_id)
        return True

    def read(self, shard_id: str) -> dict:
        from safetensors.torch import load

        path = self.path(shard_id)
        try:
            return load(storage.read_bytes(path))
        except Exception as exc:
            user_error_unless_fault(exc, f"feature file {storage.display(path)} is unreadable ({first_line(exc)}): delete it and rerun")

    def layout(self, shard_id: str) -> tuple[int, int]:
        """(bytes of its tensors, rows) of a recorded shard, from its safetensors header alone (``feature_layout``):
        a ranged read of the file's start, not the features."""
        path = self.path(shard_id)
        try:
            with storage.open_binary(path, buffer_size=64 << 10) as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= HEADER_LIMIT:
                    raise ValueError(f"no safetensors header (its length reads {n})")
                return feature_layout(json.loads(f.read(n)))
        except Exception as exc:
            user_error_unless_fault(exc, f"feature file {storage.display(path)} is unreadable ({first_line(exc)}): delete it and rerun")


HEADER_LIMIT = 100 << 20  # the longest header safetensors reads


def feature_layout(header: dict) -> tuple[int, int]:
    """A feature file's safetensors header (its JSON: {name: {dtype, shape, data_offsets}, "__metadata__": ...})
    → (bytes of its tensors: the end of the last one's data, rows: the length of ``row_lengths``)."""
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    return max(ends, default=0), int(header["row_lengths"]["shape"][0])


# ---------------------------------------------------------------------------------------------
# The extracting actor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractorSpec:
    target: str
    source: str
    text_column: str
    feature_layers: tuple
    max_length: int
    max_new_tokens: int
    temperature: float
    seed: int
    dtype: str
    trust_remote_code: bool
    threads: int = 1
    use_gpu: bool = False
    batch_rows: int = 8
    wrap_prompts: bool = True  # --source target: a string row as a user message in the chat template (vocabtrim.chat's auto)


class FeatureExtractor(StartingActor):
    """Turns one shard into a ``FeatureShard``: ``extract(shard)``."""

    def _build(self, spec: ExtractorSpec):
        import torch

        from vocabtrim.models import load_model, load_tokenizer

        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.device = torch.device("cuda") if spec.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(spec.target, spec.trust_remote_code)
        self.model = load_model(spec.target, dtype=spec.dtype, device=self.device, trust_remote_code=spec.trust_remote_code)
        self.engine = None
        if spec.source == "target":
            from vocabtrim.engine import make_engine
            from vocabtrim.engine.sampling import SamplingParams

            self.engine = make_engine(
                self.model, None, sampling=SamplingParams(temperature=spec.temperature), batch_size=spec.batch_rows,
                max_new_tokens=spec.max_new_tokens, eos_token_ids=tuple(eos_ids(self.tokenizer, of_model(self.model))),
            )

    def _rows(self, shard, batch) -> list[tuple[list[int], int]]:
        """(token ids, index of the first loss-bearing token) per row of a corpus batch: ``--source corpus``,
        each non-blank text with the special tokens the tokenizer adds; ``--source target``, each row's prompt of
        at most max_length - max_new_tokens tokens (``calibrate.batch_prompts``) and the target's response."""
        from vocabtrim.engine.sampling import row_seed

        spec = self.spec
        if self.engine is None:
            texts = [t for t in batch.texts if isinstance(t, str) and t.strip()]
            # With the special tokens the tokenizer adds (BOS), as generate encodes a raw prompt: the target's
            # hidden states are trained on as the engine reads them.
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            return [(i[: spec.max_length], 1) for i in ids]
        limit = max(1, spec.max_length - spec.max_new_tokens)
        prompts, keys = batch_prompts(self.tokenizer, batch.texts, [f"{shard.name}:{k}" for k in batch.keys], limit,
                                      spec.wrap_prompts, lines=shard.kind == "txt")
        if not prompts:
            return []
        outs = self.engine.generate(prompts, [row_seed(spec.seed, k) for k in keys])
        return [((p + o.token_ids)[: spec.max_length], len(p)) for p, o in zip(prompts, outs)]

    def extract(self, shard: corpus.Shard) -> FeatureShard:
        import torch

        spec = self.spec
        cpu = time.process_time()
        parts: dict[str, list] = {k: [] for k in ("input_ids", "row_lengths", "loss_mask", "aux", "final", "target_next")}
        rows = tokens = 0
        for batch in corpus.iter_shard(shard, spec.text_column, spec.batch_rows):
            got = [(ids, start) for ids, start in self._rows(shard, batch) if len(ids) >= MIN_ROW_TOKENS]
            if not got:
                continue
            width = max(len(ids) for ids, _ in got)
            block = torch.zeros(len(got), width, dtype=torch.long)
            mask = torch.zeros(len(got), width, dtype=torch.long)
            for r, (ids, _) in enumerate(got):
                block[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            with torch.inference_mode():
                out = getattr(self.model, self.model.base_model_prefix)(input_ids=block.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True)
                aux = torch.cat([out.hidden_states[i] for i in spec.feature_layers], dim=-1)
                final = out.last_hidden_state
                head = self.model.get_output_embeddings()
                # The greedy tokens a few rows at a time: a whole batch's logits [rows, T, V] can outgrow the device.
                nxt = torch.cat([head(final[i : i + 16]).argmax(-1) for i in range(0, final.shape[0], 16)])
            for r, (ids, start) in enumerate(got):
                n = len(ids)
                loss = torch.zeros(n, dtype=torch.uint8)
                loss[start:] = 1
                parts["input_ids"].append(torch.tensor(ids, dtype=torch.int64))
                parts["row_lengths"].append(torch.tensor([n], dtype=torch.int64))
                parts["loss_mask"].append(loss)
                parts["aux"].append(aux[r, :n].to("cpu", torch.bfloat16))
                parts["final"].append(final[r, :n].to("cpu", torch.bfloat16))
                parts["target_next"].append(nxt[r, :n].to("cpu", torch.int64))
                rows += 1
                tokens += n
        if rows == 0:
            H = self.model.config.hidden_size
            tensors = {"input_ids": torch.zeros(0, dtype=torch.int64), "row_lengths": torch.zeros(0, dtype=torch.int64),
                       "loss_mask": torch.zeros(0, dtype=torch.uint8), "aux": torch.zeros(0, 3 * H, dtype=torch.bfloat16),
                       "final": torch.zeros(0, H, dtype=torch.bfloat16), "target_next": torch.zeros(0, dtype=torch.int64)}
        else:
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        return FeatureShard(shard.shard_id, shard.path, rows, tokens, tensors, time.process_time() - cpu)


# ---------------------------------------------------------------------------------------------
# Training (pure tensor functions, then the trainer actor)
# ---------------------------------------------------------------------------------------------


def split_rows(tensors: dict) -> list[dict]:
    """A feature file's concatenated tensors → one dict per row."""
    out, start = [], 0
    for n in tensors["row_lengths"].tolist():
        out.append({k: tensors[k][start : start + n] for k in ("input_ids", "loss_mask", "aux", "final", "target_next")})
        start += n
    return out


def shard_windows(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices 0..len(sizes)-1 cut into runs of consecutive indices whose ``sizes`` (bytes) sum to at most ``budget``,
    each run as long as fits (a size over the budget is a run of its own)."""
    windows: list[list[int]] = []
    held = 0
    for i, size in enumerate(sizes):
        if windows and held + size <= budget:
            windows[-1].append(i)
            held += size
        else:
            windows.append([i])
            held = size
    return windows


def epoch_windows(shard_ids: list[str], sizes: list[int], budget: int | None, rng) -> list[list[str]]:
    """The groups of training shards an epoch reads one at a time, each shuffled as one (``window_batches``).
    ``sizes``: each shard's bytes; ``budget``: the bytes held at once (None: no bound). Shards whose sizes sum to at
    most ``budget`` are one group, in order, and ``rng`` is not drawn from: the epoch is one shuffle of every row.
    Else the shards in ``rng.permutation`` order, cut into consecutive groups that fit (``shard_windows``)."""
    if budget is None or sum(sizes) <= budget:
        return [list(shard_ids)] if shard_ids else []
    order = rng.permutation(len(shard_ids))
    return [[shard_ids[order[i]] for i in w] for w in shard_windows([sizes[i] for i in order], budget)]


def _own_row(row: dict) -> dict:
    """A row (``split_rows``) with its own copy of each tensor: it keeps no shard's tensors alive."""
    return {k: v.clone() for k, v in row.items()}


def window_batches(read, windows: list[list[str]], batch_size: int, rng=None, start: int = 0, rows: dict | None = None):
    """The batches of an epoch whose rows are read one window of shards at a time, from batch ``start`` on (a generator).

    read: shard id → its tensors (``FeatureLedger.read``); windows: lists of shard ids, read in order.
    Each window's rows (its shards' rows in order, ``split_rows``), put in ``rng.permutation`` order (as they are
    with rng None), go after the window before's: batch k is rows [k * batch_size, (k + 1) * batch_size) of that
    sequence, the last batch fewer. With one window: the batches of one shuffle of every row.
    A window whose rows all lie before batch ``start`` is not read: ``rows`` ({shard id: rows}) gives its length,
    and its permutation is drawn all the same (the later windows' stay those of an epoch begun at batch 0).
    Each batch: a list of row dicts with their own tensors; at most one window's tensors are held, and the fewer than
    ``batch_size`` rows carried from it to the next."""
    skip = start * batch_size  # rows before batch ``start``
    at = 0  # rows of the sequence before the current window
    carry: list[dict] = []
    for window in windows:
        if at < skip:
            n = sum(rows[sid] for sid in window)
            if at + n <= skip:
                if rng is not None:
                    rng.permutation(n)
                at += n
                continue
        got = []
        for sid in window:
            got.extend(split_rows(read(sid)))
        if rng is not None:
            got = [got[i] for i in rng.permutation(len(got))]
        drop = max(0, skip - at)  # rows of this window before batch ``start``
        at += len(got)
        got = carry + got[drop:]
        full = len(got) - len(got) % batch_size
        for k in range(0, full, batch_size):
            yield [_own_row(r) for r in got[k : k + batch_size]]
        carry = [_own_row(r) for r in got[full:]]
        got = None  # the window's tensors go before the next window's are read
    if carry:
        yield carry


def pad_rows(rows: list[dict], device=None):
    """Rows → padded batch tensors: input_ids [b, T], loss_mask [b, T] bool, aux [b, T, 3H], final [b, T, H],
    target_next [b, T], lengths [b]; on ``device`` when given."""
    import torch

    T = max(r["input_ids"].shape[0] for r in rows)
    b = len(rows)

    def pad(key, dtype=None):
        x = rows[0][key]
        shape = (b, T, *x.shape[1:])
        out = torch.zeros(shape, dtype=dtype or x.dtype)
        for i, r in enumerate(rows):
            out[i, : r[key].shape[0]] = r[key]
        return out

    batch = {
        "input_ids": pad("input_ids"), "loss_mask": pad("loss_mask").bool(), "aux": pad("aux"), "final": pad("final"),
        "target_next": pad("target_next"), "lengths": torch.tensor([r["input_ids"].shape[0] for r in rows]),
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def ttt_loss(model, batch: dict, target_head, steps: int, predictions: list | None = None):
    """EAGLE-3 training-time-test loss on one padded batch.

    target_head: [K, H] the target's LM-head rows for the draft vocabulary (the teacher over it).
    Step s, index j: the drafter's entry j + s predicts token j + 2 + s; the teacher is
    softmax(final[j + 1 + s] @ target_head.T); counted where that token is a loss token and the target's
    greedy token there is in the draft vocabulary. Returns (loss, per-step [correct, counted] list).
    ``predictions``, when a list: step s's greedy target ids [b, T - 2 - s] are appended to it.
    """
    import torch

    from vocabtrim import eagle3 as e3

    dtype = model.fc.weight.dtype
    ids, lengths = batch["input_ids"], batch["lengths"]
    b, T = ids.shape
    Tp = T - 1  # entries 0..T-2
    fused = e3.fuse(model, batch["aux"][:, :Tp].to(dtype))
    j = torch.arange(Tp, device=ids.device)[None]
    valid = j < (lengths[:, None] - 1)
    emb_steps = []
    for s in range(steps):
        tok = torch.zeros(b, Tp, dtype=torch.long, device=ids.device)
        width = max(0, min(Tp, T - 1 - s))
        tok[:, :width] = ids[:, 1 + s : 1 + s + width]
        emb_steps.append(e3.embed(model, tok))
    outs = e3.ttt_forward(model, emb_steps, fused, valid)
    t2d = model.t2d
    loss = torch.zeros((), dtype=torch.float32, device=ids.device)
    stats = []
    for s, out in enumerate(outs):
        width = max(0, min(Tp, T - 2 - s))
        if width == 0:
            stats.append((0, 0))
            continue
        z = batch["final"][:, 1 + s : 1 + s + width].to(dtype)
        teacher = torch.softmax((z @ target_head.T).float(), -1)  # [b, w, K]
        tgt_next = batch["target_next"][:, 1 + s : 1 + s + width]
        counted = (
            (j[:, :width] + 2 + s < lengths[:, None])
            & batch["loss_mask"][:, 2 + s : 2 + s + width]
            & t2d[tgt_next]
        )
        logp = torch.log_softmax(e3.logits(model, out[:, :width]).float(), -1)
        pred = model.token_ids[logp.detach().argmax(-1)]
        if predictions is not None:
            predictions.append(pred)
        n = counted.sum()
        if int(n) == 0:
            stats.append((0, 0))
            continue
        ce = -(teacher * logp).sum(-1)
        loss = loss + (0.8**s) * (ce * counted).sum() / n
        stats.append((int(((pred == tgt_next) & counted).sum()), int(n)))
    return loss, stats


def replay_chains(predictions: list, target_next, start: int, length: int) -> tuple[int, int, int]:
    """Greedy speculative decoding of one row replayed with the training forward's predictions, gamma = the
    number of TTT steps: what the engine would accept, where the per-position accuracy counts every position.

    predictions[s]: [>= length - 2 - s] target ids, step s at index j predicting the token at j + 2 + s.
    target_next: [length] the target's greedy token after each position. start: the first response position
    (the pending token of the first step). Each step drafts from index pos - 1 (pos: the pending token), accepts
    drafts while they equal the target's tokens, and moves past the accepted ones and the target's own token.
    Exact for the target's greedy responses (their tokens are the target's greedy tokens).
    Returns (accepted, proposed, steps); proposed is gamma a step, fewer where the row ends.
    """
    G = len(predictions)
    pos = max(int(start), 1)
    accepted = proposed = steps = 0
    while pos < length - 1:
        g = min(G, length - 1 - pos)
        a = 0
        while a < g and int(predictions[a][pos - 1]) == int(target_next[pos + a]):
            a += 1
        accepted, proposed, steps, pos = accepted + a, proposed + g, steps + 1, pos + a + 1
    return accepted, proposed, steps


def initial_drafter(init, target_head, draft_ids):
    """The drafter a fine-tuning run starts from: ``init``'s weights (an ``Eagle3Model``) over the draft
    vocabulary ``draft_ids`` (int64 [K], sorted), each id's head row ``init``'s own where it has one and the
    target's (``target_head`` [V, hidden]) elsewhere; trainable, with no ``embed_tokens`` of its own (the
    target's embedding is used, as by every drafter trained here)."""
    from vocabtrim import eagle3 as e3

    model = e3.retrim(e3.widen(init, target_head), draft_ids)
    model.embed_tokens = None
    model.requires_grad_(True)
    return model


def target_layer_index(feature_layers, target_layers: int) -> int:
    """The target decoder layer (0-based) whose input is the highest feature layer ``fc`` reads: hidden state
    ``i`` (of ``L + 1``, 0 the embeddings) is decoder layer ``i``'s input; the last layer where ``i`` is ``L``."""
    return min(int(feature_layers[-1]), target_layers - 1)


def start_from_target_layer(model, layer) -> None:
    """Set a new drafter's weights (an ``Eagle3Model``, in place) so that its decoder layer starts as the target's
    decoder layer ``layer`` (a transformers Llama-style layer) applied to the highest of the three feature layers:
    ``fc`` passes that block [.., 2H:3H] through unchanged and zeroes the other two; the feature half of
    q/k/v ([.., H:2H]) and o_proj, the MLP, the feature norm (``hidden_norm``, as the layer's input norm) and the
    post-attention norm are the layer's. The token half of q/k/v keeps its initialisation. Shapes must match."""
    import torch

    m, H = model.midlayer, model.config.hidden_size
    pairs = [(getattr(m.self_attn, n).weight[:, H:], getattr(layer.self_attn, n).weight) for n in ("q_proj", "k_proj", "v_proj")]
    pairs += [(m.self_attn.o_proj.weight, layer.self_attn.o_proj.weight)]
    pairs += [(getattr(m.mlp, n).weight, getattr(layer.mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj")]
    pairs += [(m.hidden_norm.weight, layer.input_layernorm.weight), (m.post_attention_layernorm.weight, layer.post_attention_layernorm.weight)]
    for mine, theirs in pairs:
        if mine.shape != theirs.shape:
            raise UserError(f"--init-from-target: the target's layer has a {tuple(theirs.shape)} weight where the drafter's has "
                            f"{tuple(mine.shape)} (this target's layer shape is not the drafter's: leave the flag out)")
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.copy_(theirs)
        model.fc.weight.zero_()
        model.fc.weight[:, 2 * H : 3 * H].copy_(torch.eye(H, dtype=model.fc.weight.dtype))


def check_resumable(saved: dict, fresh: dict, out: str) -> None:
    """Refuse, in one line, to resume a drafter saved with another draft vocabulary (``--top-k``,
    ``--histogram``) or other shapes (``--intermediate-size``) than this run's."""
    import torch

    differ = sorted(k for k in fresh if k not in saved or saved[k].shape != fresh[k].shape)
    if not differ:
        differ = [k for k in ("d2t", "t2d") if k in fresh and not torch.equal(saved[k].to(fresh[k].device), fresh[k])]
    if differ:
        raise UserError(
            f"{storage.display(out)} holds a drafter trained with another draft vocabulary or shape ({', '.join(differ[:3])} "
            "differ: --top-k, --histogram or --intermediate-size changed): use a new --out, or the run's own settings")


class DrafterTrainer(StartingActor):
    """Holds the drafter, the optimizer and the feature files; trains epoch by epoch on request."""

    def _build(self, cfg: dict, draft_ids: list[int], feature_layers: tuple, train_ids: list[str], eval_ids: list[str], threads: int):
        import torch

        from vocabtrim import eagle3 as e3
        from vocabtrim.models import load_model

        torch.set_num_threads(max(1, threads))
        self.cfg = TrainConfig(**cfg)
        c = self.cfg
        self.device = torch.device("cuda") if c.gpus_per_worker > 0 and torch.cuda.is_available() else torch.device("cpu")
        target = load_model(c.target, dtype="float32", device="cpu", trust_remote_code=c.trust_remote_code)
        ids = torch.tensor(draft_ids, dtype=torch.int64)
        if c.init is not None:
            from vocabtrim.models import load_eagle3_for

            model = initial_drafter(load_eagle3_for(c.init, target), target.lm_head.weight.detach(), ids)
        else:
            raw = e3.make_config(target.config, len(draft_ids), intermediate_size=c.intermediate_size)
            config = e3.Eagle3Config.from_dict(raw)
            torch.manual_seed(c.seed)
            model = e3.Eagle3Model(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02)
                # The head starts as the target's own rows for the draft vocabulary, the output norm as its final norm.
                model.lm_head.weight.copy_(target.lm_head.weight[ids])
                model.norm.weight.copy_(target.model.norm.weight)
            if c.init_from_target:
                index = target_layer_index(feature_layers, len(target.model.layers))
                start_from_target_layer(model, target.model.layers[index])
            model.set_vocabulary(ids)
        self.model = model.to(self.device)
        # The target's embedding and head rows live beside the drafter (on its GPU when it has one).
        self.embedding = target.get_input_embeddings().weight.detach().to(self.device, copy=True)
        model.set_embedding(self.embedding)
        self.target_head = target.lm_head.weight.detach()[ids].to(self.device)
        self.feature_layers = tuple(feature_layers)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.learning_rate, weight_decay=0.0)
        self.ledger = FeatureLedger(storage.join(c.out, "features"))
        self.train_ids, self.eval_ids = train_ids, eval_ids
        self._layouts: dict[str, tuple[int, int]] = {}  # shard id → (bytes, rows): FeatureLedger.layout, read once
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self._resume = None  # where a run stopped within an epoch left it: begin_epoch goes on from there
        self._saved_at = time.monotonic()
        state_path = storage.join(c.out, STATE_FILE)
        if storage.is_file(state_path):
            state = torch.load(io.BytesIO(storage.read_bytes(state_path)), weights_only=True)
            check_resumable(state["model"], model.state_dict(), c.out)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            for group in self.opt.param_groups:  # the optimizer's state keeps its old rate: --learning-rate applies from here on
                group["lr"] = c.learning_rate
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.history = json.loads(state["history"]) if isinstance(state.get("history"), str) else []
            if isinstance(state.get("within_epoch"), str):
                self._resume = json.loads(state["within_epoch"])

    def position(self) -> tuple[int, int]:
        return self.epoch, self.step

    def records(self) -> list[dict]:
        """Every epoch's record, this run's and the runs it resumed."""
        return list(self.history)

    def save(self) -> None:
        self._save()

    def _layout(self, shard_ids: list[str]) -> list[tuple[int, int]]:
        """(bytes, rows) of each shard (``FeatureLedger.layout``: its header, read once by this trainer, several at once)."""
        missing = [sid for sid in shard_ids if sid not in self._layouts]
        self._layouts.update(zip(missing, storage.each(self.ledger.layout, missing)))
        return [self._layouts[sid] for sid in shard_ids]

    def begin_epoch(self) -> int:
        """Shuffle this epoch's batches (seeded by the epoch) within ``shuffle_gb`` of features at once
        (``epoch_windows``, ``window_batches``: read as they are trained on); returns how many steps it has. A state
        saved within this epoch (``train_steps``' checkpoints) goes on from its batch, with the epoch's figures so far
        and the budget the epoch began with (a state without one: from before the budget, every row shuffled at once)."""
        c = self.cfg
        self._cursor, self._losses, self._correct, self._counted = 0, [], 0, 0
        self._shuffle_bytes = round(c.shuffle_gb * 1e9)
        if self._resume is not None:
            r, self._resume = self._resume, None
            self._cursor, self._losses, self._correct, self._counted = r["cursor"], r["losses"], r["correct"], r["counted"]
            self._shuffle_bytes = r.get("shuffle_bytes")
        layout = self._layout(self.train_ids)
        rng = np.random.default_rng(c.seed + self.epoch)
        windows = epoch_windows(self.train_ids, [size for size, _ in layout], self._shuffle_bytes, rng)
        batches = -(-sum(rows for _, rows in layout) // c.batch_size)
        self._steps = min(batches, c.max_steps) if c.max_steps is not None else batches
        self._epoch = window_batches(self.ledger.read, windows, c.batch_size, rng, start=self._cursor,
                                     rows={sid: rows for sid, (_, rows) in zip(self.train_ids, layout)})
        return self._steps

    def train_steps(self, k: int) -> dict:
        """Up to ``k`` batches of the current epoch, one optimizer step each (none for a batch with no counted
        position): ``steps`` the batches done, their mean loss and step-0 acceptance, ``cursor`` the epoch's batches
        done. Within the epoch the resume state is written once ``checkpoint_minutes`` have passed since the last."""
        import torch

        from vocabtrim.faults import injected_fault

        c = self.cfg
        injected_fault(c.fault_injection)
        self.model.train()
        self.model.requires_grad_(True)
        losses, correct, counted = [], 0, 0
        taken = 0
        for rows in itertools.islice(self._epoch or (), max(0, min(k, self._steps - self._cursor))):
            taken += 1
            loss, stats = ttt_loss(self.model, pad_rows(rows, self.device), self.target_head, c.ttt_length)
            if not loss.requires_grad:  # no position of the batch counts (no target token in the draft vocabulary)
                continue
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
            self.opt.step()
            self.step += 1
            losses.append(float(loss.detach()))
            correct += stats[0][0]
            counted += stats[0][1]
        self._cursor += taken
        self._losses += losses
        self._correct += correct
        self._counted += counted
        self.model.eval()
        self.model.requires_grad_(False)
        done = self._cursor >= self._steps
        if done:
            self._epoch = None  # its window's features go (a max_steps epoch stops within one)
        if not done and c.checkpoint_minutes > 0 and time.monotonic() - self._saved_at >= 60 * c.checkpoint_minutes:
            self._save(within_epoch=True)
        return {"steps": taken, "loss": float(np.mean(losses)) if losses else None,
                "train_acceptance": correct / counted if counted else None, "done": done, "cursor": self._cursor}

    def end_epoch(self) -> dict:
        """Evaluate on the held-out shards, write the drafter and the resume state; the epoch's record."""
        losses = self._losses
        if not losses:
            raise UserError(f"nothing to train on: no training row's next token (the target's) is in the draft vocabulary of "
                            f"{self.model.config.draft_vocab_size:,} ids: calibrate on text like the training rows, or raise --top-k")
        self.epoch += 1
        record = {"epoch": self.epoch, "steps": self.step, "learning_rate": self.opt.param_groups[0]["lr"],
                  "loss": float(np.mean(losses)) if losses else None,
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "train_acceptance": self._correct / self._counted if self._counted else None, **self.evaluate()}
        self.history.append(record)
        self._save()
        return record

    def train_epoch(self) -> dict:
        self.begin_epoch()
        while not self.train_steps(1 << 30)["done"]:
            pass
        return self.end_epoch()

    def evaluate(self) -> dict:
        """Held-out acceptance: greedy agreement with the target per TTT step, on the held-out shards: their rows in
        order, read a shard at a time (``window_batches``)."""
        import torch

        ids = self.eval_ids  # none: every figure None (the training rows are not held out)
        totals = [[0, 0] for _ in range(self.cfg.ttt_length)]
        chains = [0, 0, 0]  # accepted, proposed, steps
        losses = []
        with torch.no_grad():
            for rows in window_batches(self.ledger.read, [[sid] for sid in ids], self.cfg.batch_size):
                preds: list = []
                loss, stats = ttt_loss(self.model, pad_rows(rows, self.device), self.target_head, self.cfg.ttt_length, predictions=preds)
                if stats[0][1]:  # a batch with no counted position has no loss (0 by convention): not averaged in
                    losses.append(float(loss.detach()))
                preds = [p.cpu() for p in preds]  # the replay reads them one by one
                for s, (a, n) in enumerate(stats):
                    totals[s][0] += a
                    totals[s][1] += n
                for r, row in enumerate(rows):
                    mask = row["loss_mask"].bool()
                    if not bool(mask.any()):
                        continue
                    got = replay_chains([p[r] for p in preds], row["target_next"], int(mask.nonzero()[0, 0]), int(row["input_ids"].shape[0]))
                    chains = [x + y for x, y in zip(chains, got)]
        per_step = [a / n if n else None for a, n in totals]
        return {"held_out_loss": float(np.mean(losses)) if losses else None, "held_out_acceptance": per_step[0],
                "held_out_acceptance_per_step": per_step, "held_out_tokens": totals[0][1],
                "held_out_chain_acceptance": chains[0] / chains[1] if chains[1] else None,
                "held_out_tokens_per_step": (chains[0] + chains[2]) / chains[2] if chains[2] else None}

    def _save(self, within_epoch: bool = False) -> None:
        """The resume state (weights, optimizer, epochs done, history) and, at an epoch's end, the drafter;
        ``within_epoch``: the state alone, with the current epoch's position and figures so far."""
        import torch

        from vocabtrim import eagle3 as e3

        c = self.cfg
        if not within_epoch:  # the drafter's own files hold finished epochs only
            e3.save_eagle3(self.model, c.out)
        within = {}
        if within_epoch:  # (begin_epoch set these; a trainer with no epoch left, saving its weights, has none)
            within = {"within_epoch": json.dumps({"cursor": self._cursor, "losses": self._losses, "correct": self._correct,
                                                  "counted": self._counted, "shuffle_bytes": self._shuffle_bytes})}
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step,
                    "history": json.dumps(self.history), **within}, buf)
        storage.atomic_write(storage.join(c.out, STATE_FILE), buf.getvalue())
        self._saved_at = time.monotonic()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _check_config(c: TrainConfig) -> None:
    from vocabtrim.models import check_runs_alone

    validate.one_of("source", c.source, SOURCES)
    validate.pool(c.workers, c.gpus_per_worker, c.cpus_per_worker)
    validate.sampling(c.temperature)
    if (c.histogram is None) != (c.top_k is None):
        raise UserError("--histogram and --top-k go together: the draft vocabulary is the histogram's top K")
    if c.histogram is None and c.init is None:
        raise UserError("pass --histogram DIR --top-k K (the draft vocabulary), or --init DRAFTER to fine-tune a drafter "
                        "over its own draft vocabulary")
    if c.init is not None:
        from pathlib import Path

        from vocabtrim.models import BUNDLED_EAGLE3, eagle3_folder, is_eagle3

        if c.init_from_target:
            raise UserError("--init-from-target starts a new drafter; --init fine-tunes one: pass one of them")
        if not Path(eagle3_folder(c.init)).expanduser().is_dir():
            raise UserError(f"--init {c.init}: no such folder (pass an EAGLE-3 drafter's folder, or {BUNDLED_EAGLE3})")
        if not is_eagle3(c.init):
            raise UserError(f"--init {c.init} is not an EAGLE-3 drafter (no config.json naming an EAGLE-3 architecture): "
                            f"pass one (as SpecForge or train-drafter writes it), or {BUNDLED_EAGLE3}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("ttt_length", 1), ("max_length", 4), ("max_new_tokens", 1)):
        validate.at_least(name, getattr(c, name), low)
    if c.source == "target" and c.max_new_tokens >= c.max_length:
        raise UserError(f"--max-new-tokens {c.max_new_tokens} leaves no room for the prompt in rows of --max-length {c.max_length}: "
                        "raise --max-length or lower --max-new-tokens")
    for name in ("top_k", "max_shards", "intermediate_size"):
        if getattr(c, name) is not None:
            validate.at_least(name, getattr(c, name), 1)
    validate.above("learning_rate", c.learning_rate, 0)
    validate.at_least("checkpoint_minutes", c.checkpoint_minutes, 0)
    validate.above("shuffle_gb", c.shuffle_gb, 0)
    validate.at_least("seed", c.seed, 0)
    check_runs_alone("target", c.target)
    if not (isinstance(c.held_out, (int, float)) and 0 <= c.held_out < 1):
        raise validate.SettingError("held_out", f"must be in [0, 1), got {c.held_out}")
    if not c.corpus:
        raise UserError("pass --corpus PATH [PATH ...]: the rows to train on (prompts, for --source target)")
    if storage.is_file(c.out):
        raise UserError(f"--out {storage.display(c.out)} is a file: pass a folder")


def held_out_split(shard_ids: list[str], held_out: float) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the last ``held_out`` share of the shards, at least one when
    ``held_out`` > 0 and there are two or more; none of a single shard (then no held-out figure is reported)."""
    n = len(shard_ids)
    n_eval = max(1, int(math.floor(n * held_out))) if held_out > 0 and n > 1 else 0
    return shard_ids[: n - n_eval], shard_ids[n - n_eval :]


def training_settings(c: TrainConfig, draft_ids: list[int], train_ids: list[str], eval_ids: list[str],
                      features: dict | None = None) -> dict:
    """What a resumed training must keep (``--epochs``, ``--learning-rate`` and the pool may change); ``features``:
    the feature ledger's settings (its record goes with ``features/``, this one stays with the drafter), hashed
    without the keys records written before them lack (``Ledger.LATER_KEYS``), which stand beside the hash."""
    import hashlib

    later = {k: features[k] for k in Ledger.LATER_KEYS if features and k in features}
    features = {k: v for k, v in features.items() if k not in later} if features is not None else None

    def digest(values) -> str:
        return f"{len(values)}, sha256 {hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:16]}"

    return {"version": 1, "train_shards": digest(train_ids), "held_out_shards": digest(eval_ids), "draft_vocabulary": digest(draft_ids),
            "batch_size": c.batch_size, "ttt_length": c.ttt_length, "seed": c.seed, "max_steps": c.max_steps,
            "intermediate_size": c.intermediate_size, "init": storage.settings_key(c.init) if c.init else None,
            "init_from_target": c.init_from_target,
            **({"features": "sha256 " + hashlib.sha256(json.dumps(features, sort_keys=True, default=str).encode()).hexdigest()[:16]}
               if features is not None else {}), **later}


def check_target_layout(model: str, config, trust_remote_code: bool = False) -> None:
    """Refuse, in one line, a target whose layers the trainer cannot read (``config``: its text config): it starts
    the drafter's head and norm from the target's ``lm_head`` and ``model.norm`` and reads
    ``config.intermediate_size`` (the Llama layout). Built on the meta device: no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            target = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if machine_fault(exc):
            raise
        raise UserError(f"--target {model}: no causal LM of its config ({first_line(exc)})") from exc
    missing = [name for name, ok in (("lm_head", hasattr(target, "lm_head")),
                                     ("model.norm", hasattr(getattr(target, "model", None), "norm")),
                                     ("model.layers", hasattr(getattr(target, "model", None), "layers")),
                                     ("config.intermediate_size", getattr(target.config, "intermediate_size", None) is not None))
               if not ok]
    if missing:
        raise UserError(f"--target {model} ({type(target).__name__}) has no {', '.join(missing)}: train-drafter trains "
                        "EAGLE-3 drafters for targets of the Llama layout (Llama, Mistral, Qwen2/3 and the like)")


def draft_vocabulary(c: TrainConfig, tokenizer, target_vocab: int) -> tuple[list[int], dict]:
    """The histogram's top-K ids plus the special tokens, as ``build-head`` keeps them."""
    from vocabtrim import histogram
    from vocabtrim.head.select import select_ids
    from vocabtrim.special_tokens import special_token_ids
    from vocabtrim.models import tokenizer_fingerprint

    hist_path, calibration, counts = histogram.read_calibration(c.histogram, tokenizer_fingerprint(tokenizer), "target")
    if c.top_k > target_vocab:
        raise UserError(f"--top-k must be at most the target's vocabulary of {target_vocab}, got {c.top_k}")
    from vocabtrim.models import generation_config

    special = special_token_ids(tokenizer, generation_config(c.target, c.trust_remote_code))  # every EOS the target stops on
    sel = select_ids(counts, top_k=c.top_k, special_ids=special, vocab_size=target_vocab)
    return [int(i) for i in sel.token_ids], {"coverage": sel.coverage, "k_frequent": sel.k_frequent,
                                              "histogram": storage.display(hist_path), "calibration_source": calibration.get("source"),
                                              "histogram_fingerprint": histogram.fingerprint(counts)}


def _recorded(out: str) -> dict:
    """The training record in ``out`` (``TRAINING_FILE``), or {} where there is none to read (``storage.claim`` says why)."""
    try:
        record = json.loads(storage.read_text(storage.join(out, TRAINING_FILE)))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_train(config: TrainConfig) -> dict:
    """Extract features (resumable), train (resumable by epoch), write the drafter into ``config.out`` (held by
    ``lease``: one run at a time); returns the manifest."""
    from vocabtrim.lease import lease

    with lease(os.fspath(config.out)):
        return _train(config)


def _train(config: TrainConfig) -> dict:
    import ray
    import torch
    from tqdm.auto import tqdm

    from vocabtrim import eagle3 as e3
    from vocabtrim.calibrate import CounterPool, count_shards
    from vocabtrim.progress import Progress
    from vocabtrim.models import check_weights, load_tokenizer, resolve_model, tokenizer_fingerprint
    from vocabtrim.ray_utils import check_resources, default_cpus_per_worker, init_ray, wait_ready

    c = config
    wall = time.perf_counter()
    _check_config(c)
    tokenizer = load_tokenizer(c.target, c.trust_remote_code)
    where = resolve_model(c.target)  # a GGUF model converts once here, not in every actor
    check_weights(c.target)  # damaged weights refused now, not by the actors
    from transformers import AutoConfig

    tcfg = AutoConfig.from_pretrained(where, trust_remote_code=c.trust_remote_code)
    tcfg = tcfg.get_text_config(decoder=True)
    if getattr(tcfg, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        log.warning("train-drafter was tested on Llama targets; %s may need another drafter layout", getattr(tcfg, "model_type", None))
        check_target_layout(c.target, tcfg, c.trust_remote_code)
    V = max(int(tcfg.vocab_size), len(tokenizer))
    feature_layers = e3.default_feature_layers(int(tcfg.num_hidden_layers))
    init_info = {}
    if c.init_from_target:
        if c.intermediate_size not in (None, int(tcfg.intermediate_size)):
            raise UserError(f"--intermediate-size {c.intermediate_size} differs from the target's {tcfg.intermediate_size}: "
                            "--init-from-target copies a target layer (leave one of the flags out)")
        heads, hidden = int(tcfg.num_attention_heads), int(tcfg.hidden_size)
        head_dim = int(getattr(tcfg, "head_dim", None) or hidden // heads)
        if heads * head_dim != hidden:
            raise UserError(f"--init-from-target: the target's attention is {heads} heads of {head_dim}, not its hidden size of {hidden}, "
                            "and a drafter layer's is: its layer cannot start as the target's (leave the flag out)")
        init_info = {"init_from_target_layer": target_layer_index(feature_layers, int(tcfg.num_hidden_layers))}
    if c.init is not None:
        from vocabtrim.models import load_eagle3_checked

        init = load_eagle3_checked(c.init, int(tcfg.vocab_size), int(tcfg.hidden_size), target_tokenizer=tokenizer,
                                   trust_remote_code=c.trust_remote_code, dtype=torch.float32)
        if int(init.config.hidden_size) != int(tcfg.hidden_size):  # its embedding gives way to the target's
            raise UserError(f"--init {c.init}: a drafter of hidden size {init.config.hidden_size} with its own embedding; "
                            f"train-drafter trains on the target's embedding, of {tcfg.hidden_size}")
        if c.intermediate_size is not None and c.intermediate_size != init.config.intermediate_size:
            raise UserError(f"--intermediate-size {c.intermediate_size} differs from --init's {init.config.intermediate_size}: "
                            "a fine-tuned drafter keeps its shape (leave the flag out)")
        feature_layers = init.feature_layers(int(tcfg.num_hidden_layers))
        init_info = {"init": storage.display(c.init)}
    if c.histogram is not None:
        draft_ids, vocab_info = draft_vocabulary(c, tokenizer, int(tcfg.vocab_size))
    else:
        draft_ids, vocab_info = [int(i) for i in init.token_ids], {}
    vocab_info.update(init_info)
    shards = corpus.make_shards(c.corpus, c.text_column, 16 << 10, c.shard_rows, messages=c.source == "target")
    if not shards or corpus.file_rows(shards) == 0:
        raise UserError(f"the corpus is empty: no rows in {' '.join(map(storage.display, c.corpus))}")
    with_messages = next((s for s in shards if s.messages), None)
    if with_messages is not None:
        check_message_lists("auto", tokenizer, c.target, f"{storage.display(with_messages.path)} holds message lists in {c.text_column!r}")
    shards = shards[: c.max_shards] if c.max_shards is not None else shards
    train_ids, eval_ids = held_out_split([s.shard_id for s in shards], c.held_out)
    ours = any(storage.is_file(storage.join(c.out, name)) for name in (TRAINING_FILE, STATE_FILE))  # an interrupted run's
    storage.check_out_kind(c.out, MANIFEST_KIND, overwrites=() if ours else ("config.json", e3.WEIGHTS_FILE))
    ledger = FeatureLedger(storage.join(c.out, "features"))
    fp = tokenizer_fingerprint(tokenizer)
    # Version 2: --source corpus rows carry the tokenizer's special tokens (BOS); version 1 of them did not.
    features = {"version": 2 if c.source == "corpus" else 1, "tokenizer_fingerprint": fp, "target": c.target, "source": c.source, "text_column": c.text_column,
                "max_length": c.max_length, "max_new_tokens": c.max_new_tokens if c.source == "target" else None,
                "temperature": c.temperature if c.source == "target" else None, "seed": c.seed, "feature_layers": list(feature_layers),
                "dtype": c.dtype, **({"device": "cuda"} if c.gpus_per_worker > 0 else {})}  # no key on the CPU: older ledgers
    template = template_sha256(tokenizer) if c.source == "target" else None  # the template prompts go through
    if template:  # none where none is used, as ledgers written before it was recorded (a later key: Ledger.LATER_KEYS)
        features[TEMPLATE_KEY] = template
    ledger_recorded = storage.is_file(storage.join(ledger.folder, ledger.RUN_FILE))
    ledger.claim(features)
    # A resumed drafter keeps training as it began: the same rows and features, the same held-out shards, batches and
    # steps (--shuffle-gb is the machine's memory, not a setting: features over it are shuffled a window at a time,
    # in windows that change with it from the next epoch on). The features' settings are recorded here too: removing features/ removes the ledger's own record.
    settings = training_settings(c, draft_ids, train_ids, eval_ids, features)
    if ledger_recorded and "features" not in _recorded(c.out):  # a record from before the key: the ledger checked them
        settings.pop("features")
    storage.claim(c.out, TRAINING_FILE, settings, what="a drafter",
                  binds=lambda: storage.is_file(storage.join(c.out, STATE_FILE)), stray=lambda name: False, later=Ledger.LATER_KEYS)
    todo = [s for s in shards if not ledger.done(s.shard_id)]
    init_ray(c.address)
    cpus = c.cpus_per_worker or default_cpus_per_worker(c.workers)
    gpus = c.gpus_per_worker if c.gpus_per_worker > 0 else 0
    trainer_cpus = c.cpus_per_worker or default_cpus_per_worker(1)
    check_resources(1, gpus, trainer_cpus)  # the training actor, before any extraction
    t0 = time.perf_counter()
    extract_seconds = 0.0
    if todo:
        spec = ExtractorSpec(
            target=c.target, source=c.source, text_column=c.text_column, feature_layers=tuple(feature_layers), max_length=c.max_length,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed, dtype=c.dtype,
            trust_remote_code=c.trust_remote_code, threads=max(1, int(cpus)), use_gpu=c.gpus_per_worker > 0,
            batch_rows=c.shard_rows if c.source == "target" else 8,  # generation: one batch per shard
            wrap_prompts=has_chat_template(tokenizer),
        )
        # Workers beyond the shards to extract are not started (nor asked of the cluster).
        with CounterPool(spec, min(c.workers, len(todo)), cpus_per_worker=cpus, gpus_per_worker=c.gpus_per_worker,
                         actor_class=FeatureExtractor) as pool:
            pool.wait_ready()
            bar = Progress(len(shards), "shard", "features", initial=len(shards) - len(todo), enabled=c.show_progress)
            try:
                count_shards(pool, todo, ledger, progress=bar, method="extract")
            finally:
                bar.close()
        extract_seconds = time.perf_counter() - t0
    Trainer = ray.remote(DrafterTrainer).options(num_cpus=trainer_cpus, num_gpus=gpus)
    trainer = Trainer.remote(asdict(c), draft_ids, tuple(feature_layers), train_ids, eval_ids, max(1, int(trainer_cpus)))
    t1 = time.perf_counter()
    try:
        wait_ready([trainer.pid.remote()], "the training actor", shape=(trainer_cpus, gpus))
        epoch, _ = ray.get(trainer.position.remote())
        bar = tqdm(total=c.epochs, initial=min(epoch, c.epochs), unit="epoch", desc="train", dynamic_ncols=True,
                   disable=not (c.show_progress and sys.stderr.isatty()))
        history = []
        try:
            while epoch < c.epochs:
                steps = ray.get(trainer.begin_epoch.remote())
                if steps == 0:
                    raise UserError(
                        f"nothing to train on: every row of the training shards is empty or shorter than {MIN_ROW_TOKENS} tokens "
                        f"(--corpus {' '.join(map(storage.display, c.corpus))}, --text-column {c.text_column})"
                    )
                while True:
                    part = ray.get(trainer.train_steps.remote(max(1, min(20, steps // 20 or 1))))
                    done = part["cursor"]
                    if part["loss"] is not None:
                        bar.set_postfix(step=f"{done}/{steps}", loss=f"{part['loss']:.3f}",
                                        acceptance=f"{part['train_acceptance']:.3f}" if part["train_acceptance"] is not None else "-")
                    if part["done"]:
                        break
                record = ray.get(trainer.end_epoch.remote())
                history.append(record)
                epoch = record["epoch"]
                acc, chain = record["held_out_acceptance"], record.get("held_out_chain_acceptance")
                bar.set_postfix(loss=f"{record['loss']:.3f}" if record["loss"] is not None else "-",
                                held_out_acceptance=f"{acc:.3f}" if acc is not None else "-",
                                chain_acceptance=f"{chain:.3f}" if chain is not None else "-", refresh=False)
                bar.update(1)
                log.info("epoch %d: %s", epoch, record)
        finally:
            bar.close()
        all_epochs = ray.get(trainer.records.remote())
        if not history:  # nothing left to train: report the state reached
            history = all_epochs[-1:]
            if not storage.is_file(storage.join(c.out, e3.WEIGHTS_FILE)):
                ray.get(trainer.save.remote())
    except ray.exceptions.RayError as exc:  # the training actor died or raised (out of memory, a device fault)
        from vocabtrim.errors import RunFailed
        from vocabtrim.ray_utils import user_error_in

        raise user_error_in(exc) or RunFailed(f"the training actor failed ({first_line(exc)}): rerun the same command to resume "
                                              "from its last checkpoint") from exc
    finally:
        ray.kill(trainer, no_restart=True)
    train_seconds = time.perf_counter() - t1
    _copy_tokenizer(tokenizer, c.out)
    last = history[-1] if history else {}
    manifest = {
        "kind": MANIFEST_KIND, "version": 1, "target": c.target, "tokenizer_fingerprint": fp, "source": c.source,
        "corpus": [storage.display(p) for p in c.corpus], "text_column": c.text_column, "draft_vocab_size": len(draft_ids), "vocab_size": V,
        "feature_layers": list(feature_layers), **vocab_info, "shards": len(shards), "shards_extracted": len(todo),
        "train_shards": len(train_ids), "held_out_shards": len(eval_ids), "epochs": max([c.epochs, *(r["epoch"] for r in all_epochs)]),
        "ttt_length": c.ttt_length,
        "learning_rate": c.learning_rate, "batch_size": c.batch_size, "shuffle_gb": c.shuffle_gb, "max_length": c.max_length,
        "objective": "EAGLE-3 training-time test (soft cross-entropy to the target over the draft vocabulary, step weights 0.8^s)",
        "epochs_run": history, "history": all_epochs, "loss": last.get("loss"), "held_out_acceptance": last.get("held_out_acceptance"),
        "held_out_acceptance_per_step": last.get("held_out_acceptance_per_step"),
        "held_out_chain_acceptance": last.get("held_out_chain_acceptance"), "held_out_tokens_per_step": last.get("held_out_tokens_per_step"),
        "extract_seconds": round(extract_seconds, 1), "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    storage.atomic_write(storage.join(c.out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


def _copy_tokenizer(tokenizer, out: str) -> None:
    """The target's tokenizer files beside the drafter (so ``build-head`` and the pair check find it)."""
    if storage.is_local(out):
        tokenizer.save_pretrained(storage.local_path(out))
