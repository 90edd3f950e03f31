"""``--engine vllm``: vLLM (its CPU build here) as the engine of ``vocabtrim generate``.

- refusals in one line, with or without vLLM installed;
- the trimmed-head drafter model: placement and argmax on the K kept ids;
- losslessness with the trimmed-head drafter inside vLLM (chi-square against the target's exact law);
- ``generate --engine vllm`` through Ray on tiny models: greedy completions equal the native target
  alone, error rows, resume, the summary's vLLM metrics;
- ``calibrate --engine vllm`` on a tiny target: the native engine's histogram, resume, refusals;
- on the bundled model: greedy completions of vLLM equal the native engine's, target alone and with a
  drafter (full and trimmed head).

Each vLLM engine start costs 20-90 s on 2 cores: the module starts seven (three tiny, four bundled).
Without vLLM the tests that need it skip, unless ``VOCABTRIM_REQUIRE_VLLM=1`` (CI) makes that a failure.
"""

import contextlib
import importlib.util
import io
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from stats import chi_square_pvalue, exact_first_tokens
from tiny import make_model, make_tokenizer, noisy_copy, save_model

from vocabtrim import cli, vllm_sockets
from vocabtrim.errors import UserError
from vocabtrim.generate import GenerateConfig, run_generate

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("VOCABTRIM_REQUIRE_VLLM") == "1":
    raise RuntimeError("VOCABTRIM_REQUIRE_VLLM=1 but vLLM is not installed")
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (pip install 'vocabtrim[vllm]')")
os.environ.setdefault("VOCABTRIM_VLLM_ENFORCE_EAGER", "1")  # no torch.compile: engine starts in tests take ~20 s less
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ALPHA = 1e-4  # false-alarm rate of each distribution check (as in test_engine_sampling.py)


def tiny_llama(vocab_size, layers=2, seed=0):
    """A tiny Llama vLLM's CPU attention takes (head size 32: vLLM's CPU kernels start at 32)."""
    return make_model(vocab_size, layers=layers, hidden=64, heads=2, kv_heads=1, seed=seed, init_std=1.0)


