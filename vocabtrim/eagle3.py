"""The EAGLE-3 draft model (Li et al., 2025), in the checkpoint layout SpecForge writes and vLLM / SGLang load.

One Llama decoder layer (``midlayer``) whose q/k/v read 2 x hidden: the normed token embedding
concatenated with a normed *feature*. The feature is either the target's hidden states of three
layers (low, middle, high) fused by ``fc`` [hidden, 3 x target_hidden], or, from the second draft of a
chain on, the drafter's own previous output (its pre-norm hidden state). ``norm`` and ``lm_head``
[K, hidden] give logits over the *draft vocabulary*; draft id i is target id ``i + d2t[i]``, and
``t2d`` (bool [V]) marks the target ids in the draft vocabulary.

Alignment (as SpecForge trains it): the drafter's entry at position j reads the target's feature at
position j and the token at position j + 1, and predicts the token at position j + 2.

Checkpoint folder: ``config.json`` (``architectures: ["LlamaForCausalLMEagle3"]``, ``vocab_size`` = the
target's, ``draft_vocab_size``, Llama fields, optional ``target_hidden_size``) and safetensors with
``midlayer.*``, ``fc.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t`` (int64 [K]), ``t2d`` (bool [V])
and optionally ``embed_tokens.weight`` (else the target's embedding is used).

Target layers read: ``hidden_states`` indices ``(2, L // 2, L - 3)`` of an L-layer target (index 0 is the
embeddings, i the output of decoder layer i - 1), as vLLM's and SGLang's defaults; a config's
``eagle_config.eagle_aux_hidden_state_layer_ids`` (SpecForge / SGLang numbering: the output of layer
i, i.e. index i + 1) overrides it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vocabtrim.errors import UserError, first_line, user_error_unless_fault

ARCHITECTURE = "LlamaForCausalLMEagle3"
ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM")
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# The module (parameter names are the checkpoint's tensor names)
# ---------------------------------------------------------------------------------------------


class _Norm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class _MidLayer(nn.Module):
    def __init__(self, c: "Eagle3Config"):
        super().__init__()
        self.self_attn = _Attention(c.hidden_size, c.heads, c.kv_heads, c.head_dim, c.attention_bias)
        self.mlp = _MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = _Norm(c.hidden_size)
        self.hidden_norm = _Norm(c.hidden_size)
        self.post_attention_layernorm = _Norm(c.hidden_size)


@dataclass
class Eagle3Config:
    """The fields of an EAGLE-3 ``config.json`` that shape the model (``raw`` keeps the whole file)."""

    raw: dict
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    hidden_act: str = "silu"
    attention_bias: bool = False
    norm_before_residual: bool = False
    aux_layer_ids: tuple[int, ...] | None = None  # SpecForge numbering (output of layer i), or None: the default

    @classmethod
    def from_dict(cls, raw: dict) -> "Eagle3Config":
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            eagle = raw.get("eagle_config") or {}
            aux = eagle.get("eagle_aux_hidden_state_layer_ids") or raw.get("eagle_aux_hidden_state_layer_ids")
            return cls(
                raw=dict(raw),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                heads=heads,
                kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                vocab_size=int(raw["vocab_size"]),
                draft_vocab_size=int(raw.get("draft_vocab_size") or raw["vocab_size"]),
                target_hidden_size=int(raw.get("target_hidden_size") or hidden),
                hidden_act=str(raw.get("hidden_act", "silu")),
                attention_bias=bool(raw.get("attention_bias", False)),
                norm_before_residual=bool(raw.get("norm_before_residual", False)),
                aux_layer_ids=tuple(int(i) for i in aux) if aux else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"not an EAGLE-3 config.json: {type(exc).__name__} {first_line(exc)}") from exc

    def llama_config(self):
        """A transformers ``LlamaConfig`` with these fields (for the rotary embedding's frequencies)."""
        from transformers import LlamaConfig

        keep = {k: v for k, v in self.raw.items() if k in ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "partial_rotary_factor")}
        return LlamaConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size, vocab_size=self.vocab_size, **keep,
        )


