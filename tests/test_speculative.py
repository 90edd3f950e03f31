"""The batched speculative engine: greedy identity, losslessness, row independence, caches, refusals."""

import itertools

import pytest
import torch
from stats import chi_square_pvalue
from tiny import make_model, noisy_copy

import vocabtrim.speculative as speculative
from vocabtrim.errors import UserError
from vocabtrim.head import TrimmedHead, head_from_ids
from vocabtrim.engine.sampling import SamplingParams, Verdict, first_rejection, row_seed, sample_from_probs
from vocabtrim.speculative import SpeculativeEngine, compaction_slots

V = 300
ALPHA = 1e-4  # false-alarm rate of each distribution check (see test_sampling.py)


@pytest.fixture(scope="module")
def target():
    return make_model(V, layers=3, seed=0, init_std=1.0)


@pytest.fixture(scope="module")
def drafter(target):
    return noisy_copy(target, scale=0.03)  # agrees with the target's argmax about a third of the time


@pytest.fixture(scope="module")
def trimmed(target):
    """A head on ~2/3 of the vocabulary (ids ≡ 2 mod 3 are dropped; EOS 2 kept)."""
    ids = [i for i in range(V) if i % 3 != 2 or i == 2]
    return head_from_ids(target, ids)


def prompts_mixed(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 5, 9, 3, 17, 6, 12][:n] if n <= 8 else torch.randint(1, 20, (n,), generator=g).tolist()
    return [torch.randint(3, V, (k,), generator=g).tolist() for k in lengths]


def greedy(target, drafter=None, head=None, gamma=3, max_new_tokens=24, eos=()):
    return SpeculativeEngine(
        target, drafter, head, gamma=gamma, sampling=SamplingParams(temperature=0), eos_token_ids=eos,
        max_new_tokens=max_new_tokens,
    )


# ------------------------------------------------------------------------------------------------
# Greedy identity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("use_head", [False, True], ids=["full-head", "trimmed-head"])
def test_greedy_speculative_equals_target_alone(target, drafter, trimmed, batch, use_head):
    prompts = prompts_mixed(batch)
    seeds = list(range(batch))
    reference = greedy(target).generate(prompts, seeds)
    accepted_any = 0
    for gamma in range(1, 6):
        out = greedy(target, drafter, trimmed if use_head else None, gamma=gamma).generate(prompts, seeds)
        assert [o.token_ids for o in out] == [r.token_ids for r in reference], f"gamma={gamma}"
        accepted_any += sum(o.accepted for o in out)
        for o in out:
            assert o.proposed == gamma * o.target_passes
            assert sum(o.accepted_hist) == o.target_passes
            assert sum(j * c for j, c in enumerate(o.accepted_hist)) == o.accepted
    assert accepted_any > 0  # the comparison exercised accepted drafts, not only rejections


def test_target_alone_matches_hugging_face_greedy(target):
    prompts = prompts_mixed(4)
    out = greedy(target, max_new_tokens=12).generate(prompts, [0] * 4)
    for p, o in zip(prompts, out):
        hf = target.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o.token_ids == hf[0, len(p):].tolist()


def test_rows_stop_at_eos_and_at_the_token_limit(target, drafter):
    prompts = prompts_mixed(8)
    free = greedy(target, max_new_tokens=16).generate(prompts, [0] * 8)
    eos = free[0].token_ids[5]  # a token row 0 emits as its 6th: make it the EOS
    out = greedy(target, drafter, gamma=4, max_new_tokens=16, eos=[eos]).generate(prompts, [0] * 8)
    for f, o in zip(free, out):
        if eos in f.token_ids:
            cut = f.token_ids.index(eos) + 1
            assert o.token_ids == f.token_ids[:cut] and o.finish_reason == "stop"
        else:
            assert o.token_ids == f.token_ids and o.finish_reason == "length" and len(o.token_ids) == 16