def write_head(model, ids, folder, tokenizer=None):
    """A head folder as `vocabtrim build-head` writes it, for ``model``'s LM-head rows ``ids``."""
    from vocabtrim.head.io import drafter_architecture, save_head
    from vocabtrim.head.trimmed import head_from_ids
    from vocabtrim.models import head_rows_fingerprint, logits_width, tokenizer_fingerprint

    head = head_from_ids(model, ids)
    manifest = {"kind": "vocabtrim-head", "k": head.k, "vocab_size": logits_width(model),
                "drafter_fingerprint": head_rows_fingerprint(model), "drafter_architecture": drafter_architecture(model)}
    if tokenizer is not None:
        manifest["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    save_head(head, folder, manifest)
    return str(folder)


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(target, drafter, head, tokenizer): a tiny target, a noisy copy as drafter, a head on 2/3 of its ids."""
    root = tmp_path_factory.mktemp("vllm-tiny")
    tok = make_tokenizer(300)
    v = len(tok)
    target = tiny_llama(v, layers=2, seed=0)
    drafter = noisy_copy(target, scale=0.05)
    ids = [i for i in range(v) if i % 3 != 2 or i in (0, 1, 2)]
    head = write_head(drafter, ids, root / "head", tok)
    return save_model(target, tok, root / "target"), save_model(drafter, tok, root / "drafter"), head, tok


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-prompts")
    a = ["the quick brown fox", None, "What is the capital of France?", "", "def add(a, b):",
         "the quick brown fox jumps over the lazy dog " * 40, "speculative decoding drafts tokens", "1 2 3 4 5"]
    pq.write_table(pa.table({"id": pa.array(range(len(a)), pa.int64()), "prompt": a}), root / "a.parquet")
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    b = [[{"role": "user", "content": "Write a haiku about the sea."}], [], [{"role": "user", "content": "the lazy dog"}]]
    pq.write_table(pa.table({"id": ["b0", "b1", "b2"], "prompt": pa.array(b, msgs)}), root / "b.parquet")
    return root


def test_engine_vllm_without_vllm_says_how_to_install(tiny_pair_dirs, tmp_path, capsys, monkeypatch):
    target, drafter = tiny_pair_dirs
    good = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), good)
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where vLLM is not installed
    capsys.readouterr()
    code = cli.main(["generate", "--engine", "vllm", "--target", target, "--drafter", drafter, "--prompts", str(good),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install 'vocabtrim[vllm]'" in err, err
    assert not (tmp_path / "out").exists()


def test_a_vllm_that_is_installed_but_cannot_be_imported_is_the_install_line_in_a_worker(monkeypatch):
    """PyPI's torchvision beside the local torch breaks `from vllm import LLM`: a worker says so in one line with the
    install advice (a UserError), instead of dying as a machine fault retried on fresh workers."""
    import importlib.machinery
    import types

    from vocabtrim.vllm_backend import require_vllm

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("operator torchvision::nms does not exist")

    broken = Broken("vllm")
    broken.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", broken)
    require_vllm(" (on node n1)")  # installed: the driver's quick check passes
    with pytest.raises(UserError) as refused:
        require_vllm(" (on node n1)", load=True)
    assert str(refused.value).startswith("vLLM is installed but cannot be imported (RuntimeError: operator torchvision::nms does not "
                                         "exist): --engine vllm needs vLLM: `pip install 'vocabtrim[vllm]'`")
    assert str(refused.value).endswith(" (on node n1)") and "\n" not in str(refused.value)


def test_calibrate_engine_vllm_refusals(tiny_pair_dirs, tmp_path, capsys, monkeypatch):
    """calibrate --engine vllm: counting a corpus runs no model (refused, vLLM or not); without vLLM, the line
    says how to install it. Nothing is written."""
    target, _ = tiny_pair_dirs
    good = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["hi there"]}), good)
    base = ["calibrate", "--engine", "vllm", "--drafter", target, "--corpus", str(good), "--out", str(tmp_path / "out")]
    for argv, says in ((base, "--source target or --source drafter"),
                       (base + ["--source", "target", "--target", target, "--temperature", "0.005"],
                        "--temperature must be 0 or at least 0.01 with --engine vllm"),
                       (base + ["--source", "target", "--target", target], "pip install 'vocabtrim[vllm]'")):
        if "target" in argv:
            monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where vLLM is not installed
        capsys.readouterr()
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and says in err, err
        assert not (tmp_path / "out").exists()


def test_a_cluster_driver_without_vllm_leaves_the_check_to_the_workers(tiny_pair_dirs, tmp_path, monkeypatch):
    """A run joining a cluster (``--address`` or ``RAY_ADDRESS``: a job's driver on a head node whose image has
    no vLLM) is not refused by the driver; each worker checks before it loads, and a worker without vLLM gives
    the install line naming its node, reported by ``info()`` (which the driver prints as one line)."""
    from vocabtrim.generate import GenerateWorker
    from vocabtrim.vllm_backend import INSTALL_HINT, check_calibrate_engine, check_generate_config, load_for_calibrate

    target, drafter = tiny_pair_dirs
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where vLLM is not installed
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = GenerateConfig(target=target, drafter=drafter, prompts=[], out=str(tmp_path / "o"), engine="vllm", gamma=3)
    with pytest.raises(UserError, match="vocabtrim\\[vllm\\]"):  # a local run: refused on the driver
        check_generate_config(cfg)
    with pytest.raises(UserError, match="vocabtrim\\[vllm\\]"):
        check_calibrate_engine("vllm", "target", 0)
    check_generate_config(replace(cfg, address="ray://head:10001"))
    check_calibrate_engine("vllm", "target", 0, "ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    check_generate_config(cfg)
    check_calibrate_engine("vllm", "target", 0)

    error = str(GenerateWorker({**cfg.__dict__, "address": None}, threads=1).info()["error"])
    assert error.startswith(INSTALL_HINT) and "Ray worker node" in error and "\n" not in error, error
    with pytest.raises(UserError) as refused:
        load_for_calibrate(target, None, None, temperature=0.0, max_new_tokens=4, batch_rows=2)
    assert str(refused.value) == error


def test_ngram_needs_the_vllm_engine(tiny_pair_dirs, tmp_path, capsys):
    target, _ = tiny_pair_dirs
    good = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), good)
    capsys.readouterr()
    assert cli.main(["generate", "--target", target, "--drafter", "ngram", "--prompts", str(good), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--drafter ngram needs --engine vllm" in err


@needs_vllm
def test_vllm_refusals_come_before_any_work(tiny_dirs, tmp_path, capsys):
    target, drafter, head, _ = tiny_dirs
    good = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), good)
    other_tok = make_tokenizer(280)
    other = save_model(tiny_llama(len(other_tok), layers=1), other_tok, tmp_path / "other")
    from transformers import AutoConfig

    from tiny import write_specforge_checkpoint

    tcfg = AutoConfig.from_pretrained(target)
    eagle3 = write_specforge_checkpoint(tmp_path / "eagle3", type("T", (), {"config": tcfg})(), range(0, tcfg.vocab_size, 2))
    cases = [
        (["--drafter", str(eagle3), "--head", head], "an EAGLE-3 drafter carries its own draft vocabulary"),
        (["--drafter", "ngram", "--head", head], "--drafter ngram takes neither --head nor --drafter-layers"),
        (["--drafter", other], "tokenizers differ"),
        (["--no-draft", "--head", head], "--head needs a drafter"),
        (["--drafter", drafter, "--gpus-per-worker", "0.5"], "whole GPUs"),
        (["--drafter", drafter, "--gpus-per-worker", "nan"], "whole GPUs"),
        (["--drafter", drafter, "--gpus-per-worker", "inf"], "whole GPUs"),
        (["--drafter", drafter, "--gamma", "auto"], "--gamma must be a number from 1 to 64 with --engine vllm"),
        (["--drafter", drafter, "--temperature", "0.005"], "--temperature must be 0 or at least 0.01 with --engine vllm"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        out = tmp_path / "out"
        gamma = [] if "--gamma" in extra else ["--gamma", "2"]
        assert cli.main(["generate", "--engine", "vllm", "--target", target, *extra, *gamma, "--prompts", str(good),
                         "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (message, err)
        assert not out.exists()


def test_a_truncated_drafter_of_a_sharded_checkpoint_is_one_folder_vllm_can_load(tmp_path):
    """--drafter-layers N of a checkpoint saved in shards: the truncated copy is written whole, and the source's shard
    index is not copied beside it (vLLM would look for the shards it names, and the folder is cached)."""
    from safetensors import safe_open

    from vocabtrim.vllm_backend import drafter_folder

    tok = make_tokenizer(300)
    source = tmp_path / "sharded"
    tiny_llama(len(tok), layers=3, seed=0).save_pretrained(source, max_shard_size="40KB")
    tok.save_pretrained(source)
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) > 1
    folder = Path(drafter_folder(str(source), 1, cache=tmp_path / "cache"))
    assert not list(folder.glob("*.index.json")), sorted(p.name for p in folder.iterdir())
    (weights,) = folder.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert layers == {"0"} and json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1


@needs_vllm
def test_settings_vllm_refuses_are_one_line_and_a_refused_engine_is_closed(tiny_dirs, tmp_path, monkeypatch):
    """vLLM's own checks of its settings (a pydantic ValidationError, say heads that tensor parallelism cannot
    split) reach the user as one line with vLLM's reason; a context too short for --max-new-tokens closes the engine
    it refuses. vLLM's ``LLM`` is replaced: no engine starts."""
    import vllm
    from pydantic import BaseModel, ValidationError, field_validator

    from vocabtrim.vllm_backend import load_for_generate

    class ParallelConfig(BaseModel):
        tensor_parallel_size: int

        @field_validator("tensor_parallel_size")
        @classmethod
        def divides(cls, value):
            raise ValueError("Total number of attention heads (9) must be divisible by tensor parallel size (2).")

    with pytest.raises(ValidationError) as caught:
        ParallelConfig(tensor_parallel_size=2)
    closed = []

    class Refusing:
        def __init__(self, **kwargs):
            raise caught.value

    class Short:
        def __init__(self, **kwargs):
            core = type("C", (), {"shutdown": lambda self: closed.append(1)})()
            self.llm_engine = type("E", (), {"model_config": type("M", (), {"max_model_len": 16})(), "engine_core": core})()

    target, _, _, _ = tiny_dirs
    cfg = GenerateConfig(target=target, prompts=[], out=str(tmp_path / "o"), engine="vllm", no_draft=True, max_new_tokens=64)
    monkeypatch.setattr(vllm, "LLM", Refusing)
    with pytest.raises(UserError) as refused:
        load_for_generate(cfg)
    assert str(refused.value) == ("vLLM cannot run these settings: Total number of attention heads (9) must be divisible by "
                                  "tensor parallel size (2).")
    monkeypatch.setattr(vllm, "LLM", Short)
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        load_for_generate(cfg)
    assert closed == [1]