def make_config(
    target_config, draft_vocab_size: int, *, hidden_size: int | None = None, intermediate_size: int | None = None,
    heads: int | None = None, kv_heads: int | None = None,
) -> dict:
    """A ``config.json`` dict for a new drafter of ``target_config`` (a transformers config): the target's
    Llama shape by default, one layer, ``draft_vocab_size`` rows in the head."""
    t = target_config
    hidden = hidden_size or t.hidden_size
    heads = heads or t.num_attention_heads
    raw = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_act": getattr(t, "hidden_act", "silu"),
        "hidden_size": hidden,
        "intermediate_size": intermediate_size or t.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or getattr(t, "num_key_value_heads", heads),
        "head_dim": hidden // heads,
        "num_hidden_layers": 1,
        "rms_norm_eps": float(getattr(t, "rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(getattr(t, "max_position_embeddings", 2048)),
        "vocab_size": int(t.vocab_size),
        "draft_vocab_size": int(draft_vocab_size),
        "tie_word_embeddings": False,
        "bos_token_id": getattr(t, "bos_token_id", None),
        "eos_token_id": getattr(t, "eos_token_id", None),
        "pad_token_id": getattr(t, "pad_token_id", None),
    }
    rope = getattr(t, "rope_parameters", None)
    if isinstance(rope, dict):
        raw["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raw["rope_scaling"] = dict(rope)
    if hidden != t.hidden_size:
        raw["target_hidden_size"] = int(t.hidden_size)
    return raw


class Eagle3Model(nn.Module):
    """The EAGLE-3 drafter's weights; its ``state_dict`` names are the checkpoint's tensor names.

    ``embed_tokens`` is the checkpoint's own embedding when it has one; otherwise ``set_embedding``
    supplies the target's (not saved).
    """

    def __init__(self, config: Eagle3Config, *, with_embedding: bool = False):
        super().__init__()
        c = self.config = config
        self.midlayer = _MidLayer(c)
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.norm = _Norm(c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool))
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if with_embedding else None
        object.__setattr__(self, "_target_embedding", None)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        # Kept out of the module tree: ``.to(dtype)`` must not round its float32 frequencies.
        object.__setattr__(self, "rotary", LlamaRotaryEmbedding(c.llama_config()))

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def token_ids(self) -> torch.Tensor:
        """int64 [K]: the target id of each draft id (``i + d2t[i]``)."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, token_ids: torch.Tensor) -> None:
        """Set ``d2t``/``t2d`` from the sorted target ids of the draft vocabulary (int64 [K])."""
        ids = token_ids.to(torch.int64).cpu()
        self.d2t = (ids - torch.arange(ids.shape[0])).to(self.d2t.device)
        t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        self.t2d = t2d.to(self.t2d.device)

    # -- embeddings and target layers ---------------------------------------------------------

    def set_embedding(self, weight: torch.Tensor) -> None:
        """Use the target's token embedding [V, hidden] (shared, not copied, not saved)."""
        object.__setattr__(self, "_target_embedding", weight)  # not registered: never in state_dict

    def embedding(self) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens.weight
        if self._target_embedding is None:
            raise RuntimeError("this EAGLE-3 checkpoint has no embed_tokens: call set_embedding(target embedding)")
        return self._target_embedding

    def feature_layers(self, target_layers: int) -> tuple[int, int, int]:
        """Indices into an L-layer target's ``hidden_states`` that ``fc`` reads, low to high."""
        if self.config.aux_layer_ids is not None:
            return tuple(i + 1 for i in self.config.aux_layer_ids)  # type: ignore[return-value]
        return default_feature_layers(target_layers)


def default_feature_layers(target_layers: int) -> tuple[int, int, int]:
    """``(2, L // 2, L - 3)`` as vLLM and SGLang capture them (clamped into 0..L for tiny targets)."""
    L = target_layers
    return tuple(min(max(i, 0), L) for i in (2, L // 2, L - 3))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: x [..., H] normalised in float32, cast back, scaled by weight [H]."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fuse(model: Eagle3Model, features: torch.Tensor) -> torch.Tensor:
    """The target's three layers [..., 3 x target_hidden] → the drafter's feature [..., hidden] (``fc``)."""
    return model.fc(features.to(model.fc.weight.dtype))


def embed(model: Eagle3Model, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [...] (target vocabulary) → embeddings [..., hidden] in the drafter's dtype."""
    weight = model.embedding()
    return F.embedding(tokens.to(weight.device), weight).to(model.fc.weight.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, h, Q, d]; cos/sin [n, Q, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def layer_in(model: Eagle3Model, emb: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor):
    """The decoder layer up to attention.

    emb, feature: [n, Q, hidden]; positions: [n, Q] int64 (rotary positions, clamped at 0).
    Returns q [n, heads, Q, d], k and v [n, kv_heads, Q, d] (rotary applied), residual [n, Q, hidden].
    """
    c, m = model.config, model.midlayer
    eps = c.rms_norm_eps
    e = rms_norm(emb, m.input_layernorm.weight, eps)
    h = rms_norm(feature, m.hidden_norm.weight, eps)
    residual = h if c.norm_before_residual else feature
    x = torch.cat([e, h], dim=-1)
    n, Q, _ = x.shape
    a = m.self_attn
    q = a.q_proj(x).view(n, Q, c.heads, c.head_dim).transpose(1, 2)
    k = a.k_proj(x).view(n, Q, c.kv_heads, c.head_dim).transpose(1, 2)
    v = a.v_proj(x).view(n, Q, c.kv_heads, c.head_dim).transpose(1, 2)
    rotary = model.rotary
    if rotary.inv_freq.device != v.device:
        rotary.to(v.device)
    cos, sin = rotary(v.float(), positions.clamp(min=0))
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return _rope(q, cos, sin), _rope(k, cos, sin), v, residual


def layer_out(model: Eagle3Model, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """attn [n, heads, Q, d] → the layer's pre-norm output [n, Q, hidden] (o_proj, residual, MLP, residual)."""
    c, m = model.config, model.midlayer
    n, _, Q, _ = attn.shape
    h = m.self_attn.o_proj(attn.transpose(1, 2).reshape(n, Q, c.heads * c.head_dim)) + residual
    x = rms_norm(h, m.post_attention_layernorm.weight, c.rms_norm_eps)
    act = F.silu if c.hidden_act == "silu" else getattr(F, c.hidden_act)
    return h + m.mlp.down_proj(act(m.mlp.gate_proj(x)) * m.mlp.up_proj(x))


def logits(model: Eagle3Model, hidden: torch.Tensor) -> torch.Tensor:
    """Pre-norm hidden [..., hidden] → logits over the draft vocabulary [..., K]."""
    return model.lm_head(rms_norm(hidden, model.norm.weight, model.config.rms_norm_eps))


# -- inference over a preallocated, position-indexed KV cache ----------------------------------


@dataclass
class KVCache:
    """The drafter layer's keys and values by slot and position: k, v [slots, kv_heads, capacity + 1, d].

    Column ``capacity`` is a scratch column: writes for invalid positions (< 0) go there, and no query
    ever attends to it. A rejected draft's entry is simply overwritten by the next write at its position.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, model: Eagle3Model, slots: int, capacity: int, device=None) -> "KVCache":
        c = model.config
        shape = (slots, c.kv_heads, capacity + 1, c.head_dim)
        dtype, device = model.fc.weight.dtype, device or model.fc.weight.device
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        for buf in (k, v):  # written in place by compiled passes, which replay as CUDA graphs only then
            torch._dynamo.mark_static_address(buf)
        return cls(k, v)

    @property
    def capacity(self) -> int:
        return self.k.shape[2] - 1


def cached_forward(
    model: Eagle3Model, cache: KVCache, rows: torch.Tensor | None, emb: torch.Tensor, feature: torch.Tensor,
    positions: torch.Tensor, span: int,
) -> torch.Tensor:
    """One drafter pass for Q positions per row, written into the cache at those positions.

    rows:      [n] int64 cache slots, or None for slots 0..n-1 (read in place: no copy of the cache).
    emb:       [n, Q, hidden] the tokens' embeddings (the token at position p + 1 for entry p).
    feature:   [n, Q, hidden] the fused target feature at p, or the drafter's own previous output.
    positions: [n, Q] int64 entry positions; -1 marks a padding query (written to the scratch column).
    span:      a host int > every valid position: columns 0..span-1 are attended to.
    Query at p attends to the row's entries at positions <= p. Returns the pre-norm output [n, Q, hidden].
    """
    q, k, v, residual = layer_in(model, emb, feature, positions)
    cols = torch.where(positions >= 0, positions, torch.full_like(positions, cache.capacity))
    r = (torch.arange(cols.shape[0], device=cols.device) if rows is None else rows)[:, None].expand_as(cols)
    cache.k[r, :, cols] = k.transpose(1, 2)
    cache.v[r, :, cols] = v.transpose(1, 2)
    if rows is None:
        keys, values = cache.k[: cols.shape[0], :, :span], cache.v[: cols.shape[0], :, :span]
    else:
        keys, values = cache.k[rows, :, :span], cache.v[rows, :, :span]
    key_pos = torch.arange(span, device=positions.device)
    mask = (key_pos[None, None, :] <= positions[:, :, None]) | (key_pos[None, None, :] == 0)  # a padding query sees column 0
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], enable_gqa=c_gqa(model))
    return layer_out(model, attn, residual)


def c_gqa(model: Eagle3Model) -> bool:
    return model.config.kv_heads != model.config.heads


# -- training: the training-time test (TTT) ---------------------------------------------------


def ttt_forward(
    model: Eagle3Model, emb_steps: list[torch.Tensor], fused: torch.Tensor, valid: torch.Tensor
) -> list[torch.Tensor]:
    """EAGLE-3's training-time test over whole sequences, unrolled for ``len(emb_steps)`` steps.

    fused:     [b, T, hidden] the fused target features at positions 0..T-1.
    emb_steps: step s's embeddings [b, T, hidden]: at index j, the token at position j + 1 + s.
    valid:     [b, T] bool, real (non-padding) positions.
    Step 0 at index j is the entry at position j, reading the target's feature; step s reads step
    s - 1's output at the same index and sits at position j + s, attending to the step-0 entries at
    positions <= j and to its own chain's entries (steps 1..s at index j) — exactly what inference's
    chain attends to. Returns each step's pre-norm output [b, T, hidden]; step s predicts the token at
    position j + 2 + s.
    """
    c = model.config
    b, T, _ = fused.shape
    positions = torch.arange(T, device=fused.device)[None].expand(b, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=fused.device).tril()
    mask0 = causal[None] & valid[:, None, :]  # [b, T, T]
    scale = 1.0 / math.sqrt(c.head_dim)
    rep = c.heads // c.kv_heads
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outputs = []
    feature = fused
    for s, emb in enumerate(emb_steps):
        q, k, v, residual = layer_in(model, emb, feature, positions + s)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        keys.append(k)
        values.append(v)
        scores0 = (q @ keys[0].transpose(-1, -2)) * scale  # [b, h, T, T]
        scores0 = scores0.masked_fill(~mask0[:, None], float("-inf"))
        diag = [(q * kk).sum(-1, keepdim=True) * scale for kk in keys[1:]]  # [b, h, T, 1] each
        weights = torch.softmax(torch.cat([scores0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
        attn = weights[..., :T] @ values[0]
        for i, vv in enumerate(values[1:]):
            attn = attn + weights[..., T + i : T + i + 1] * vv
        out = layer_out(model, attn, residual)
        outputs.append(out)
        feature = out
    return outputs


# ---------------------------------------------------------------------------------------------
# Folders: recognise, load (with the checks), save
# ---------------------------------------------------------------------------------------------


def is_eagle3_folder(name: str | os.PathLike | None) -> bool:
    """True when ``name`` is a local folder whose config.json names an EAGLE-3 architecture."""
    if not name:
        return False
    path = Path(os.fspath(name)).expanduser()
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except ValueError as exc:  # no folder's config.json may be broken: say so, not what it lacks for its kind
        raise UserError(f"{config} is not valid JSON ({first_line(exc)})") from exc
    except OSError as exc:  # an I/O fault is the machine's (retried); a permission, the user's to see
        user_error_unless_fault(exc, f"{config} is unreadable ({first_line(exc)})")
    return isinstance(raw, dict) and any(a in ARCHITECTURES for a in raw.get("architectures") or [])


@dataclass(frozen=True)
class _Stored:
    """Where a checkpoint tensor is and its shape, as the safetensors header says (its data not read)."""

    path: Path
    shape: tuple[int, ...]


def _stored_tensors(folder: Path) -> dict[str, _Stored]:
    """The tensors of a folder's safetensors files, read from their headers only. A damaged header or a file
    shorter than its header says is refused in one line."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"EAGLE-3 folder {folder} has no .safetensors weights (only safetensors are read)")
    stored: dict[str, _Stored] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():
                    stored[name] = _Stored(f, tuple(reader.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as exc:
            user_error_unless_fault(exc, f"cannot read {f}: {first_line(exc)}")
    return stored


def _load_stored(stored: dict[str, _Stored], names) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (each in ``stored``), read from their files."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(stored[name].path, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for f, in_file in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as reader:
                tensors.update({name: reader.get_tensor(name) for name in in_file})
        except (SafetensorError, OSError) as exc:
            user_error_unless_fault(exc, f"cannot read {f}: {first_line(exc)}")
    return tensors


def _reason(exc: BaseException) -> str:
    """The last non-empty line of an error's message (transformers' validation errors end with the reason)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class CheckedCheckpoint:
    """An EAGLE-3 checkpoint folder whose config and tensor layout passed ``check_eagle3``."""

    folder: Path
    config: Eagle3Config
    stored: dict[str, _Stored]
    expected: dict[str, tuple[int, ...]]  # the model's state_dict shapes (d2t and t2d included)
    token_ids: torch.Tensor  # int64 [K]: the target id of each draft id, in the checkpoint's order
    t2d: torch.Tensor  # bool [V]

    @property
    def with_embedding(self) -> bool:
        return "embed_tokens.weight" in self.stored


def check_eagle3(
    folder: str | os.PathLike, *, target_vocab: int | None = None, target_hidden: int | None = None,
    embedding_width: int | None = None,
) -> CheckedCheckpoint:
    """Check an EAGLE-3 checkpoint folder against its target, reading the config, the safetensors headers and
    ``d2t``/``t2d`` only (no weights).

    One-line refusals (UserError): a config that is not EAGLE-3, missing or misshapen tensors, ``t2d``
    not as long as the target's vocabulary (``target_vocab``), ``d2t`` mapping outside it (or to one id
    twice), ``t2d`` and ``d2t`` disagreeing, a hidden size that is not the target's (``target_hidden``), no
    ``embed_tokens`` and a hidden size that is not the target embedding's width (``embedding_width``).
    """
    folder = Path(os.fspath(folder)).expanduser()
    if not is_eagle3_folder(folder):
        raise UserError(f"{folder} is not an EAGLE-3 checkpoint (config.json architectures must name {ARCHITECTURE})")
    shown = str(folder)
    try:
        config = Eagle3Config.from_dict(json.loads((folder / "config.json").read_text()))
        config.llama_config()  # transformers' own checks of the layer's shape (heads dividing the hidden size, ...)
    except UserError:
        raise
    except Exception as exc:
        user_error_unless_fault(exc, f"EAGLE-3 checkpoint {shown}: its config.json does not describe a drafter ({_reason(exc)})")
    if config.raw.get("fc_norm"):
        raise UserError(f"{folder}: fc_norm EAGLE-3 variants are not supported")
    stored = _stored_tensors(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Eagle3Model(config, with_embedding="embed_tokens.weight" in stored).state_dict().items()}
    V, K = config.vocab_size, config.draft_vocab_size
    full = K == V  # a full draft vocabulary: vLLM's loader refuses a d2t then, so it may be absent (the identity)
    missing = sorted(set(expected) - set(stored) - ({"d2t", "t2d"} if full else set()))
    if missing:
        raise UserError(f"EAGLE-3 checkpoint {shown} lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if name in ("d2t", "t2d"):
            continue
        if stored[name].shape != shape:
            raise UserError(f"EAGLE-3 checkpoint {shown}: {name} has shape {list(stored[name].shape)}, its config says {list(shape)}")
    maps = _load_stored(stored, [n for n in ("d2t", "t2d") if n in stored])
    d2t = maps.get("d2t", torch.zeros(K, dtype=torch.int64))
    t2d = maps.get("t2d", torch.ones(V, dtype=torch.bool))
    if target_vocab is not None and (t2d.dim() != 1 or t2d.shape[0] != target_vocab):
        raise UserError(
            f"EAGLE-3 checkpoint {shown} is for a vocabulary of {t2d.shape[0] if t2d.dim() == 1 else list(t2d.shape)} ids "
            f"(t2d length), the target has {target_vocab}: train a drafter for this target"
        )
    if t2d.dim() != 1 or t2d.shape[0] != V:
        raise UserError(f"EAGLE-3 checkpoint {shown}: t2d has shape {list(t2d.shape)}, its config's vocab_size is {V}")
    if d2t.dim() != 1 or d2t.shape[0] != K or d2t.dtype not in (torch.int64, torch.int32):
        raise UserError(f"EAGLE-3 checkpoint {shown}: d2t must be int64 [{K}] (draft_vocab_size), got {d2t.dtype} {list(d2t.shape)}")
    ids = torch.arange(K) + d2t.to(torch.int64)
    bad = ((ids < 0) | (ids >= V)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise UserError(f"EAGLE-3 checkpoint {shown}: d2t maps draft id {i} to target id {int(ids[i])}, outside the vocabulary of {V}")
    if ids.unique().numel() != K:
        raise UserError(f"EAGLE-3 checkpoint {shown}: d2t maps two draft ids to one target id")
    mask = t2d.to(torch.bool)
    if int(mask.sum()) != K or not bool(mask[ids].all()):
        raise UserError(f"EAGLE-3 checkpoint {shown}: t2d marks {int(mask.sum())} target ids but d2t maps {K} others")
    hidden_in = config.target_hidden_size
    if target_hidden is not None and hidden_in != target_hidden:
        raise UserError(
            f"EAGLE-3 checkpoint {shown} reads target hidden size {hidden_in}, the target's is {target_hidden}: train a drafter for this target"
        )
    if "embed_tokens.weight" not in stored and embedding_width is not None and embedding_width != config.hidden_size:
        raise UserError(
            f"EAGLE-3 checkpoint {shown} has no embed_tokens and hidden size {config.hidden_size}, the target's embedding has "
            f"{embedding_width}"
        )
    return CheckedCheckpoint(folder=folder, config=config, stored=stored, expected=expected, token_ids=ids, t2d=mask)


def load_eagle3(
    folder: str | os.PathLike, *, target_vocab: int | None = None, target_hidden: int | None = None,
    target_embedding: torch.Tensor | None = None, dtype: torch.dtype | None = None, device=None,
) -> Eagle3Model:
    """Read an EAGLE-3 checkpoint folder, after ``check_eagle3`` against its target (``target_embedding``:
    the target's [V, hidden], used when the checkpoint has no ``embed_tokens``). A draft vocabulary stored out
    of id order is sorted (lm_head rows permuted with it), so ``token_ids`` is always ascending."""
    checked = check_eagle3(folder, target_vocab=target_vocab, target_hidden=target_hidden,
                           embedding_width=None if target_embedding is None else int(target_embedding.shape[1]))
    ids, K = checked.token_ids, checked.config.draft_vocab_size
    state = _load_stored(checked.stored, [n for n in checked.expected if n not in ("d2t", "t2d")])
    model = Eagle3Model(checked.config, with_embedding=checked.with_embedding)
    order = torch.argsort(ids)
    state["lm_head.weight"] = state["lm_head.weight"][order]
    state["d2t"] = ids[order] - torch.arange(K)
    state["t2d"] = checked.t2d
    model.to(dtype or state["lm_head.weight"].dtype)  # the checkpoint's own dtype unless told otherwise
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device)
    if target_embedding is not None and not checked.with_embedding:
        model.set_embedding(target_embedding)
    model.eval()
    model.requires_grad_(False)
    return model


def save_eagle3(model: Eagle3Model, folder: str | os.PathLike, *, dtype: torch.dtype | None = None, extra_files: dict | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` in SpecForge's layout (``d2t`` int64, ``t2d`` bool).

    A draft vocabulary that is the target's whole vocabulary is written without ``d2t`` (the identity), as
    vLLM's ``Eagle3LlamaForCausalLM`` loads it: it has no ``d2t`` parameter then and refuses one."""
    from safetensors.torch import save_file

    from vocabtrim import storage

    folder = os.fspath(folder)
    storage.makedirs(folder)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    if model.config.draft_vocab_size == model.config.vocab_size:
        del tensors["d2t"]
    raw = dict(model.config.raw)
    raw["architectures"] = [ARCHITECTURE]
    raw["draft_vocab_size"] = int(model.config.draft_vocab_size)
    raw["torch_dtype"] = str(tensors["lm_head.weight"].dtype).removeprefix("torch.")  # what is written, not what was read
    storage.atomic_write(storage.join(folder, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    storage.atomic_write(storage.join(folder, "config.json"), json.dumps(raw, indent=2).encode())
    for name, data in (extra_files or {}).items():
        storage.atomic_write(storage.join(folder, name), data)


def _with_vocabulary(model: Eagle3Model, token_ids: torch.Tensor, lm_head: torch.Tensor) -> Eagle3Model:
    """A new drafter whose draft vocabulary is the sorted target ids ``token_ids`` (int64 [K]) with head rows
    ``lm_head`` [K, hidden]: new ``d2t``/``t2d``, every other tensor copied from ``model``."""
    config = Eagle3Config.from_dict({**model.config.raw, "draft_vocab_size": int(token_ids.numel())})
    new = Eagle3Model(config, with_embedding=model.embed_tokens is not None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = lm_head
    state["d2t"] = token_ids - torch.arange(token_ids.numel())
    t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
    t2d[token_ids] = True
    state["t2d"] = t2d
    new.to(model.fc.weight.dtype)
    new.load_state_dict(state, strict=True)
    new.to(model.fc.weight.device)
    new.set_embedding(model._target_embedding)
    new.eval()
    new.requires_grad_(False)
    return new


def retrim(model: Eagle3Model, keep: torch.Tensor) -> Eagle3Model:
    """A new drafter whose draft vocabulary is the target ids ``keep`` (int64, each already in ``model``'s
    draft vocabulary): the lm_head rows of those ids and new ``d2t``/``t2d``; every other tensor copied."""
    current = model.token_ids.cpu()
    keep = keep.to(torch.int64).unique(sorted=True).cpu()
    rows = torch.searchsorted(current, keep).clamp(max=current.numel() - 1)
    if keep.numel() == 0 or not torch.equal(current[rows], keep):
        raise UserError("the kept ids must be a non-empty subset of the EAGLE-3 drafter's draft vocabulary")
    return _with_vocabulary(model, keep, model.lm_head.weight.detach().cpu()[rows])


def widen(model: Eagle3Model, target_head: torch.Tensor) -> Eagle3Model:
    """The same drafter with a full-vocabulary head: ``lm_head`` [V, hidden] is ``target_head`` (the target's
    LM head, [V, hidden]) with the drafter's own rows at its draft ids; ``d2t`` all zeros, ``t2d`` all true.
    The inverse of ``retrim`` on the drafter's draft ids; every other tensor copied."""
    V = model.config.vocab_size
    if tuple(target_head.shape) != (V, model.config.hidden_size):
        raise UserError(f"the target's head is {list(target_head.shape)}, the drafter needs [{V}, {model.config.hidden_size}]")
    own = model.lm_head.weight.detach().cpu()
    head = target_head.detach().to("cpu", own.dtype).clone()
    head[model.token_ids.cpu()] = own
    return _with_vocabulary(model, torch.arange(V), head)