def test_self_drafting_accepts_every_draft(target):
    out = greedy(target, target, gamma=4, max_new_tokens=20).generate(prompts_mixed(3), [0, 1, 2])
    assert all(o.accepted == o.proposed for o in out)
    assert all(o.target_passes == 4 for o in out)  # 5 tokens per pass: 4 accepted + 1 bonus


# ------------------------------------------------------------------------------------------------
# Losslessness: the first three generated tokens follow the target's exact distribution
# ------------------------------------------------------------------------------------------------

SMALL_V = 8
N_SAMPLES = 20_000
PROMPT = [3, 5, 1]


@pytest.fixture(scope="module")
def small_pair():
    target = make_model(SMALL_V, layers=2, hidden=16, seed=3, init_std=1.0)
    return target, noisy_copy(target, scale=0.3)  # accepts 9-33% of drafts across the cases below


def exact_first_tokens(target, params, n_tokens=3):
    """The target's exact joint distribution of its first ``n_tokens`` tokens after PROMPT: [V**n]."""
    seqs = torch.tensor(list(itertools.product(range(SMALL_V), repeat=n_tokens)))  # [V^n, n]
    inputs = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = target(inputs).logits[:, len(PROMPT) - 1 : -1]  # [V^n, n, V]
    if params.greedy:
        probs = torch.nn.functional.one_hot(logits.argmax(-1), SMALL_V).double()
    else:
        from vocabtrim.engine.sampling import logits_to_probs

        probs = logits_to_probs(logits, params).double()
    step = probs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)  # [V^n, n]
    return step.prod(-1)


def sampled_first_tokens(target, drafter, head, params, gamma=2, n_tokens=3):
    engine = SpeculativeEngine(target, drafter, head, gamma=gamma, sampling=params, max_new_tokens=n_tokens)
    outs = engine.generate([PROMPT] * N_SAMPLES, [row_seed(11, str(i)) for i in range(N_SAMPLES)])
    index = torch.tensor([sum(t * SMALL_V ** (n_tokens - 1 - k) for k, t in enumerate(o.token_ids[:n_tokens])) for o in outs])
    accepted = sum(o.accepted for o in outs) / sum(o.proposed for o in outs)
    return torch.bincount(index, minlength=SMALL_V**n_tokens), accepted