@needs_vllm
def test_per_position_figures_count_the_drafts_each_step_made(tiny_dirs, monkeypatch):
    """vLLM's ngram proposer drafts 0 to gamma tokens a step: a row's reached_hist (summary.json's per-position
    acceptance) counts, per position, the steps that drafted it after accepting every draft before it, from vLLM's
    per-step counts. vLLM's ``LLM`` is replaced: no engine starts."""
    import vllm
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    from vocabtrim.vllm_backend import VllmEngine

    metrics = RequestSpecDecodeMetrics.new(3)
    for drafted, accepted in ((3, 3), (1, 1), (2, 0), (3, 1)):
        metrics.observe(drafted, accepted, detailed=True)
    seen = []

    class Fake:
        def __init__(self, **kwargs):
            seen.append(kwargs)
            self.llm_engine = type("E", (), {"model_config": type("M", (), {"max_model_len": 512})()})()

        def generate(self, prompts, params, use_tqdm=False):
            out = type("O", (), {"token_ids": list(range(10)), "finish_reason": "length", "spec_decode_metrics": metrics})()
            return [type("R", (), {"outputs": [out]})() for _ in prompts]

        def get_metrics(self):
            return []

    monkeypatch.setattr(vllm, "LLM", Fake)
    engine = VllmEngine(tiny_dirs[0], {"method": "ngram"}, gamma=3)
    try:
        assert seen[-1]["per_request_spec_decode_metrics"] == "detailed"
        (row,) = engine.generate([[5, 6, 7]], [0], max_new_tokens=10)
    finally:
        engine.close()
    assert row.accepted_hist == [1, 2, 0, 1] and row.proposed == 9 and row.accepted == 5
    # position 2 was drafted by the two steps of 3 drafts that accepted the first (not by the step of 1 draft)
    assert row.reached_hist == [4, 2, 1]


@needs_vllm
def test_gpus_per_worker_become_vllms_tensor_parallelism(tiny_dirs, tmp_path, monkeypatch):
    """``--gpus-per-worker G`` reaches vLLM as ``tensor_parallel_size=G``; with G > 1 its workers are its own
    processes on the actor's node (``mp``), never its Ray backend (which would ask Ray for the GPUs the actor
    holds), and with one GPU or none the model runs in vLLM's engine process (``uni``). vLLM's ``LLM`` is
    replaced by a recorder: no engine starts."""
    import vllm

    from vocabtrim.vllm_backend import load_for_generate

    seen = []

    class Recorder:
        def __init__(self, **kwargs):
            seen.append(kwargs)
            self.llm_engine = type("E", (), {"model_config": type("M", (), {"max_model_len": 512})()})()

    monkeypatch.setattr(vllm, "LLM", Recorder)
    target, drafter, head, _ = tiny_dirs
    cfg = GenerateConfig(target=target, drafter=drafter, prompts=[], out=str(tmp_path / "o"), engine="vllm", gamma=3)
    for gpus, backend in ((0, "uni"), (1, "uni"), (2, "mp"), (4, "mp")):
        engine, _, _ = load_for_generate(replace(cfg, gpus_per_worker=float(gpus)))
        assert (seen[-1]["tensor_parallel_size"], seen[-1]["distributed_executor_backend"]) == (max(1, gpus), backend)
        assert seen[-1]["speculative_config"]["num_speculative_tokens"] == 3 and engine.gamma == 3
    # Greedy drafting through get_top_tokens only where vLLM's class has it (its Llama, not its Qwen2: that one would
    # fail at the first step); stop ids from config.json where the target has no generation_config.json.
    assert seen[-1]["speculative_config"]["use_local_argmax_reduction"] is True
    import shutil

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(target)
    qwen = save_model(Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=2)), tok, tmp_path / "qwen2")
    load_for_generate(replace(cfg, drafter=qwen))
    assert "use_local_argmax_reduction" not in seen[-1]["speculative_config"]
    bare = tmp_path / "bare"
    shutil.copytree(target, bare)
    (bare / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "eos_token_id": [tok.eos_token_id, 7]}))
    engine, _, _ = load_for_generate(replace(cfg, target=str(bare), drafter=None, no_draft=True))
    assert engine.eos == sorted({tok.eos_token_id, 7})


@needs_vllm
def test_a_head_for_another_drafter_is_refused_when_the_folder_is_written(tiny_dirs, tmp_path):
    from vocabtrim.vllm_backend import drafter_folder

    target, _, head, _ = tiny_dirs  # the head holds the noisy drafter's rows, not the target's
    with pytest.raises(UserError, match="built for another drafter"):
        drafter_folder(target, None, head, cache=tmp_path)
    assert not list((tmp_path / "vllm-drafters").glob("*/config.json"))