CASES = {
    "T1-full": (SamplingParams(temperature=1.0), None),
    "T0.7-topp0.9-full": (SamplingParams(temperature=0.7, top_p=0.9), None),
    "T1-trimmed": (SamplingParams(temperature=1.0), [0, 2, 3, 5, 6]),
    "T0.7-topp0.9-trimmed": (SamplingParams(temperature=0.7, top_p=0.9), [1, 2, 4, 7]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_distribution_is_the_targets(small_pair, case):
    target, drafter = small_pair
    params, kept = CASES[case]
    head = None if kept is None else head_from_ids(drafter, kept)
    counts, acceptance = sampled_first_tokens(target, drafter, head, params)
    assert 0.05 < acceptance < 0.95  # both the accept and the reject paths were taken often
    assert chi_square_pvalue(counts, exact_first_tokens(target, params)) > ALPHA


def naive_verify(draft_tokens, draft_q, target_p, u_accept, u_recover, draft_support=None):
    """The loop printed in the VocabTrim write-up: accept with probability p(x), resample from p."""
    b, g = draft_tokens.shape
    p_x = target_p[:, :g].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    accepted = first_rejection(u_accept < p_x)
    next_token = sample_from_probs(target_p[torch.arange(b), accepted], u_recover)
    return Verdict(accepted=accepted, next_token=next_token)


@pytest.mark.parametrize("case", ["T1-full", "T1-trimmed"])
def test_the_same_check_rejects_the_naive_rule(small_pair, case, monkeypatch):
    target, drafter = small_pair
    params, kept = CASES[case]
    head = None if kept is None else head_from_ids(drafter, kept)
    monkeypatch.setattr(speculative, "verify_sampled", naive_verify)
    counts, _ = sampled_first_tokens(target, drafter, head, params)
    assert chi_square_pvalue(counts, exact_first_tokens(target, params)) < ALPHA


# ------------------------------------------------------------------------------------------------
# Row independence and caches
# ------------------------------------------------------------------------------------------------


def test_a_row_gives_the_same_completion_at_batch_1_and_8(target, drafter, trimmed):
    prompts = prompts_mixed(8, seed=5)
    seeds = [row_seed(42, f"row-{i}") for i in range(8)]
    params = SamplingParams(temperature=0.8, top_p=0.95)
    for head in (None, trimmed):
        engine = SpeculativeEngine(target, drafter, head, gamma=3, sampling=params, max_new_tokens=20)
        batched = engine.generate(prompts, seeds)
        for i in (0, 3, 7):
            alone = engine.generate([prompts[i]], [seeds[i]])[0]
            assert alone.token_ids == batched[i].token_ids
        reordered = engine.generate(prompts[::-1], seeds[::-1])
        assert [o.token_ids for o in reordered[::-1]] == [o.token_ids for o in batched]


def test_cache_after_rejections_matches_a_fresh_forward(target, drafter):
    """After several steps with rejections, both caches give the logits of a fresh full forward."""
    prompts = prompts_mixed(6, seed=9)
    engine = SpeculativeEngine(target, drafter, gamma=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=64)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    state = engine._prefill(prompts, speculative.EngineStats())
    history = [list(p) for p in prompts]
    rejected = 0
    for _ in range(4):
        accepted, drafts, nxt = engine._speculative_step(state, gens, speculative.EngineStats())
        engine._advance(state, accepted, nxt)
        for i, h in enumerate(history):
            h.extend(drafts[i, : accepted[i]].tolist() + [int(nxt[i])])
        rejected += int((accepted < 4).sum())
    engine._select(state, torch.arange(6))  # exercise compaction too
    assert rejected > 0
    for m, model in ((engine.target, target), (engine.drafter, drafter)):
        # Feed the extra draft (if owed) and the pending token, as the next step would.
        ones = torch.ones((6, 1), dtype=torch.bool)
        if m is engine.drafter and bool(state["has_extra"].any()):
            m.forward(state["extra"][:, None], state["has_extra"][:, None], (state["pos"] - 1)[:, None])
        hidden = m.forward(state["pending"][:, None], ones, state["pos"][:, None])
        cached = m.head.logits(hidden[:, -1])
        for i, h in enumerate(history):
            fresh = model(torch.tensor([h])).logits[0, -1]
            assert torch.allclose(cached[i], fresh, atol=1e-4), f"row {i}"


def test_compaction_keeps_valid_slots_in_order():
    valid = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, True]])
    slots, new_valid = compaction_slots(valid, torch.tensor([0, 1]))
    assert slots.tolist()[0] == [0, 2, 3] and new_valid.tolist() == [[True, True, True], [False, False, True]]
    assert slots.tolist()[1][-1] == 2


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


def test_head_with_ids_beyond_the_vocabulary_is_refused(target, drafter):
    bad = TrimmedHead(token_ids=torch.tensor([1, 5, V + 3]), weight=torch.zeros(3, 32))
    with pytest.raises(UserError, match=f"keeps token id {V + 3} but the drafter has only {V} logits"):
        SpeculativeEngine(target, drafter, bad)


def test_mismatched_logits_width_is_refused(target):
    other = make_model(V + 8, layers=1, seed=2)
    with pytest.raises(UserError, match=f"logits widths differ: {V} vs {V + 8}"):
        SpeculativeEngine(target, other)


def test_unsorted_head_and_head_without_drafter_are_refused(target, drafter):
    bad = TrimmedHead(token_ids=torch.tensor([5, 1]), weight=torch.zeros(2, 32))
    with pytest.raises(UserError, match="sorted"):
        SpeculativeEngine(target, drafter, bad)
    with pytest.raises(UserError, match="needs a drafter"):
        SpeculativeEngine(target, None, head_from_ids(target, [1, 2]))