# ------------------------------------------------------------------------------------------------
# The trimmed-head drafter model
# ------------------------------------------------------------------------------------------------


@needs_vllm
def test_trimmed_head_places_the_kept_logits_and_argmaxes_over_them():
    from vocabtrim.vllm_drafter import TrimmedLMHead

    g = torch.Generator().manual_seed(0)
    v, hidden = 50, 16
    full = torch.randn(v, hidden, generator=g)
    ids = torch.tensor([0, 3, 4, 9, 17, 30, 49])
    head = TrimmedLMHead(len(ids), hidden, v, has_bias=False, dtype=torch.float32)
    head.weight.data.copy_(full[ids])
    head.token_ids.copy_(ids)
    for n in (3, 5, 2):  # the buffer grows, then is reused by a smaller call
        h = torch.randn(n, hidden, generator=g)
        expected = torch.full((n, v), float("-inf"))
        expected[:, ids] = h @ full[ids].T
        placed = head.place(head(h))
        assert torch.allclose(placed, expected, atol=1e-5) and bool(torch.isinf(placed[:, [1, 2, 48]]).all())
        assert torch.equal(head.top_tokens(h), placed.argmax(-1))
        placed.div_(0.7)  # vLLM scales draft logits in place: dropped ids must stay -inf for the next call
    assert bool(torch.isinf(head.place(head(h))[:, [1, 2, 48]]).all())
    # After loading, the matmul runs through vLLM's CPU GEMM: the same logits, the same argmax.
    h = torch.randn(4, hidden, generator=g)
    before, top = head(h), head.top_tokens(h)
    head.prepare()
    assert head._linear is not torch.nn.functional.linear
    assert torch.allclose(head(h), before, atol=1e-4) and torch.equal(head.top_tokens(h), top)


def test_rows_settings_expand_to_their_draft_tokens():
    """What vLLM's rejection sampler needs of ``expand_batch_to_tokens``: each row's temperature, top-k or top-p
    for each of its draft tokens (rows without drafts take none), greedy's -1 temperature replaced by 1."""
    from vocabtrim.vllm_backend import expand_batch_to_tokens

    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # rows with 2, 0 and 3 draft tokens
    temperature = torch.tensor([0.7, 0.5, -1.0])
    assert expand_batch_to_tokens(temperature, cu, 5, replace_from=-1, replace_to=1).tolist() == pytest.approx(
        [0.7, 0.7, 1.0, 1.0, 1.0])
    top_k = torch.tensor([5, 3, 2], dtype=torch.int32)
    got = expand_batch_to_tokens(top_k, cu, 5)
    assert got.dtype == torch.int32 and got.tolist() == [5, 5, 2, 2, 2]


# ------------------------------------------------------------------------------------------------
# Losslessness: the first three tokens follow the target's exact law (tiny vocabulary, no tokenizer)
# ------------------------------------------------------------------------------------------------

SMALL_V = 8
PROMPT = [3, 5, 1]
KEPT = [0, 2, 3, 5, 6]
N_SAMPLES = 8000


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    """One vLLM engine: a tiny 8-token target and a noisy copy as drafter with a head on 5 of the 8 ids."""
    from vocabtrim.vllm_backend import VllmEngine, drafter_folder

    root = tmp_path_factory.mktemp("vllm-small")
    target = tiny_llama(SMALL_V, layers=2, seed=3)
    drafter = noisy_copy(target, scale=0.3)
    target.save_pretrained(root / "target")
    drafter.save_pretrained(root / "drafter")
    head = write_head(drafter, KEPT, root / "head")
    folder = drafter_folder(str(root / "drafter"), None, head, cache=root / "cache")
    engine = VllmEngine(str(root / "target"), {"method": "draft_model", "model": folder}, gamma=2, temperature=1.0,
                        max_new_tokens=3, max_num_seqs=256, skip_tokenizer_init=True)
    yield target, engine
    engine.close()


@needs_vllm
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 3)])
def test_trimmed_head_drafter_in_vllm_is_lossless(small_engine, temperature, top_p, top_k):
    """The first three tokens follow the target's law under each row's sampling settings. vLLM 0.32's CPU
    build alone fails this (chi-square p-value 0 at T=1: its C++ expansion of each row's temperature, top-p
    and top-k to its draft tokens leaves them uninitialised; with top-k its engine dies on the first decode
    step); vocabtrim's plugin mends both (``vllm_backend._mend_cpu_rejection_sampler``)."""
    from vocabtrim.engine.sampling import SamplingParams

    target, engine = small_engine
    engine.temperature, engine.top_p, engine.top_k = temperature, top_p, top_k
    try:
        outs = engine.generate([PROMPT] * N_SAMPLES, list(range(N_SAMPLES)))
    finally:
        engine.temperature, engine.top_p, engine.top_k = 1.0, 1.0, 0
    assert all(len(o.token_ids) == 3 for o in outs)
    index = torch.tensor([sum(t * SMALL_V ** (2 - k) for k, t in enumerate(o.token_ids)) for o in outs])
    counts = torch.bincount(index, minlength=SMALL_V**3)
    proposed, accepted = sum(o.proposed for o in outs), sum(o.accepted for o in outs)
    assert accepted > 100 and proposed - accepted > 100  # both the accept and the reject paths were taken often
    s = engine.last_stats
    assert s.spec_draft_tokens >= proposed and s.spec_accepted_tokens >= accepted > 0
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    exact = exact_first_tokens(target, PROMPT, params)
    # Power: as many draws from a lossy trimmed decoder (the target renormalised over the kept ids) fail the check.
    lossy = exact_first_tokens(target, PROMPT, params, support=KEPT)
    draws = torch.multinomial(lossy.float(), N_SAMPLES, replacement=True, generator=torch.Generator().manual_seed(0))
    assert chi_square_pvalue(torch.bincount(draws, minlength=SMALL_V**3), exact) < ALPHA
    assert chi_square_pvalue(counts, exact) > ALPHA


@needs_vllm
def test_trimmed_head_drafter_in_vllm_greedy_equals_native_target_alone(small_engine):
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    target, engine = small_engine
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SMALL_V, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (16,), generator=g)]
    engine.temperature = 0.0
    try:
        got = engine.generate(prompts, list(range(16)), max_new_tokens=8)
    finally:
        engine.temperature = 1.0
    native = make_engine(target, sampling=SamplingParams(temperature=0), max_new_tokens=8, batch_size=16)
    expected = native.generate(prompts, list(range(16)))
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert all(o.finish_reason == "length" for o in got)
    assert sum(o.proposed for o in got) > 0  # the trimmed-head drafter drafted


@needs_vllm
def test_rows_added_to_an_open_vllm_run_while_it_runs_equal_one_generate_call(small_engine):
    """``VllmEngine.open`` (a generate worker's chunks in one run, ``chunk_stream``): rows added in groups while
    earlier ones are in vLLM's engine give what one ``generate`` call gives, and the speculative counters of the
    run are those of the call."""
    _, engine = small_engine
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, SMALL_V, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (12,), generator=g)]
    seeds = list(range(100, 112))
    engine.temperature = 0.0
    try:
        expected = engine.generate(prompts, seeds, max_new_tokens=8)
        call = engine.last_stats
        run = engine.open(max_new_tokens=8)
        outs, steps = {}, 0
        for group in (range(0, 4), range(4, 9), range(9, 12)):
            run.add([prompts[i] for i in group], [seeds[i] for i in group])
            with pytest.raises(RuntimeError, match="open run has rows"):  # it would step the run's rows away
                engine.generate(prompts[:1], seeds[:1], max_new_tokens=8)
            for _ in range(2):
                outs.update(run.advance())
                steps += 1
        while run.busy:
            outs.update(run.advance())
            steps += 1
    finally:
        engine.temperature = 1.0
    assert [outs[i].token_ids for i in range(12)] == [o.token_ids for o in expected]
    assert sum(o.proposed for o in outs.values()) > 0 and steps > 6
    st = run.stats
    assert st.generated_tokens == call.generated_tokens and st.target_passes == sum(o.target_passes for o in outs.values())
    assert st.spec_draft_tokens >= sum(o.proposed for o in outs.values()) > 0
    assert run.advance() == [] and not run.busy


# ------------------------------------------------------------------------------------------------
# generate --engine vllm through Ray: rows, errors, resume, summary
# ------------------------------------------------------------------------------------------------


def rows(out, name):
    return pq.read_table(Path(out) / name).to_pylist()


@needs_vllm
def test_generate_with_vllm_rows_errors_resume_and_summary(ray_local, tiny_dirs, prompt_files, tmp_path):
    target, drafter, head, _ = tiny_dirs
    base = GenerateConfig(target=target, drafter=drafter, head=head, prompts=[str(prompt_files)], out=str(tmp_path / "vllm"),
                          max_new_tokens=10, temperature=0.0, gamma=3, batch_size=4, progress=False, engine="vllm")
    argv = ["generate", "--engine", "vllm", "--target", target, "--drafter", drafter, "--head", head, "--prompts",
            str(prompt_files), "--max-new-tokens", "10", "--temperature", "0", "--gamma", "3", "--batch-size", "4",
            "--no-progress", "--out", base.out]
    before = set(vllm_sockets.root().glob("*")) if vllm_sockets.root().is_dir() else set()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    if not vllm_sockets.user_chose():  # the worker's engine closed before the pool killed it: no socket folder left
        left = set(vllm_sockets.root().glob("*")) - before if vllm_sockets.root().is_dir() else set()
        assert not [p for p in left if any(p.rglob("*"))], left
    s = json.loads((Path(base.out) / "summary.json").read_text())
    run_generate(replace(base, engine="native", drafter=None, head=None, no_draft=True, out=str(tmp_path / "native")))

    for name in ("a.parquet", "b.parquet"):
        got, expected = rows(base.out, name), rows(tmp_path / "native", name)
        assert [r["id"] for r in got] == [r["id"] for r in expected]  # one row per input row, in order
        for r, e in zip(got, expected):
            assert (r["finish_reason"], r["error"]) == (e["finish_reason"], e["error"]), r["id"]
            if r["finish_reason"] != "error":
                assert (r["completion"], r["completion_tokens"]) == (e["completion"], e["completion_tokens"]), r["id"]
                assert r["draft_proposed"] > 0 and 0 <= r["draft_accepted"] <= r["draft_proposed"]
    errors = {r["id"]: r["error"] for n in ("a.parquet", "b.parquet") for r in rows(base.out, n) if r["finish_reason"] == "error"}
    assert set(errors) == {1, 3, 5, "b1"} and "context" in errors[5]

    assert s["settings"]["engine"] == "vllm" and s["run"]["engine"] == "vllm"
    assert s["rows"] == 11 and s["errored_rows"] == 4 and s["draft_proposed"] > 0
    assert len(s["accepted_length_histogram"]) == 4 and len(s["per_position_acceptance"]) == 3
    assert s["mean_acceptance_length"] >= 1
    # A pass gives at most gamma + 1 tokens, and one more than it accepted: steps that drafted nothing count too.
    assert s["target_passes"] >= s["generated_tokens"] - s["draft_accepted"] and s["tokens_per_target_pass"] <= 1 + 3
    assert s["gamma_histogram"] is None  # vLLM's gamma is fixed: no histogram of it
    assert s["batch_occupancy"] is None and s["target_pass_ms"] is None  # vLLM reports neither
    v = s["vllm_spec_decode"]
    assert v["num_draft_tokens"] >= s["draft_proposed"] and len(v["accepted_per_position"]) == 3
    assert v["mean_acceptance_length"] == pytest.approx(1 + v["num_accepted_tokens"] / v["num_drafts"])

    # A rerun resumes without starting vLLM; the native engine into the same --out is refused.
    again = run_generate(base)
    assert (again["files_resumed"], again["files_generated"], again["rows"]) == (2, 0, 11)
    with pytest.raises(UserError, match="other settings") as e:
        run_generate(replace(base, engine="native"))
    assert "engine" in str(e.value)


@needs_vllm
def test_calibrate_with_vllm_counts_what_the_native_engine_generates(ray_local, tiny_dirs, prompt_files, tmp_path):
    """calibrate --source target --engine vllm: the target's greedy completions counted, as the native engine
    counts them (the same histogram); the engine is part of the ledger's settings; a rerun resumes."""
    from vocabtrim import histogram
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate

    target, _, _, _ = tiny_dirs
    out = tmp_path / "vllm"
    argv = ["calibrate", "--engine", "vllm", "--drafter", target, "--target", target, "--source", "target",
            "--corpus", str(prompt_files / "a.parquet"), "--text-column", "prompt", "--temperature", "0",
            "--max-new-tokens", "10", "--batch-size", "4", "--no-progress", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    cfg = CalibrateConfig(drafter=target, target=target, source="target", corpus=[str(prompt_files / "a.parquet")],
                          text_column="prompt", temperature=0.0, max_new_tokens=10, batch_size=4, show_progress=False,
                          engine="native", out=str(tmp_path / "native"))
    native = run_calibrate(cfg)
    got = json.loads((out / "manifest.json").read_text())
    assert got["engine"] == "vllm" and native["engine"] == "native"
    assert got["rows"] == native["rows"] == 6 and got["skipped_rows"] == 2  # None and "" rows are skipped
    assert got["total_tokens"] == native["total_tokens"] > 0
    v = got["vocab_size"]
    assert (histogram.load(str(out / "histogram.parquet"), v) == histogram.load(str(tmp_path / "native" / "histogram.parquet"), v)).all()

    again = run_calibrate(replace(cfg, engine="vllm", out=str(out)))  # every shard in the ledger: vLLM not started
    assert (again["shards_counted"], again["shards_resumed"]) == (0, got["shards"])
    with pytest.raises(UserError, match="other settings"):
        run_calibrate(replace(cfg, out=str(out)))


# ------------------------------------------------------------------------------------------------
# The bundled model: greedy completions of vLLM and of the native engine
# ------------------------------------------------------------------------------------------------

BUNDLED_ROWS = 20  # 95% of them: one row may differ on a float near-tie
BUNDLED_TOKENS = 24


@pytest.fixture(scope="module")
def bundled():
    """(target folder, target model, tokenizer, prompts as token ids, the native target's greedy completions)."""
    from importlib import resources

    from vocabtrim.models import load_pair, resolve_model
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    pair = load_pair("smollm2-135m", need_drafter=False, dtype="float32", device="cpu")
    tok = pair.tokenizer
    table = pq.read_table(resources.files("vocabtrim") / "data" / "prompts.parquet").to_pylist()[:BUNDLED_ROWS]
    prompts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=False) for r in table]
    native = make_engine(pair.target, sampling=SamplingParams(temperature=0), eos_token_ids=(2,),
                         max_new_tokens=BUNDLED_TOKENS, batch_size=8)
    expected = [o.token_ids for o in native.generate(prompts, list(range(len(prompts))))]
    return resolve_model("smollm2-135m"), pair.target, tok, prompts, expected


def bundled_vllm(target_folder, drafter_spec, prompts):
    from vocabtrim.vllm_backend import VllmEngine

    engine = VllmEngine(target_folder, drafter_spec, gamma=4, temperature=0.0, eos_token_ids=[2],
                        max_new_tokens=BUNDLED_TOKENS, max_num_seqs=8, max_model_len=1024)
    sockets = engine.socket_files  # vLLM's IPC socket files, in this process's own folder
    try:
        return engine.generate(prompts, list(range(len(prompts))))
    finally:
        engine.close()
        if not vllm_sockets.user_chose():  # a folder the user chose is theirs
            assert sockets and all(p.parent == vllm_sockets.root() / str(os.getpid()) for p in sockets)
            assert not any(p.exists() for p in sockets), "an engine's socket files outlived it"


def same_rows(got, expected) -> int:
    return sum(o.token_ids == e for o, e in zip(got, expected, strict=True))


@needs_vllm
@pytest.mark.bundled
@pytest.mark.parametrize("drafter", ["none", "layers-4", "layers-4-trimmed", "eagle3"])
def test_bundled_vllm_greedy_equals_native(bundled, drafter, tmp_path):
    """vLLM with no drafter, the 4-layer truncation (full and trimmed head) and the shipped EAGLE-3 drafter, which
    vLLM's own eagle3 proposer loads as train-drafter wrote it: greedy output is the native target's."""
    from vocabtrim.models import truncate_layers
    from vocabtrim.vllm_backend import drafter_folder, eagle3_spec

    folder, target, tok, prompts, expected = bundled
    spec = None
    if drafter == "eagle3":
        spec = eagle3_spec("smollm2-135m-eagle3", folder)
    elif drafter != "none":
        head = None
        if drafter.endswith("trimmed"):  # the 8,192 smallest ids, the ids the target emits here, EOS/BOS
            ids = sorted(set(range(8192)) | {t for row in expected for t in row} | {1, 2})
            head = write_head(truncate_layers(target, 4), ids, tmp_path / "head", tok)
        spec = {"method": "draft_model", "model": drafter_folder("smollm2-135m", 4, head)}
    got = bundled_vllm(folder, spec, prompts)
    assert same_rows(got, expected) >= 0.95 * len(prompts)  # float near-ties aside
    if spec is not None:
        assert sum(o.proposed for o in got) > 0 and all(len(o.accepted_hist) == 5 for o in got)
    if drafter == "eagle3":  # the native engine accepts ~0.3 of its drafts at gamma 4; features misread would give ~0
        assert sum(o.accepted for o in got) > 0.15 * sum(o.proposed for o in got)
